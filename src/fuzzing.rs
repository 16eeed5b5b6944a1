//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not a
//! public API, no stability promise). Each function runs one decoder over
//! arbitrary bytes exactly as the crate does with bytes from another process,
//! and returns whether the input was accepted. None of them may panic,
//! allocate past the stated limit, or loop on a count taken from the input.

use std::sync::atomic::AtomicU64;

use crate::ring::Slot;
use crate::wire::{Report, Request, SpillNotice};

/// Largest payload the fuzz entry points accept, so a run never needs more.
pub const LIMIT: usize = 1 << 20;

/// Decodes a spawn request frame as the zygote does.
pub fn request(frame: &[u8]) -> bool {
    Request::decode(frame, 64, LIMIT as u64).is_ok()
}

/// Decodes a report frame as the parent does.
pub fn report(frame: &[u8]) -> bool {
    Report::decode(frame).is_ok()
}

/// Decodes a spill notice as the parent does.
pub fn spill_notice(frame: &[u8]) -> bool {
    SpillNotice::decode(frame).is_ok()
}

/// Takes a result record out of a slot whose words are `bytes` (little-endian,
/// zero-padded), as the parent does, for task `generation` with `key`.
pub fn record(bytes: &[u8], key: u64, generation: u64) -> bool {
    let words: Vec<AtomicU64> = bytes
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            AtomicU64::new(u64::from_le_bytes(w))
        })
        .collect();
    match Slot::over(&words) {
        Some(slot) => matches!(slot.take(key, generation, LIMIT as u64), Ok(Some(_))),
        None => false,
    }
}

/// Publishes `payload` into a heap-backed slot of `capacity` bytes and takes
/// it back; returns whether the bytes came back unchanged (they must, when
/// the payload fits).
pub fn record_round_trip(payload: &[u8], key: u64, generation: u64, capacity: usize) -> bool {
    let words: Vec<AtomicU64> = (0..8 + capacity.div_ceil(8))
        .map(|_| AtomicU64::new(0))
        .collect();
    let Some(slot) = Slot::over(&words) else {
        return false;
    };
    if payload.len() > slot.capacity() {
        return false;
    }
    slot.publish(key, generation, crate::wire::RecordKind::Value, payload);
    matches!(slot.take(key, generation, 0), Ok(Some(t)) if t.payload == payload)
}

/// Decodes `bytes` as a `T` through the crate's codec path, with [`LIMIT`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    crate::codec::decode(bytes, LIMIT).ok()
}

/// Decodes `bytes` as the parent decodes a spilled result: from a read-only
/// mapping of a sealed memfd holding them, with that mapping as the source of
/// any [`Blob`](crate::Blob) in `T`.
pub fn decode_sealed<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    use std::os::fd::AsFd;
    let fd = crate::shm::sealed_copy(bytes).expect("a sealed memfd");
    let len = bytes.len() as u64;
    let sealed = crate::shm::SealedBytes::open(fd.as_fd(), len, LIMIT as u64).ok()?;
    crate::blob::decoding_from(&sealed, || crate::codec::decode(sealed.bytes(), LIMIT).ok())
}

/// Encodes `value` through the crate's codec path, both ways it is used: into
/// a `Vec`, and streamed through the payload writer with an inline room of 16
/// bytes (so most values spill into a sealed memfd). Panics if the two
/// disagree: the streamed bytes must equal the `Vec`'s except for padding
/// (the writer pads large strings, the `Vec` never does), so they must be no
/// shorter and must decode, as the receiver decodes them, to `value`.
pub fn encode<T>(value: &T) -> Option<Vec<u8>>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    use std::os::fd::AsFd;
    let direct = crate::codec::encode(value).ok()?;
    let streamed = match crate::payload::Payload::encode(value, "fuzz", 16, LIMIT as u64) {
        Ok(crate::payload::Payload::Inline(bytes)) => bytes,
        Ok(crate::payload::Payload::Sealed { fd, len }) => {
            crate::shm::SealedBytes::open(fd.as_fd(), len, LIMIT as u64)
                .expect("the writer seals what it spills")
                .bytes()
                .to_vec()
        }
        Err(e) => panic!("the payload writer failed where the codec did not: {e}"),
    };
    if streamed != direct {
        assert!(
            streamed.len() > direct.len(),
            "streamed encoding differs from the codec's, and is not longer"
        );
        let back = decode_sealed::<T>(&streamed).expect("the streamed encoding decodes");
        assert_eq!(
            &back, value,
            "the streamed encoding decodes to another value"
        );
    }
    Some(direct)
}

/// Real frames of every kind, for seeding the corpora.
pub fn sample_frames() -> Vec<(&'static str, Vec<u8>)> {
    use crate::wire::ArgPlace;
    let mut out = Vec::new();
    for (i, arg) in [&b""[..], b"\x05hello", &[7u8; 300]].iter().enumerate() {
        let req = Request {
            generation: 1 + i as u64,
            want_started: i % 2 == 0,
            last: false,
            same_doorbell: false,
            pair: 0,
            pooled_report: false,
            entry: 0x5555_5555_1000 + i as u64,
            slot: i as u32,
            arg: ArgPlace::Inline(arg.len() as u64),
            worker: if i == 1 { 4242 } else { 0 },
            trace: 0,
            confinement: crate::confine::Confinement::default(),
            io: crate::wire::IoPlan::default(),
        };
        out.push(("request", req.encode(arg)));
    }
    let memfd = Request {
        generation: 9,
        want_started: true,
        last: false,
        same_doorbell: false,
        pair: 0,
        pooled_report: false,
        entry: 0x5555_5555_2000,
        slot: 3,
        arg: ArgPlace::Memfd(1 << 20),
        worker: 0,
        trace: 0,
        confinement: crate::confine::Confinement {
            memory: Some(64 << 20),
            cpu_secs: Some(1),
            open_files: Some(16),
            core_dumps: false,
            sandbox: Some(
                crate::Sandbox::new()
                    .deny_network()
                    .deny_exec()
                    .deny_fs_writes(),
            ),
        },
        io: crate::wire::IoPlan {
            env: true,
            stdout: crate::wire::Stdio::Pipe,
            stderr: crate::wire::Stdio::Null,
        },
    };
    out.push(("request", memfd.encode(&[])));
    for r in [
        Report::Started { pid: 4242 },
        Report::Exited { status: 0x0300 },
        Report::Exited { status: 9 },
        Report::SpawnFailed { errno: 11 },
    ] {
        out.push(("report", r.encode().to_vec()));
    }
    out.push((
        "spill",
        SpillNotice {
            generation: 5,
            tag: SpillNotice::tag_for(77, 5, 1 << 20),
        }
        .encode()
        .to_vec(),
    ));
    for payload in [&b""[..], b"\x2a", b"a longer payload of several words"] {
        let words: Vec<AtomicU64> = (0..8 + 8).map(|_| AtomicU64::new(0)).collect();
        if let Some(slot) = Slot::over(&words) {
            slot.publish(77, 5, crate::wire::RecordKind::Value, payload);
            let bytes = words
                .iter()
                .flat_map(|w| w.load(std::sync::atomic::Ordering::Relaxed).to_le_bytes())
                .collect();
            out.push(("record", bytes));
        }
    }
    out
}
