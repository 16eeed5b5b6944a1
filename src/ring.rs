//! The result ring: fixed-size slots in shared memory, one per task in flight.
//!
//! # Protocol
//!
//! The parent owns slot allocation: a slot is handed to exactly one task at a
//! time and is returned to the free list only after that task's worker has been
//! reaped, so no live process but that worker *should* write it. Each task has
//! a generation number `generation`, unique for the zygote's life, and a secret `key`
//! that only the parent and that worker know.
//!
//! Slot layout, in 64-bit words (all accessed atomically, see [`crate::shm`]):
//!
//! | word | written by | meaning                                                   |
//! |-----:|------------|-----------------------------------------------------------|
//! | 0    | worker     | `commit`: the `generation` of the record below, stored last (Release) |
//! | 1..5 | worker     | record header `[generation, kind, len, mac]` ([`crate::wire`]) |
//! | 5..8 | nobody     | reserved, zero                                            |
//! | 8..  | worker     | payload bytes, little-endian within each word             |
//!
//! Each slot is a whole number of pages, so that a worker can keep only its
//! own slot mapped ([`Ring::isolate`], SAFETY.md S4): a worker never maps
//! another task's slot while its task's code runs (except in reuse mode,
//! between a reused worker's tasks; see `worker::isolate`).
//!
//! The worker writes the payload and the header with Relaxed stores, then
//! stores `generation` into `commit` with Release; it is its last write to the slot.
//! The parent loads `commit` with Acquire and proceeds only when it equals its
//! task's `generation`: that load synchronises with the worker's Release store, so the
//! payload and header are visible. The parent then copies header and payload
//! out with Relaxed loads, issues an Acquire fence and re-reads `commit` (the
//! seqlock reader's check): if another process rewrote the slot meanwhile, the
//! copy is discarded. Only the copy is validated and decoded, never the shared
//! bytes (SAFETY.md S3).
//!
//! A worker killed half-way through its write never stores `commit`, so its
//! torn record is never read; a record left by an earlier task carries an older
//! `generation` and is never taken for a later task's; a record whose words were
//! scribbled on fails the mac.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::shm::SharedWords;
use crate::sync::{AtomicU64, Ordering, fence};
use crate::sys::SysResult;
use crate::wire::{self, RECORD_HEADER_WORDS, RecordHeader, RecordKind, WireError};

/// Words before the payload in every slot.
const SLOT_HEADER_WORDS: usize = 8;

/// The ring of result slots, mapped in the parent, the zygote and every worker.
pub(crate) struct Ring {
    mem: SharedWords,
    /// Number of slots, `1..=u32::MAX`.
    slots: u32,
    /// Words per slot, header included; `> SLOT_HEADER_WORDS`.
    slot_words: usize,
}

/// Words per slot for `payload_bytes` of payload: header and payload, rounded
/// up to whole pages.
fn slot_words(payload_bytes: usize) -> usize {
    let page_words = rustix::param::page_size() / 8;
    (SLOT_HEADER_WORDS + payload_bytes.div_ceil(8).max(1)).div_ceil(page_words) * page_words
}

impl Ring {
    /// Creates a ring of `slots` slots with at least `payload_bytes` of payload
    /// capacity each: each slot, header and payload, fills whole pages (see
    /// [`Ring::isolate`]), so the capacity is rounded up to that.
    pub(crate) fn create(slots: u32, payload_bytes: usize) -> SysResult<(Ring, OwnedFd)> {
        let slot_words = slot_words(payload_bytes);
        let (mem, fd) = SharedWords::create("run-in-process-ring", slots as usize * slot_words)?;
        Ok((
            Ring {
                mem,
                slots,
                slot_words,
            },
            fd,
        ))
    }

    /// Maps the ring `create` made (with the same sizes), from its memfd,
    /// in a zygote forked by the template (`crate::template`).
    pub(crate) fn open(fd: BorrowedFd<'_>, slots: u32, payload_bytes: usize) -> SysResult<Ring> {
        let slot_words = slot_words(payload_bytes);
        Ok(Ring {
            mem: SharedWords::open(fd, slots as usize * slot_words)?,
            slots,
            slot_words,
        })
    }

    /// See [`SharedWords::keep_from_forks`].
    pub(crate) fn keep_from_forks(&self) -> SysResult<()> {
        self.mem.keep_from_forks()
    }

    /// See [`SharedWords::adopt`].
    pub(crate) fn adopt(&self) {
        self.mem.adopt();
    }

    /// See [`SharedWords::is_own`].
    pub(crate) fn is_own(&self) -> bool {
        self.mem.is_own()
    }

    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    /// The words of slot `index`, or `None` if out of range or not mapped
    /// here (after [`Ring::isolate`], every slot but one).
    #[cfg(not(loom))]
    pub(crate) fn slot(&self, index: u32) -> Option<Slot<'_>> {
        if index >= self.slots {
            return None;
        }
        self.mem
            .range(index as usize * self.slot_words, self.slot_words)
            .map(|words| Slot { words })
    }

    /// Slot isolation, in a worker: keeps only slot `index` of the ring
    /// mapped in this process (`SharedWords::keep_only`), so that nothing the
    /// task does to memory it can reach changes another task's slot.
    /// Slots are whole pages (see [`Ring::create`]), so the others can go
    /// without touching this one.
    ///
    /// # Safety
    ///
    /// No [`Slot`] of this ring but slot `index`'s may be live in this
    /// process, now or later (later [`Ring::slot`] calls return `None` for
    /// them).
    pub(crate) unsafe fn isolate(&self, index: u32) -> SysResult<()> {
        // Out of range: `keep_only` refuses it.
        let start = (index as usize).saturating_mul(self.slot_words);
        // SAFETY: SAFETY.md S4. Every slice of the ring's words is handed
        // out inside a `Slot`, and the caller promises that none outside
        // slot `index` is live.
        unsafe { self.mem.keep_only(start, self.slot_words) }
    }

    /// Under `--cfg loom` a slot's words are loom's atomics, which cannot
    /// overlay a mapping: only the heap-backed slots of `ring::model` exist.
    #[cfg(loom)]
    pub(crate) fn slot(&self, _index: u32) -> Option<Slot<'_>> {
        let _ = (self.slots, self.slot_words);
        None
    }
}

/// One slot of the ring.
pub(crate) struct Slot<'a> {
    /// `SLOT_HEADER_WORDS + capacity / 8` words.
    words: &'a [AtomicU64],
}

/// A record copied out of a slot and validated.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) kind: RecordKind,
    /// For [`RecordKind::Spilled`], the announced length of the spilled bytes.
    pub(crate) len: u64,
    /// The payload bytes (empty for a spilled record).
    pub(crate) payload: Vec<u8>,
}

impl<'a> Slot<'a> {
    /// A slot over arbitrary words (tests and fuzzing: a heap-backed slot
    /// behaves exactly like a mapped one). `None` if too short for a header.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn over(words: &'a [AtomicU64]) -> Option<Slot<'a>> {
        (words.len() > SLOT_HEADER_WORDS).then_some(Slot { words })
    }

    fn commit(&self) -> &AtomicU64 {
        &self.words[0]
    }

    fn payload_words(&self) -> &[AtomicU64] {
        &self.words[SLOT_HEADER_WORDS..]
    }

    /// Payload capacity in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.payload_words().len() * 8
    }

    /// Worker side: writes a record for task `generation` and commits it.
    ///
    /// The caller must have checked `payload.len() <= self.capacity()`; a
    /// longer payload is cut (and would then fail the parent's mac).
    pub(crate) fn publish(&self, key: u64, generation: u64, kind: RecordKind, payload: &[u8]) {
        self.write(key, generation, kind, payload.len() as u64, payload);
    }

    /// Worker side: commits a record saying the result of `len` bytes was
    /// spilled to a sealed memfd.
    pub(crate) fn publish_spilled(&self, key: u64, generation: u64, len: u64) {
        self.write(key, generation, RecordKind::Spilled, len, &[]);
    }

    fn write(&self, key: u64, generation: u64, kind: RecordKind, len: u64, payload: &[u8]) {
        debug_assert!(payload.len() <= self.capacity());
        let words = self.payload_words();
        for (word, chunk) in words.iter().zip(payload.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
        let header = wire::encode_record_header(key, generation, kind, len, payload);
        for (word, value) in self.words[1..=RECORD_HEADER_WORDS].iter().zip(header) {
            word.store(value, Ordering::Relaxed);
        }
        // Release: pairs with the Acquire load in `committed`/`take`, making
        // every store above visible to a parent that sees `generation` here.
        self.commit().store(generation, Ordering::Release);
    }

    /// Parent side: has the record for `generation` been committed?
    pub(crate) fn committed(&self, generation: u64) -> bool {
        // Acquire: synchronises with the worker's Release store in `publish`.
        self.commit().load(Ordering::Acquire) == generation
    }

    /// Parent side: copies out, validates and returns the record of task `generation`.
    ///
    /// Returns `Ok(None)` if the record is not committed yet. Never trusts a
    /// byte of shared memory that it has not copied and checked first.
    pub(crate) fn take(
        &self,
        key: u64,
        generation: u64,
        spill_limit: u64,
    ) -> Result<Option<Taken>, WireError> {
        if !self.committed(generation) {
            return Ok(None);
        }
        let mut header = [0u64; RECORD_HEADER_WORDS];
        for (h, word) in header.iter_mut().zip(&self.words[1..=RECORD_HEADER_WORDS]) {
            *h = word.load(Ordering::Relaxed);
        }
        let capacity = self.capacity() as u64;
        let header: RecordHeader =
            wire::decode_record_header(header, generation, capacity, spill_limit)?;
        let inline_len = if header.kind == RecordKind::Spilled {
            0
        } else {
            // Bounded by `capacity` in `decode_record_header`.
            header.len as usize
        };
        let mut payload = Vec::with_capacity(inline_len);
        for word in self.payload_words().iter().take(inline_len.div_ceil(8)) {
            payload.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        payload.truncate(inline_len);
        // Seqlock-style re-check: the fence orders the loads above before the
        // load below, so if `commit` still holds `generation`, no *complete* rewrite
        // of the slot happened during the copy. Partial scribbles are caught
        // by the mac.
        fence(Ordering::Acquire);
        let now = self.commit().load(Ordering::Relaxed);
        if now != generation {
            return Err(WireError::Stale {
                expected: generation,
                found: now,
            });
        }
        wire::verify_record(key, generation, &header, &payload)?;
        Ok(Some(Taken {
            kind: header.kind,
            len: header.len,
            payload,
        }))
    }

    /// Test helper: overwrite raw words, as a hostile worker could.
    #[cfg(test)]
    fn scribble(&self, index: usize, value: u64) {
        self.words[index].store(value, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Ring {
        Ring::create(4, 64).unwrap().0
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a memfd mapping; ring::model covers heap-backed slots
    fn published_record_is_taken_exactly_as_written() {
        let r = ring();
        let s = r.slot(2).unwrap();
        assert!(s.take(9, 1, 0).unwrap().is_none());
        s.publish(9, 1, RecordKind::Value, b"abcdefghij");
        let t = s.take(9, 1, 0).unwrap().unwrap();
        assert_eq!(
            (t.kind, t.payload.as_slice()),
            (RecordKind::Value, &b"abcdefghij"[..])
        );
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a memfd mapping; ring::model covers heap-backed slots
    fn stale_generation_is_never_delivered() {
        let r = ring();
        let s = r.slot(0).unwrap();
        s.publish(9, 1, RecordKind::Value, b"old");
        assert!(s.take(9, 2, 0).unwrap().is_none());
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a memfd mapping; ring::model covers heap-backed slots
    fn scribbled_payload_or_wrong_key_fails() {
        let r = ring();
        let s = r.slot(1).unwrap();
        s.publish(9, 3, RecordKind::Value, b"payload!");
        s.scribble(SLOT_HEADER_WORDS, 0x4141);
        assert_eq!(s.take(9, 3, 0).unwrap_err(), WireError::Mac);
        s.publish(9, 3, RecordKind::Value, b"payload!");
        assert_eq!(s.take(10, 3, 0).unwrap_err(), WireError::Mac);
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a memfd mapping; ring::model covers heap-backed slots
    fn huge_length_is_refused_without_allocating() {
        let r = ring();
        let s = r.slot(3).unwrap();
        s.publish(9, 4, RecordKind::Value, b"x");
        s.scribble(3, u64::MAX);
        assert_eq!(s.take(9, 4, 0).unwrap_err(), WireError::Length(u64::MAX));
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a memfd mapping; ring::model covers heap-backed slots
    fn slot_index_out_of_range_is_none() {
        assert!(ring().slot(4).is_none());
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a memfd mapping and mmap(MAP_FIXED); ring::model covers heap-backed slots
    fn slots_are_whole_pages_and_an_isolated_ring_keeps_only_its_slot() {
        let page = rustix::param::page_size();
        let r = ring();
        assert_eq!(r.slot_words * 8 % page, 0);
        assert!(r.slot(0).unwrap().capacity() >= 64);
        // SAFETY: SAFETY.md S4. No `Slot` of `r` is live.
        unsafe { r.isolate(2) }.unwrap();
        for i in [0, 1, 3] {
            assert!(r.slot(i).is_none(), "slot {i} is still handed out");
        }
        let s = r.slot(2).unwrap();
        s.publish(9, 5, RecordKind::Value, b"kept");
        assert_eq!(s.take(9, 5, 0).unwrap().unwrap().payload, b"kept");
        // SAFETY: as above; an out-of-range slot is refused.
        assert!(unsafe { ring().isolate(4) }.is_err());
    }
}
