//! Replays the fuzzers' regressions on the stable toolchain, without libFuzzer.
//!
//! Every file in `fuzz/corpus/<target>/regressions/` (except `README.md`,
//! which gives each one's root cause) is fed to the logic of fuzz target
//! `<target>`. That logic is `fuzz/src/lib.rs`, included below as a module, so
//! the replay runs exactly the code the fuzzer ran. Needs the `fuzzing`
//! feature: `cargo test --features fuzzing --test fuzz_regressions`.
#![cfg(feature = "fuzzing")]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

// The fuzz crate's library: plain functions over `run_in_process::fuzzing`
// and serde. `sample_values` and `split_ring_input` are used by the fuzz crate
// too, hence `pub`, which is unreachable from this test crate.
#[allow(unreachable_pub, dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

/// A target's logic: `false` when the input is rejected (too large to run).
type Target = fn(&[u8]) -> bool;

/// Every fuzz target, by its name in `fuzz/Cargo.toml`; each has a test below.
const TARGETS: &[&str] = &["request_frame", "ring_record", "codec_round_trip"];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// The regression inputs of `target`, sorted; `README.md` and dotfiles
/// (`.gitkeep` and the like) are not inputs.
fn regressions(target: &str) -> Vec<PathBuf> {
    let dir = corpus().join(target).join("regressions");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("read a directory entry").path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            path.is_file() && name != "README.md" && !name.starts_with('.')
        })
        .collect();
    files.sort();
    files
}

/// Feeds every regression of `target` to `run`; fails naming every input that
/// panicked or that the target rejects (and so would never run).
fn replay(target: &str, run: Target) {
    let files = regressions(target);
    assert!(
        !files.is_empty(),
        "no regression inputs for {target}: the replay would test nothing"
    );
    let mut failures = Vec::new();
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        match catch_unwind(AssertUnwindSafe(|| run(&data))) {
            Ok(true) => {}
            Ok(false) => failures.push(format!(
                "{}: rejected as too large, so it tests nothing",
                path.display()
            )),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                failures.push(format!("{}: panicked: {message}", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} regressions failed (see fuzz/corpus/{target}/regressions/README.md):\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn request_frame_regressions() {
    replay("request_frame", targets::request_frame);
}

#[test]
fn ring_record_regressions() {
    replay("ring_record", targets::ring_record);
}

#[test]
fn codec_round_trip_regressions() {
    replay("codec_round_trip", targets::codec_round_trip);
}

/// A target added to `fuzz/` with a `regressions/` directory must be added to
/// [`TARGETS`] and replayed here too.
#[test]
fn every_regressions_directory_is_replayed() {
    for entry in std::fs::read_dir(corpus()).expect("read fuzz/corpus") {
        let dir = entry.expect("read a directory entry").path();
        if !dir.join("regressions").is_dir() {
            continue;
        }
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(
            TARGETS.contains(&name),
            "fuzz/corpus/{name}/regressions/ exists but no test here replays it"
        );
    }
}

/// The seed values of `codec_round_trip` round-trip (a check of the target's
/// own oracle on inputs known to decode).
#[test]
fn codec_seed_values_round_trip() {
    for value in targets::sample_values() {
        let bytes = run_in_process::fuzzing::encode(&value).expect("sample values encode");
        assert_eq!(
            run_in_process::fuzzing::decode::<targets::Sample>(&bytes),
            Some(value)
        );
        assert!(targets::codec_round_trip(&bytes));
    }
}
