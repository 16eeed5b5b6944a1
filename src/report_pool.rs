//! Report socket pairs, kept for reuse from one task forked on demand to the
//! next.
//!
//! Such a task needs a private report socket: the zygote reports `Started` and
//! `Exited` on it, a hang-up on it cancels the task, and its end-of-stream
//! tells the parent that the zygote died. Creating a `SEQPACKET` pair and
//! releasing both sockets costs about 12 µs here, more than every other
//! system call of a task's parent side together, so a pair is used again:
//!
//! * the parent sends the far end with the spawn request and closes its own
//!   copy of it, so that while the task runs the zygote holds the only one
//!   (and the zygote's death still ends the stream);
//! * the zygote hands the far end back, attached to the task's final report
//!   (`Exited` or `SpawnFailed`), and then closes its copy;
//! * the parent puts the pair back here if nothing else was done with it:
//!   not when the task was cancelled (its end is shut down for writing) and
//!   not when the returned fd is not the far end it sent.
//!
//! A pair goes back only after its final report was read, and the zygote
//! sends nothing after that one, so a pair taken from here has nothing
//! queued.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;

use crate::error::Error;
use crate::sys;

/// Most pairs a pool keeps (two fds each). A burst of more tasks in flight
/// than this creates the pairs beyond it for one task each.
const MAX_KEPT: usize = 32;

/// The parent's spare report socket pairs.
pub(crate) struct ReportPool {
    idle: Mutex<Vec<Pair>>,
    /// Most pairs kept.
    cap: usize,
}

/// A report socket pair with nothing queued on it.
pub(crate) struct Pair {
    /// The parent's end, which it reads reports from.
    pub(crate) ours: OwnedFd,
    /// The end the zygote writes reports to.
    pub(crate) theirs: OwnedFd,
    /// Which socket `theirs` is, to recognise it when it comes back.
    pub(crate) id: SocketId,
}

/// Identifies an open socket: its inode on the sockets' file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketId {
    dev: u64,
    ino: u64,
}

impl SocketId {
    /// The identity of the socket `fd` refers to.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> rustix::io::Result<SocketId> {
        let stat = rustix::fs::fstat(fd)?;
        Ok(SocketId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }
}

/// A pooled pair lent to one task: where it goes back, and which socket its
/// far end is, to recognise that end when the zygote hands it back.
pub(crate) struct Recycle {
    pool: Arc<ReportPool>,
    id: SocketId,
}

impl Recycle {
    /// Puts the pair back: the task's end, and the far end that its final
    /// report carried. Nothing follows a final report, so the pair can serve
    /// another task.
    pub(crate) fn put_back(self, ours: AsyncFd<OwnedFd>, returned: OwnedFd) {
        self.pool.put_back(ours.into_inner(), returned, self.id);
    }
}

impl ReportPool {
    /// A pool that keeps at most `min(max_in_flight, MAX_KEPT)` pairs.
    pub(crate) fn new(max_in_flight: usize) -> ReportPool {
        let cap = max_in_flight.min(MAX_KEPT);
        ReportPool {
            idle: Mutex::new(Vec::with_capacity(cap)),
            cap,
        }
    }

    /// A pair from the pool, or a new one.
    pub(crate) fn take(&self) -> Result<Pair, Error> {
        if let Some(pair) = self.lock().pop() {
            return Ok(pair);
        }
        let (ours, theirs) = sys::seqpacket_pair()?;
        let id = SocketId::of(theirs.as_fd()).map_err(|e| Error::io("fstat", e.into()))?;
        Ok(Pair { ours, theirs, id })
    }

    /// How to put back the pair `id` once its task is done with it.
    pub(crate) fn recycle(self: &Arc<Self>, id: SocketId) -> Recycle {
        Recycle {
            pool: Arc::clone(self),
            id,
        }
    }

    /// Keeps `ours` and the far end the zygote handed back, if that is the
    /// socket `id` (the one sent with the task) and there is room.
    pub(crate) fn put_back(&self, ours: OwnedFd, returned: OwnedFd, id: SocketId) {
        if SocketId::of(returned.as_fd()).ok() != Some(id) {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.cap {
            idle.push(Pair {
                ours,
                theirs: returned,
                id,
            });
        }
    }

    /// Closes every pair kept.
    pub(crate) fn clear(&self) {
        let idle = std::mem::take(&mut *self.lock());
        drop(idle);
    }

    /// Pairs kept now.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pair>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_comes_back_only_with_its_own_far_end() {
        let pool = ReportPool::new(4);
        let (first, other) = (pool.take().unwrap(), pool.take().unwrap());
        assert_ne!(first.id, other.id, "two new pairs are two sockets");
        // Another socket handed back in place of the far end: not kept.
        pool.put_back(first.ours, other.theirs, first.id);
        assert_eq!(pool.idle(), 0);
        // Its own far end: kept, and the next take reuses the pair.
        let pair = pool.take().unwrap();
        let id = pair.id;
        pool.put_back(pair.ours, pair.theirs, id);
        assert_eq!(pool.idle(), 1);
        assert_eq!(pool.take().unwrap().id, id);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_cap_pairs() {
        let pool = ReportPool::new(1);
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        let (ida, idb) = (a.id, b.id);
        pool.put_back(a.ours, a.theirs, ida);
        pool.put_back(b.ours, b.theirs, idb);
        assert_eq!(pool.idle(), 1);
    }
}
