//! Arbitrary bytes decoded through the crate's serde codec; whatever decodes
//! must round-trip.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    if run_in_process_fuzz::codec_round_trip(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
