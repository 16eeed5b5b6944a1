//! The logic of every fuzz target, as plain functions over the input bytes.
//!
//! The files in `fuzz_targets/` only wrap these in `fuzz_target!`, and the
//! main crate's `tests/fuzz_regressions.rs` includes this very file (with
//! `#[path]`) to replay `corpus/<target>/regressions/*` on the stable
//! toolchain, so a regression is replayed through exactly the code the fuzzer
//! ran. Keep this file free of anything but `std`, `serde` and
//! `run_in_process::fuzzing`.
//!
//! Each function returns `false` when the input is rejected (too large to be
//! worth running) and panics when it finds a bug.

use run_in_process::{Blob, fuzzing};
use serde::{Deserialize, Serialize};

/// Largest input a size-limited target runs; larger ones are rejected
/// (`Corpus::Reject`) rather than left to time out.
pub const MAX_INPUT: usize = 64 * 1024;

/// Fixed sizes of the report and spill frames (see `src/wire.rs`).
const REPORT_LEN: usize = 16;
const SPILL_LEN: usize = 24;
const REQUEST_HEADER: usize = 40;

/// `request_frame`: every frame the parent, the zygote and the workers
/// exchange over sockets, decoded as the receiving side decodes it.
pub fn request_frame(data: &[u8]) -> bool {
    if fuzzing::request(data) {
        assert!(data.len() >= REQUEST_HEADER, "accepted a short request");
    }
    if fuzzing::report(data) {
        assert_eq!(
            data.len(),
            REPORT_LEN,
            "accepted a report of the wrong size"
        );
    }
    if fuzzing::spill_notice(data) {
        assert_eq!(
            data.len(),
            SPILL_LEN,
            "accepted a spill notice of the wrong size"
        );
    }
    true
}

/// The key, generation, slot bytes and round-trip capacity `ring_record`
/// takes from its input: the first 16 bytes, when present, are the key and
/// the generation (u64 LE each) and the rest are the slot's words; shorter
/// inputs are all slot bytes, with key and generation 0. The capacity is
/// `8..=4096`, from the input's first byte.
pub fn split_ring_input(data: &[u8]) -> (u64, u64, &[u8], usize) {
    let head = data
        .split_first_chunk::<8>()
        .and_then(|(k, r)| r.split_first_chunk::<8>().map(|(g, r)| (k, g, r)));
    let (key, generation, rest) = match head {
        Some((k, g, rest)) => (u64::from_le_bytes(*k), u64::from_le_bytes(*g), rest),
        None => (0, 0, data),
    };
    let byte = data.first().copied().unwrap_or(0) as usize;
    let capacity = 8 + byte * (4096 - 8) / 255;
    (key, generation, rest, capacity)
}

/// `ring_record`: a result record taken out of arbitrary slot words, as the
/// parent takes it, then a publish/take round trip of the same bytes.
pub fn ring_record(data: &[u8]) -> bool {
    if data.len() > MAX_INPUT {
        return false;
    }
    let (key, generation, rest, capacity) = split_ring_input(data);
    let _ = fuzzing::record(rest, key, generation);
    let came_back = fuzzing::record_round_trip(rest, key, generation, capacity);
    if rest.len() <= capacity.div_ceil(8) * 8 {
        assert!(
            came_back,
            "a {}-byte payload did not survive a slot of capacity {capacity} \
             (key {key:#x}, generation {generation:#x})",
            rest.len()
        );
    }
    true
}

/// The value `codec_round_trip` decodes: every shape of serde data the
/// crate's callers commonly send (strings, sequences, options, enums of each
/// variant kind, nested tuples).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// A string.
    pub name: String,
    /// A sequence of varints.
    pub values: Vec<u32>,
    /// An option of a zigzag varint.
    pub offset: Option<i64>,
    /// An enum.
    pub shape: Shape,
    /// A sequence of tuples holding strings.
    pub pairs: Vec<(u8, String)>,
}

/// One enum variant of each kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shape {
    /// Unit variant.
    Empty,
    /// Newtype variant.
    Count(u16),
    /// Tuple variant.
    Pair(i8, bool),
    /// Struct variant.
    Named {
        /// A u64 varint.
        id: u64,
        /// A string.
        tag: String,
    },
}

/// `codec_round_trip`: decodes the input as a [`Sample`] through the crate's
/// codec; whatever decodes must encode, decode to the same value, and encode
/// to the same bytes again, never longer than the input it came from (a
/// decoder accepts any padding in a large string's pad marker, and the codec
/// writes none). The input is also decoded as byte strings from a sealed
/// mapping, as a large result is: each [`Blob`] must hold exactly the bytes a
/// plain decode gives, whether it points into the mapping or was copied.
pub fn codec_round_trip(data: &[u8]) -> bool {
    if data.len() > MAX_INPUT {
        return false;
    }
    // The same type both ways: a `Vec<u8>` is a sequence, which postcard
    // encodes as a byte string is only below the pad marker's threshold.
    let mapped = fuzzing::decode_sealed::<Vec<Blob>>(data);
    let copied = fuzzing::decode::<Vec<Blob>>(data);
    assert_eq!(
        mapped, copied,
        "byte strings decoded from a sealed mapping differ from a plain decode"
    );
    let Some(value) = fuzzing::decode::<Sample>(data) else {
        return true;
    };
    let bytes = fuzzing::encode(&value).expect("a decoded value must encode");
    assert!(
        bytes.len() <= data.len(),
        "the encoding of a decoded value is longer ({}) than its input ({})",
        bytes.len(),
        data.len()
    );
    let again =
        fuzzing::decode::<Sample>(&bytes).expect("the encoding of a decoded value must decode");
    assert_eq!(value, again, "the value changed in a round trip");
    assert_eq!(
        fuzzing::encode(&again).as_deref(),
        Some(&bytes[..]),
        "the encoding is not stable"
    );
    true
}

/// A few [`Sample`] values, for seeding `codec_round_trip`'s corpus.
pub fn sample_values() -> Vec<Sample> {
    vec![
        Sample {
            name: String::new(),
            values: vec![],
            offset: None,
            shape: Shape::Empty,
            pairs: vec![],
        },
        Sample {
            name: "hello".into(),
            values: vec![0, 1, 127, 128, u32::MAX],
            offset: Some(-1),
            shape: Shape::Count(300),
            pairs: vec![(1, "one".into()), (255, String::new())],
        },
        Sample {
            name: "ünïcødé ✓".into(),
            values: vec![42; 20],
            offset: Some(i64::MIN),
            shape: Shape::Pair(-128, true),
            pairs: vec![(0, "x".repeat(200))],
        },
        Sample {
            name: "named".into(),
            values: vec![7],
            offset: Some(i64::MAX),
            shape: Shape::Named {
                id: u64::MAX,
                tag: "tag".into(),
            },
            pairs: (0..10).map(|i| (i, i.to_string())).collect(),
        },
        // Strings long enough to carry a pad marker (4 KiB and more).
        Sample {
            name: "long".repeat(1250),
            values: vec![1, 2],
            offset: None,
            shape: Shape::Named {
                id: 3,
                tag: "t".repeat(4096),
            },
            pairs: vec![(4, "p".repeat(4095)), (5, "q".repeat(4097))],
        },
    ]
}
