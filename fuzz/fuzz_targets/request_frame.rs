//! Every socket frame (spawn request, report, spill notice), decoded as its
//! receiver decodes it. The frames are bounded by their fixed headers, so no
//! size limit is needed here.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_in_process_fuzz::request_frame(data);
});
