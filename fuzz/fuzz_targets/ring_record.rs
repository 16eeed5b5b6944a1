//! A result record taken out of arbitrary ring-slot words, then a
//! publish/take round trip. Input: key (u64 LE), generation (u64 LE), slot
//! bytes; see `run_in_process_fuzz::split_ring_input`.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    if run_in_process_fuzz::ring_record(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
