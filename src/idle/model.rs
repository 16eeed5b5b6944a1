//! A model of the idle handshake (docs/verification.md): a parent and a
//! reused worker race through the real [`claim`], [`retire`], [`wait`] and
//! [`busy`], and each scenario asserts what the handshake promises: exactly
//! one side decides; a job is sent only to a worker that will take it; a
//! worker leaves only if no job is on its way.
//!
//! `scripts/loom.sh` (`--cfg loom`) runs them under every interleaving, on
//! loom's atomics (the same functions, `idle::on_loom`); plain `cargo test`
//! runs each once on real threads, as a smoke test.

#[cfg(loom)]
use super::on_loom::{busy, claim, retire, wait};
use super::{BUSY, WAITING};
#[cfg(not(loom))]
use super::{busy, claim, retire, wait};

#[cfg(loom)]
use loom::{
    model,
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering},
    thread,
};
#[cfg(not(loom))]
use std::{
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering},
    thread,
};

/// Outside loom a scenario runs once.
#[cfg(not(loom))]
fn model(scenario: impl Fn()) {
    scenario();
}

/// What the job socket is in production: the parent's send, seen by the
/// worker. 0 while empty, else the number of the job sent.
struct Channel {
    word: AtomicU64,
    job: AtomicU64,
}

impl Channel {
    fn new(state: u64) -> Arc<Channel> {
        Arc::new(Channel {
            word: AtomicU64::new(state),
            job: AtomicU64::new(0),
        })
    }

    fn send(&self, job: u64) {
        let previous = self.job.swap(job, Ordering::Release);
        assert_eq!(previous, 0, "job {job} sent on top of job {previous}");
    }

    /// The worker, after losing the race at its timeout: the job must be on
    /// its way, so it waits for it (in production, blocking on the socket).
    fn receive(&self) -> u64 {
        loop {
            let job = self.job.swap(0, Ordering::Acquire);
            if job != 0 {
                return job;
            }
            thread::yield_now();
        }
    }
}

/// The parent claims a waiting worker just as its idle timeout fires.
#[test]
fn the_timeout_and_a_claim_never_both_win() {
    model(|| {
        let ch = Channel::new(WAITING);
        let parent = {
            let ch = Arc::clone(&ch);
            thread::spawn(move || {
                let claimed = claim(&ch.word);
                if claimed {
                    ch.send(1);
                }
                claimed
            })
        };
        // The worker, at its timeout.
        let left = retire(&ch.word);
        if !left {
            assert_eq!(ch.receive(), 1);
            busy(&ch.word);
        }
        let claimed = parent.join().expect("parent");
        assert!(claimed != left, "claimed {claimed}, left {left}");
        if left {
            assert_eq!(
                ch.job.load(Ordering::Relaxed),
                0,
                "a job sent to a worker that left"
            );
        }
    });
}

/// Two tasks in turn: the worker takes one, says it waits again and
/// publishes a result, then times out while the parent, having seen the
/// result, tries to send the second.
#[test]
fn a_worker_that_waits_again_is_claimed_or_leaves_never_both() {
    model(|| {
        let ch = Channel::new(WAITING);
        // The first task's result, published after `wait`.
        let result = Arc::new(AtomicU64::new(0));
        let parent = {
            let (ch, result) = (Arc::clone(&ch), Arc::clone(&result));
            thread::spawn(move || {
                assert!(
                    claim(&ch.word),
                    "the worker cannot time out before its first job"
                );
                ch.send(1);
                while result.load(Ordering::Acquire) == 0 {
                    thread::yield_now();
                }
                // Seen the result, so `wait` is visible: the word is
                // WAITING or, if the worker gave up already, RETIRED.
                let again = claim(&ch.word);
                if again {
                    ch.send(2);
                }
                again
            })
        };
        assert_eq!(ch.receive(), 1);
        busy(&ch.word);
        wait(&ch.word);
        result.store(1, Ordering::Release);
        let left = retire(&ch.word);
        if !left {
            assert_eq!(ch.receive(), 2);
            busy(&ch.word);
        }
        let again = parent.join().expect("parent");
        assert!(again != left, "claimed again {again}, left {left}");
        let word = ch.word.load(Ordering::Relaxed);
        assert!(
            left || word == BUSY,
            "served the second job, yet the word is {word}"
        );
    });
}
