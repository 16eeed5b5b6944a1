//! Writes the seed corpus: `cargo run --example seed` (in `fuzz/`).
//!
//! Real frames from `run_in_process::fuzzing::sample_frames()` and encoded
//! sample values go to `corpus/<target>/seed-<n>`; the directories are
//! git-ignored except `regressions/`. Running it again rewrites the same files.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use run_in_process::fuzzing;

/// Key and generation the sample records were published with.
const RECORD_KEY: u64 = 77;
const RECORD_GENERATION: u64 = 5;

fn main() -> std::io::Result<()> {
    let mut seeds: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
    for (kind, frame) in fuzzing::sample_frames() {
        match kind {
            "request" | "report" | "spill" => seeds.entry("request_frame").or_default().push(frame),
            "record" => {
                let mut input = Vec::with_capacity(16 + frame.len());
                input.extend_from_slice(&RECORD_KEY.to_le_bytes());
                input.extend_from_slice(&RECORD_GENERATION.to_le_bytes());
                input.extend_from_slice(&frame);
                seeds.entry("ring_record").or_default().push(input);
            }
            other => panic!("sample_frames() returned a frame of unknown kind {other:?}"),
        }
    }
    for value in run_in_process_fuzz::sample_values() {
        let bytes = fuzzing::encode(&value).expect("sample values encode");
        seeds.entry("codec_round_trip").or_default().push(bytes);
    }
    // Byte strings on both sides of the size at which a Blob maps.
    let blobs: Vec<run_in_process::Blob> = [0, 3, 4095, 4096, 9000]
        .into_iter()
        .map(|len| vec![0xa5; len].into())
        .collect();
    let bytes = fuzzing::encode(&blobs).expect("blobs encode");
    seeds.entry("codec_round_trip").or_default().push(bytes);

    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, inputs) in &seeds {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir)?;
        for (n, input) in inputs.iter().enumerate() {
            fs::write(dir.join(format!("seed-{n}")), input)?;
        }
        println!("{}: {} seeds", dir.display(), inputs.len());
    }
    Ok(())
}
