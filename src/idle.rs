//! The idle handshake of a reused worker: who decides, between the parent
//! sending it another task and the worker retiring after its idle timeout.
//!
//! In reuse mode ([`Builder::reuse`](crate::Builder::reuse)) a parked worker
//! that finished a task waits on its mailbox for the next one, and exits if
//! none comes within the idle timeout. Without a handshake the two race: a
//! job sent just as the worker gives up would be lost with it, and its task
//! would fail although it never ran. So each mailbox has one word of shared
//! memory, and both sides move it with a compare-and-swap; whoever moves it
//! first out of [`WAITING`] has decided:
//!
//! ```text
//!            worker, before it publishes a result it will outlive
//!   BUSY ───────────────────────────────────────────────▶ WAITING
//!    ▲                                                  │       │
//!    │ worker, on receiving the job    parent, to send  │       │ worker, at
//!    └──────────────────────────────── a job ◀── CLAIMED┘       │ its timeout
//!                                                         RETIRED ◀┘
//! ```
//!
//! A worker that loses the race to the parent waits for the job, which is
//! on its way; a parent that loses it never sends one, and kills the worker
//! (which is leaving anyway). The word is shared with every worker of the
//! zygote, so one that writes another mailbox's word can only make the
//! parent kill that mailbox's idle worker, never run a task twice or lose
//! one: the parent treats any value but `WAITING` as "do not send".

use std::sync::atomic::Ordering;

/// Running a task, or parked fresh (the parent never asks a fresh worker).
pub(crate) const BUSY: u64 = 0;
/// Finished a task and will wait for another.
pub(crate) const WAITING: u64 = 1;
/// The parent is sending it a job.
pub(crate) const CLAIMED: u64 = 2;
/// It timed out and is exiting.
pub(crate) const RETIRED: u64 = 3;

/// The four moves, over one type of atomic word: std's, and under
/// `--cfg loom` loom's too, so that `idle::model` checks this very code
/// under every interleaving (docs/verification.md).
macro_rules! handshake {
    ($word:ty) => {
        /// Worker: about to publish a result and then wait for another task.
        ///
        /// Stored before the result is published, so that a parent which has
        /// seen the result also sees `WAITING` (Release here, Acquire in
        /// [`claim`]).
        pub(crate) fn wait(word: &$word) {
            word.store(WAITING, Ordering::Release);
        }

        /// Worker: a job arrived.
        pub(crate) fn busy(word: &$word) {
            word.store(BUSY, Ordering::Relaxed);
        }

        /// Worker, at its idle timeout: true if it may exit, false if the
        /// parent claimed it first (a job is on its way, and it must wait
        /// for it).
        pub(crate) fn retire(word: &$word) -> bool {
            word.compare_exchange(WAITING, RETIRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }

        /// Parent, before sending a job to a worker that has served a task:
        /// true if the worker will take it, false if it is retiring (or its
        /// word was scribbled on), in which case no job may be sent.
        pub(crate) fn claim(word: &$word) -> bool {
            word.compare_exchange(WAITING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }
    };
}

handshake!(std::sync::atomic::AtomicU64);

/// The same moves over loom's atomics, for the model.
#[cfg(all(loom, test))]
mod on_loom {
    use super::{BUSY, CLAIMED, Ordering, RETIRED, WAITING};
    handshake!(loom::sync::atomic::AtomicU64);
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn exactly_one_side_decides() {
        let word = AtomicU64::new(BUSY);
        assert!(!claim(&word), "a busy worker is not claimable");
        wait(&word);
        assert!(claim(&word));
        assert!(!retire(&word), "claimed first: the worker must wait");
        busy(&word);
        wait(&word);
        assert!(retire(&word));
        assert!(!claim(&word), "retired first: the parent must not send");
    }

    #[test]
    fn scribbled_words_are_never_claimed() {
        for value in [BUSY, CLAIMED, RETIRED, 4, u64::MAX] {
            let word = AtomicU64::new(value);
            assert!(!claim(&word), "{value}");
        }
    }
}
