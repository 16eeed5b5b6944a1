//! Job cells: how a reused worker gets its next job without a socket.
//!
//! In reuse mode ([`Builder::reuse`](crate::Builder::reuse)) a worker that
//! finished a task waits for the next one. Over its mailbox's job socket
//! that costs a `sendmsg` in the parent (a socket buffer allocated, filled
//! and freed) and a `ppoll` and a `recvmsg` in the worker, for a frame of
//! about a hundred bytes that carries no fd. Here the parent writes the job
//! into a page of shared memory instead, the mailbox's *cell*, and wakes the
//! worker with a futex on the cell's first word; the worker sleeps on that
//! word. A job that carries fds (an argument in a memfd, a trace buffer) or
//! does not fit the cell still goes over the socket, and the cell then says
//! only "look there".
//!
//! Cell layout, in 32-bit words:
//!
//! | word | meaning |
//! |-----:|---------|
//! | 0    | `seq`: even when the cell holds a whole job, odd while the parent writes one; the futex word |
//! | 1    | `len`: the job frame's length in bytes; 0 means "on the socket" |
//! | 2..  | the frame (`wire::Request`), little-endian within each word |
//!
//! # Protocol
//!
//! A seqlock with one writer. The parent (the only process that can write
//! the cells: the worker's mapping is read-only, see `shm::PostedWords`)
//! stores an odd `seq`, then the frame, then the next even `seq` with
//! Release, and wakes the futex. A worker loads `seq`; if it is even and not
//! the last one it took, it copies the frame out, issues an Acquire fence
//! and loads `seq` again: only if it is unchanged was the copy one whole
//! job. Otherwise it sleeps on the futex while `seq` keeps the value it
//! saw. The kernel compares and queues atomically, so a post that lands
//! after the load and before the sleep makes the sleep return at once.
//!
//! The parent posts to a cell only for a worker it has claimed, that is one
//! that said it waits (`idle`), and only after the worker has published its
//! last result, so in practice a worker never reads a cell that is being
//! written. A cell may still hold a job for the mailbox's previous worker
//! (it died before taking it): the job names its worker's pid, and any other
//! worker skips it, as it does such a job on the socket. The copy is decoded
//! and checked (`wire::Request::decode`) like a socket frame.
//!
//! The worker's loads are all `Relaxed`, ordered by fences, because its
//! mapping is read-only: std guarantees that only small `Relaxed` loads
//! never write to memory (SAFETY.md S6).

use std::time::Duration;

use crate::sync::{AtomicU32, Ordering, fence};
#[cfg(not(loom))]
use crate::sys;
use crate::sys::{SysResult, Woken};

/// Bytes per cell.
pub(crate) const CELL_BYTES: usize = 4096;
/// Words per cell.
pub(crate) const CELL_WORDS: usize = CELL_BYTES / 4;

/// Words from one cell's start to the next's: a cell, rounded up to a
/// whole page (larger than a cell where pages are 16 or 64 KiB), so that no
/// cell shares a page with another mailbox's and a reused worker can give
/// up every page but its own cell's ([`keep_only`]).
pub(crate) fn stride_words() -> usize {
    rustix::param::page_size().max(CELL_BYTES) / 4
}

/// Words before the frame; the rest of the cell, 4088 bytes, holds it.
const HEADER_WORDS: usize = 2;

/// One mailbox's job cell.
pub(crate) struct Cell<'a> {
    /// `CELL_WORDS` words (fewer in `job_cell::model`).
    words: &'a [AtomicU32],
    /// The parent's mapping: only then may [`post`](Cell::post) store.
    writable: bool,
}

/// What a worker found in its cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// No job since the one it took last (or the parent is writing one):
    /// the `seq` it saw, to sleep on.
    Nothing(u32),
    /// A job, copied into the caller's buffer: its frame's length, 0 for
    /// "on the socket". `seq` is the worker's new "last taken".
    Job { seq: u32, len: usize },
    /// The parent wrote a new job while this one was being copied: take
    /// again.
    Torn,
    /// The frame's length is impossible (longer than the cell or the
    /// buffer): never written by the parent.
    Bad,
}

impl<'a> Cell<'a> {
    /// A cell over `words`, `None` if there are too few for a header.
    pub(crate) fn over(words: &'a [AtomicU32], writable: bool) -> Option<Cell<'a>> {
        (words.len() > HEADER_WORDS).then_some(Cell { words, writable })
    }

    /// Is this the parent's mapping, which [`post`](Cell::post) writes?
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    fn seq(&self) -> &AtomicU32 {
        &self.words[0]
    }

    fn frame_words(&self) -> &[AtomicU32] {
        &self.words[HEADER_WORDS..]
    }

    /// Parent, after a [`post`](Cell::post): wakes the worker if it sleeps
    /// in [`sleep`](Cell::sleep).
    pub(crate) fn wake(&self) -> SysResult<()> {
        #[cfg(not(loom))]
        return sys::futex_wake(self.seq());
        // Under loom no cell overlays a mapping (see `cell`): nobody sleeps.
        #[cfg(loom)]
        Ok(())
    }

    /// Worker: sleeps while `seq` is still `now` (what
    /// [`Found::Nothing`] said), for at most `timeout`.
    pub(crate) fn sleep(&self, now: u32, timeout: Option<Duration>) -> SysResult<Woken> {
        #[cfg(not(loom))]
        return sys::futex_wait(self.seq(), now, timeout);
        #[cfg(loom)]
        {
            let _ = (now, timeout);
            Ok(Woken::Look)
        }
    }

    /// The `seq` now: a worker's starting "last taken", read before it can
    /// be claimed for a job through the cell.
    pub(crate) fn current(&self) -> u32 {
        self.seq().load(Ordering::Relaxed)
    }

    /// Parent: writes one job frame (empty: "on the socket") for the
    /// worker to find. Returns false, writing nothing, if the frame does
    /// not fit or this mapping is not the writable one. The caller wakes
    /// the worker afterwards.
    pub(crate) fn post(&self, frame: &[u8]) -> bool {
        let words = self.frame_words();
        if !self.writable || frame.len() > words.len() * 4 {
            return false;
        }
        let seq = self.seq();
        // Odd: a reader that sees this, or sees it change under its copy,
        // does not take the copy.
        let writing = seq.load(Ordering::Relaxed) | 1;
        seq.store(writing, Ordering::Relaxed);
        // Orders the odd `seq` before the frame's stores, for a reader
        // whose copy sees any of them (its second load then cannot see
        // the even value it started from).
        fence(Ordering::Release);
        self.words[1].store(frame.len() as u32, Ordering::Relaxed);
        for (word, chunk) in words.iter().zip(frame.chunks(4)) {
            let mut bytes = [0u8; 4];
            bytes[..chunk.len()].copy_from_slice(chunk);
            word.store(u32::from_le_bytes(bytes), Ordering::Relaxed);
        }
        // Release: a reader whose load sees this value (then its Acquire
        // fence) sees the whole frame above.
        seq.store(writing.wrapping_add(1), Ordering::Release);
        true
    }

    /// Worker: copies a job posted since `seen` (the `seq` of the last
    /// one taken) into `buf`, if there is a whole one.
    pub(crate) fn take(&self, seen: u32, buf: &mut [u8]) -> Found {
        let seq = self.seq();
        let first = seq.load(Ordering::Relaxed);
        if first == seen || first & 1 == 1 {
            return Found::Nothing(first);
        }
        // Acquire: pairs with the Release store of `first`.
        fence(Ordering::Acquire);
        let len = self.words[1].load(Ordering::Relaxed) as usize;
        let words = self.frame_words();
        let fits = len <= words.len() * 4 && len <= buf.len();
        if fits {
            for (word, chunk) in words.iter().zip(buf[..len].chunks_mut(4)) {
                let bytes = word.load(Ordering::Relaxed).to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
        // The seqlock reader's check: orders the loads above before the
        // second load of `seq`, which sees a change if any of them read
        // a store of a later post.
        fence(Ordering::Acquire);
        let second = seq.load(Ordering::Relaxed);
        if second != first {
            return Found::Torn;
        }
        if !fits {
            return Found::Bad;
        }
        Found::Job { seq: first, len }
    }
}

/// Mailbox `index`'s cell in `cells`, or `None` if out of range, given up
/// ([`keep_only`]) or not mapped in this process's epoch.
#[cfg(not(loom))]
pub(crate) fn cell(cells: &crate::shm::PostedWords, index: usize) -> Option<Cell<'_>> {
    let words = cells.range(index.checked_mul(stride_words())?, CELL_WORDS)?;
    Cell::over(words, cells.writable())
}

/// A worker's cell isolation: gives up, in this process, every mailbox's
/// cell but `index`'s (a reused worker's own), or every one if `None` (a
/// worker forked for one task), so that its tasks cannot read the jobs of
/// other workers (SAFETY.md S6). Does nothing to
/// the parent's writable mapping. Later [`cell`] calls return `None` for
/// the cells given up.
///
/// # Safety
///
/// No [`Cell`] of `cells` but mailbox `index`'s may be live in this
/// process, now or later.
pub(crate) unsafe fn keep_only(
    cells: &crate::shm::PostedWords,
    index: Option<usize>,
) -> SysResult<()> {
    let stride = stride_words();
    let (start, len) = index.map_or((0, 0), |i| (i.saturating_mul(stride), stride));
    // SAFETY: SAFETY.md S6. A `Cell` is the only slice of `cells` anybody
    // holds (`cell` makes them), and the caller promises that none outside
    // the kept cell is live; one cell's stride is whole pages (`stride_words`).
    unsafe { cells.keep_only(start, len) }
}

/// Under `--cfg loom` a cell's words are loom's atomics, which cannot
/// overlay a mapping: only the heap-backed cells of `job_cell::model` exist.
#[cfg(loom)]
pub(crate) fn cell(cells: &crate::shm::PostedWords, index: usize) -> Option<Cell<'_>> {
    let _ = (cells.range(index, CELL_WORDS), cells.writable(), Cell::over);
    None
}

#[cfg(test)]
mod model;
