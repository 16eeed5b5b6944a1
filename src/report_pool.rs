//! Report socket pairs, kept for reuse from one task forked on demand to the
//! next.
//!
//! Such a task needs a private report socket: the zygote reports `Started` and
//! `Exited` on it, a hang-up on it cancels the task, and its end-of-stream
//! tells the parent that the zygote died. Creating a `SEQPACKET` pair and
//! releasing both sockets costs about 12 µs here, more than every other
//! system call of a task's parent side together, so a pair is used again.
//!
//! The far end must never be held by anyone but the zygote while a task
//! waits on the pair, or the zygote's death would not end the stream: a
//! plain `fork` of the parent (which runs no code of ours) would inherit a
//! far end kept in the parent and hide the death for as long as it lived.
//! So each side keeps its own end, under a small number both know:
//!
//! * a new pair gets a free number (`1..=MAX_KEPT`, or 0 if none is free:
//!   not kept). The parent sends the far end with the spawn request, under
//!   that number, and closes its copy at once;
//! * after the task's `Exited` report, the zygote keeps the far end under
//!   that number (unless the task was cancelled), and the parent keeps its
//!   end: both agree, since both go by the same report;
//! * a later task takes a kept pair and names its number in the request
//!   (`wire::FLAG_POOLED_REPORT`), which then carries no report fd.
//!
//! A pair goes back only after its final report was read, and the zygote
//! sends nothing after that one, so a pair taken from here has nothing
//! queued. A number whose pair the parent dropped (a cancelled task,
//! [`ReportPool::clear`]) is free again; the zygote's stale far end under it
//! is replaced when a new pair comes with that number.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;

use crate::error::Error;
use crate::sys;
use crate::wire;

/// Most pairs a pool keeps. A burst of more tasks in flight than this
/// creates the pairs beyond it for one task each. The zygote keeps as many
/// far ends, numbered `1..=MAX_KEPT`.
const MAX_KEPT: u32 = wire::KEPT_PAIRS;

/// The parent's spare report socket pairs.
pub(crate) struct ReportPool {
    state: Mutex<State>,
}

struct State {
    /// Kept pairs: the parent's end, and the number the zygote keeps the
    /// far end under.
    idle: Vec<(u32, OwnedFd)>,
    /// Numbers not in use by any pair, kept or lent.
    free: Vec<u32>,
}

/// A report socket pair for one task.
pub(crate) struct Pair {
    /// The parent's end, which it reads reports from.
    pub(crate) ours: OwnedFd,
    /// The far end, for a new pair: sent with the request. `None` for a
    /// kept pair, whose far end the zygote has.
    pub(crate) theirs: Option<OwnedFd>,
    /// The number both sides keep it under; 0: not kept after this task.
    pub(crate) id: u32,
}

/// A pair lent to one task: where it goes back. Dropped without
/// [`put_back`](Recycle::put_back), it frees the pair's number.
pub(crate) struct Recycle {
    pool: Arc<ReportPool>,
    id: u32,
}

impl Recycle {
    /// Puts the pair back, after its task's `Exited` report: the zygote
    /// keeps the far end then, and nothing follows that report.
    pub(crate) fn put_back(mut self, ours: AsyncFd<OwnedFd>) {
        let id = std::mem::take(&mut self.id);
        if id != 0 {
            self.pool.lock().idle.push((id, ours.into_inner()));
        }
    }
}

impl Drop for Recycle {
    fn drop(&mut self) {
        if self.id != 0 {
            self.pool.lock().free.push(self.id);
        }
    }
}

impl ReportPool {
    /// A pool that keeps at most `min(max_in_flight, MAX_KEPT)` pairs.
    pub(crate) fn new(max_in_flight: usize) -> ReportPool {
        let cap = (max_in_flight as u32).clamp(1, MAX_KEPT);
        ReportPool {
            state: Mutex::new(State {
                idle: Vec::with_capacity(cap as usize),
                // Reversed so that 1 is handed out first.
                free: (1..=cap).rev().collect(),
            }),
        }
    }

    /// A kept pair, or a new one.
    pub(crate) fn take(&self) -> Result<Pair, Error> {
        let mut state = self.lock();
        if let Some((id, ours)) = state.idle.pop() {
            return Ok(Pair {
                ours,
                theirs: None,
                id,
            });
        }
        let id = state.free.pop().unwrap_or(0);
        drop(state);
        match sys::seqpacket_pair() {
            Ok((ours, theirs)) => Ok(Pair {
                ours,
                theirs: Some(theirs),
                id,
            }),
            Err(e) => {
                if id != 0 {
                    self.lock().free.push(id);
                }
                Err(e.into())
            }
        }
    }

    /// How to put back the pair `id` once its task is done with it.
    pub(crate) fn recycle(self: &Arc<Self>, id: u32) -> Recycle {
        Recycle {
            pool: Arc::clone(self),
            id,
        }
    }

    /// Closes every pair kept (the zygote's far ends of them are replaced
    /// as their numbers come back with new pairs).
    pub(crate) fn clear(&self) {
        let mut state = self.lock();
        let idle = std::mem::take(&mut state.idle);
        state.free.extend(idle.iter().map(|&(id, _)| id));
        drop(state);
        drop(idle);
    }

    /// Pairs kept now.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kept_pair_comes_back_without_its_far_end() {
        let pool = Arc::new(ReportPool::new(4));
        let pair = pool.take().unwrap();
        assert!(pair.theirs.is_some(), "a new pair brings its far end");
        let id = pair.id;
        assert_ne!(id, 0);
        let ours = crate::reactor::register(pair.ours, tokio::io::Interest::READABLE).unwrap();
        pool.recycle(id).put_back(ours);
        assert_eq!(pool.idle(), 1);
        let again = pool.take().unwrap();
        assert_eq!((again.id, again.theirs.is_none()), (id, true));
    }

    #[test]
    fn numbers_are_unique_and_freed_by_a_pair_not_put_back() {
        let pool = Arc::new(ReportPool::new(2));
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        assert!(a.id != b.id && a.id != 0 && b.id != 0);
        // Out of numbers: the next pair is not kept.
        assert_eq!(pool.take().unwrap().id, 0);
        drop(pool.recycle(a.id));
        assert_eq!(
            pool.take().unwrap().id,
            a.id,
            "a dropped loan frees its number"
        );
    }
}
