//! A model of the job cell's seqlock (docs/verification.md).
//!
//! The parent's [`Cell::post`] and a worker's [`Cell::take`], the real
//! code, over a small heap-backed cell (two frame words) on two threads.
//! What the protocol promises: a take yields nothing, or exactly one whole
//! frame the parent posted, under that post's `seq`; never a mix of two
//! posts, never a post it already took.
//!
//! As `ring::model`: under `scripts/loom.sh` every interleaving, under
//! `scripts/miri.sh` real threads with weak memory, under `cargo test`
//! once each.

use super::{Cell, Found, HEADER_WORDS};
use crate::sync::AtomicU32;

#[cfg(loom)]
use loom::{model, sync::Arc, thread};
#[cfg(not(loom))]
use std::{sync::Arc, thread};

/// Outside loom a scenario runs once.
#[cfg(not(loom))]
fn model(scenario: impl Fn()) {
    scenario();
}

const FRAME_WORDS: usize = 2;
const A: [u8; 8] = [0xa1; 8];
const B: [u8; 7] = [0xb2; 7];

fn cell_memory() -> Arc<Vec<AtomicU32>> {
    Arc::new(
        (0..HEADER_WORDS + FRAME_WORDS)
            .map(|_| AtomicU32::new(0))
            .collect(),
    )
}

fn cell(words: &[AtomicU32]) -> Cell<'_> {
    Cell::over(words, true).expect("room for the header")
}

/// What a take may yield: nothing, or one of `posted` whole, under an
/// even `seq` newer than `seen`.
fn check(found: Found, buf: &[u8], seen: u32, posted: &[&[u8]]) {
    match found {
        Found::Nothing(_) | Found::Torn => {}
        Found::Job { seq, len } => {
            assert_ne!(seq, seen, "took a job it had taken");
            assert_eq!(seq & 1, 0, "took a job under an odd seq");
            assert!(
                posted.iter().any(|frame| &buf[..len] == *frame),
                "took a frame nobody posted: {:?}",
                &buf[..len]
            );
        }
        Found::Bad => panic!("a frame the parent posted read as bad"),
    }
}

// The worker's take runs on the spawned thread and the parent's posts on
// the model's main thread: with the roles the other way round, loom 0.7
// explores a single schedule of these scenarios (a spawned thread that loads
// before it stores is never preempted between the two), and a take with its
// seqlock check deleted still passes.

#[test]
fn a_take_during_a_post_is_whole_or_nothing() {
    model(|| {
        let memory = cell_memory();
        let seen = cell(&memory).current();
        let worker = {
            let memory = Arc::clone(&memory);
            thread::spawn(move || {
                let mut buf = [0u8; FRAME_WORDS * 4];
                let found = cell(&memory).take(seen, &mut buf);
                check(found, &buf, seen, &[&A]);
            })
        };
        assert!(cell(&memory).post(&A));
        worker.join().expect("worker");
        // Once the post is done, the job is there whole.
        let mut buf = [0u8; FRAME_WORDS * 4];
        let found = cell(&memory).take(seen, &mut buf);
        assert_eq!(
            found,
            Found::Job {
                seq: 2,
                len: A.len()
            }
        );
        assert_eq!(&buf[..A.len()], &A);
    });
}

#[test]
fn a_take_across_two_posts_never_mixes_them() {
    model(|| {
        let memory = cell_memory();
        let worker = {
            let memory = Arc::clone(&memory);
            thread::spawn(move || {
                let mut buf = [0u8; FRAME_WORDS * 4];
                let found = cell(&memory).take(0, &mut buf);
                check(found, &buf, 0, &[&A, &B]);
            })
        };
        let parent = cell(&memory);
        assert!(parent.post(&A));
        assert!(parent.post(&B));
        worker.join().expect("worker");
        let mut buf = [0u8; FRAME_WORDS * 4];
        let found = cell(&memory).take(0, &mut buf);
        assert_eq!(
            found,
            Found::Job {
                seq: 4,
                len: B.len()
            }
        );
        assert_eq!(&buf[..B.len()], &B);
        // Taken: nothing new until the next post.
        assert_eq!(cell(&memory).take(4, &mut buf), Found::Nothing(4));
    });
}

#[test]
fn a_read_only_cell_posts_nothing_and_long_frames_do_not_fit() {
    model(|| {
        let memory = cell_memory();
        let read_only = Cell::over(&memory, false).expect("room");
        assert!(!read_only.post(&A));
        assert!(!cell(&memory).post(&[0u8; FRAME_WORDS * 4 + 1]));
        assert_eq!(cell(&memory).current(), 0, "a refused post writes nothing");
    });
}
