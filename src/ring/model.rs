//! A model of the ring's publish/take protocol (docs/verification.md).
//!
//! Each scenario drives the real [`Slot::publish`] and [`Slot::take`] over a
//! small heap-backed ring (two slots of one payload word) from several
//! threads standing in for the parent and its workers, and asserts what the
//! protocol promises: a take delivers exactly the record its task's worker
//! committed, or nothing yet; a torn or stale record is never delivered; a
//! reused slot never hands a later task an earlier task's record.
//!
//! The same scenarios run three ways:
//!
//! * `scripts/loom.sh` (`--cfg loom`): loom runs each one under every
//!   interleaving of the threads and every value a load may return under the
//!   C++ memory model that loom tracks (no preemption bound by default);
//! * `scripts/miri.sh`: Miri runs them on real threads, checking for
//!   undefined behaviour and data races, with its weak-memory emulation;
//! * plain `cargo test`: once each, on real threads, as a smoke test.

use super::{SLOT_HEADER_WORDS, Slot, Taken};
use crate::sync::{AtomicU64, Ordering};
use crate::wire::{self, RecordKind, WireError};

#[cfg(loom)]
use loom::{model, sync::Arc, thread};
#[cfg(not(loom))]
use std::{sync::Arc, thread};

/// Outside loom a scenario runs once.
#[cfg(not(loom))]
fn model(scenario: impl Fn()) {
    scenario();
}

/// Payload words per slot: one is enough for every store and load of the
/// protocol to be interleaved, and keeps loom's search small.
const PAYLOAD_WORDS: usize = 1;
const SLOT_WORDS: usize = SLOT_HEADER_WORDS + PAYLOAD_WORDS;
const SLOTS: usize = 2;
/// A spilled record may announce up to this many bytes.
const SPILL_LIMIT: u64 = 1 << 20;

/// Heap-backed ring memory: what the memfd mapping is in production.
struct Memory {
    words: Vec<AtomicU64>,
}

impl Memory {
    fn new() -> Arc<Memory> {
        Arc::new(Memory {
            words: (0..SLOTS * SLOT_WORDS).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn slot(&self, index: usize) -> Slot<'_> {
        let words = &self.words[index * SLOT_WORDS..(index + 1) * SLOT_WORDS];
        Slot::over(words).expect("a slot has room for its header")
    }
}

/// The record task `generation`'s worker publishes: its key and contents.
#[derive(Clone, Copy)]
struct Record {
    generation: u64,
    key: u64,
    kind: RecordKind,
    len: u64,
    payload: &'static [u8],
}

impl Record {
    fn value(generation: u64, payload: &'static [u8]) -> Record {
        Record {
            generation,
            key: 0x9e37_79b9_7f4a_7c15 ^ generation.wrapping_mul(0xbf58_476d_1ce4_e5b9),
            kind: RecordKind::Value,
            len: payload.len() as u64,
            payload,
        }
    }

    fn spilled(generation: u64, len: u64) -> Record {
        Record {
            kind: RecordKind::Spilled,
            len,
            payload: &[],
            ..Record::value(generation, &[])
        }
    }

    /// The worker's side, through the real code.
    fn publish(&self, slot: &Slot<'_>) {
        match self.kind {
            RecordKind::Spilled => slot.publish_spilled(self.key, self.generation, self.len),
            kind => slot.publish(self.key, self.generation, kind, self.payload),
        }
    }

    /// The stores `Slot::write` makes, in its order, as `(word, value)`:
    /// payload, header, then `commit` last. A worker killed half-way made a
    /// prefix of these.
    fn stores(&self) -> Vec<(usize, u64)> {
        let mut stores = Vec::new();
        for (i, chunk) in self.payload.chunks(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            stores.push((SLOT_HEADER_WORDS + i, u64::from_le_bytes(bytes)));
        }
        let header = wire::encode_record_header(
            self.key,
            self.generation,
            self.kind,
            self.len,
            self.payload,
        );
        stores.extend(header.into_iter().enumerate().map(|(i, w)| (1 + i, w)));
        stores.push((0, self.generation));
        stores
    }

    /// The parent's side, through the real code.
    fn take(&self, slot: &Slot<'_>) -> Result<Option<Taken>, WireError> {
        slot.take(self.key, self.generation, SPILL_LIMIT)
    }

    fn is(&self, taken: &Taken) -> bool {
        taken.kind == self.kind && taken.len == self.len && taken.payload == self.payload
    }

    /// A take while the worker may still be writing: nothing yet, or
    /// exactly this record. Never an error: only this worker writes.
    fn assert_take_racing_own_worker(&self, slot: &Slot<'_>) {
        match self.take(slot) {
            Ok(None) => {}
            Ok(Some(taken)) => assert!(self.is(&taken), "gen {}: {taken:?}", self.generation),
            Err(e) => panic!(
                "gen {}: a lone writer's record failed: {e}",
                self.generation
            ),
        }
    }

    /// A take once the worker is reaped: exactly this record.
    fn assert_taken(&self, slot: &Slot<'_>) {
        match self.take(slot) {
            Ok(Some(taken)) => assert!(self.is(&taken), "gen {}: {taken:?}", self.generation),
            other => panic!(
                "gen {}: committed record not taken: {other:?}",
                self.generation
            ),
        }
    }
}

const ONE: &[u8] = b"first!!!";
const THREE: &[u8] = b"third";

/// A worker publishes while the parent polls its slot.
#[test]
fn a_take_racing_the_publish_sees_nothing_or_the_whole_record() {
    model(|| {
        let memory = Memory::new();
        let record = Record::value(1, ONE);
        let worker = thread::spawn({
            let memory = memory.clone();
            move || record.publish(&memory.slot(0))
        });
        record.assert_take_racing_own_worker(&memory.slot(0));
        worker.join().unwrap();
        record.assert_taken(&memory.slot(0));
    });
}

/// A worker killed after any prefix of its stores (it never reaches the
/// commit) leaves a record that is never delivered, over an empty slot or
/// over the committed record of the slot's previous task.
#[test]
fn a_torn_record_is_never_delivered() {
    let record = Record::value(3, THREE);
    let stores = record.stores();
    for over_previous in [false, true] {
        for cut in 0..stores.len() {
            model(move || {
                let memory = Memory::new();
                let previous = Record::value(1, ONE);
                if over_previous {
                    previous.publish(&memory.slot(0));
                    previous.assert_taken(&memory.slot(0));
                }
                let worker = thread::spawn({
                    let memory = memory.clone();
                    move || {
                        let words = memory.slot(0).words;
                        for &(word, value) in &record.stores()[..cut] {
                            words[word].store(value, Ordering::Relaxed);
                        }
                    }
                });
                assert!(matches!(record.take(&memory.slot(0)), Ok(None)));
                worker.join().unwrap();
                assert!(matches!(record.take(&memory.slot(0)), Ok(None)));
            });
        }
    }
}

/// Two tasks in flight on two slots; once the first is reaped its slot is
/// leased to a third task while the second still runs. Every take sees
/// nothing yet or its own task's record, never the slot's previous record.
#[test]
fn a_reused_slot_never_delivers_the_previous_generation() {
    model(|| {
        let memory = Memory::new();
        let first = Record::value(1, ONE);
        let second = Record::spilled(2, 4096);
        let third = Record::value(3, THREE);
        let spawn = |record: Record, slot: usize| {
            let memory = memory.clone();
            thread::spawn(move || record.publish(&memory.slot(slot)))
        };
        let a = spawn(first, 0);
        let b = spawn(second, 1);
        first.assert_take_racing_own_worker(&memory.slot(0));
        a.join().unwrap();
        first.assert_taken(&memory.slot(0));
        // The first worker is reaped: slot 0 goes to the third task.
        let c = spawn(third, 0);
        third.assert_take_racing_own_worker(&memory.slot(0));
        second.assert_take_racing_own_worker(&memory.slot(1));
        b.join().unwrap();
        c.join().unwrap();
        second.assert_taken(&memory.slot(1));
        third.assert_taken(&memory.slot(0));
    });
}

/// A hostile process that knows an earlier task's key rewrites the slot,
/// commit and all, while the parent copies the current task's record out.
/// The take may fail (stale or torn); it never delivers anything but the
/// current record.
#[test]
fn a_rewrite_during_the_copy_is_caught() {
    model(|| {
        let memory = Memory::new();
        let current = Record::value(3, THREE);
        current.publish(&memory.slot(0));
        let hostile = thread::spawn({
            let memory = memory.clone();
            move || Record::value(1, ONE).publish(&memory.slot(0))
        });
        match current.take(&memory.slot(0)) {
            Ok(Some(taken)) => assert!(current.is(&taken), "{taken:?}"),
            Ok(None) | Err(WireError::Stale { .. } | WireError::Mac) => {}
            Err(e) => panic!("unexpected failure: {e}"),
        }
        hostile.join().unwrap();
        assert!(matches!(current.take(&memory.slot(0)), Ok(None)));
    });
}

/// The torn-write scenario replays `Record::stores`: check that it is
/// exactly what `publish` writes.
#[test]
fn the_modelled_stores_are_the_ones_publish_makes() {
    model(|| {
        for record in [Record::value(1, ONE), Record::spilled(2, 4096)] {
            let published = Memory::new();
            record.publish(&published.slot(0));
            let replayed = Memory::new();
            for (word, value) in record.stores() {
                replayed.slot(0).words[word].store(value, Ordering::Relaxed);
            }
            let load = |m: &Memory| -> Vec<u64> {
                m.words.iter().map(|w| w.load(Ordering::Relaxed)).collect()
            };
            assert_eq!(load(&published), load(&replayed));
        }
    });
}
