//! A task that calls into C and crashes: the parent gets the crash as an
//! `Error`, with what the task wrote to stderr just before it.
//!
//! Run with `cargo run --release --example capture`.

use run_in_process::{ErrorKind, Output, Zygote};

const LAST_WORDS: &[u8] = b"libfoo: checksum mismatch in block 7, aborting\n";

/// Stands in for a C library that reports a fatal error on stderr and
/// aborts, as many do.
fn call_into_c(block: u32) -> u32 {
    if block == 7 {
        // SAFETY: `write` reads `LAST_WORDS.len()` bytes from a valid static
        // slice, and fd 2 is the worker's stderr.
        unsafe { libc::write(2, LAST_WORDS.as_ptr().cast(), LAST_WORDS.len()) };
        // SAFETY: `abort` has no preconditions; it ends the worker process.
        unsafe { libc::abort() }
    }
    println!("block {block} is fine");
    block
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before any thread or runtime exists.
    let zygote = Zygote::start()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let ok = zygote.task(call_into_c, 3).run_captured().await?;
        println!(
            "task returned {} and printed {:?}",
            ok.value,
            String::from_utf8_lossy(&ok.stdout)
        );
        let e = zygote
            .task(call_into_c, 7)
            .stderr(Output::Capture)
            .run()
            .await
            .expect_err("block 7 aborts");
        println!("task failed: {e}");
        println!(
            "its last words: {:?}",
            String::from_utf8_lossy(e.stderr().unwrap_or_default())
        );
        assert_eq!(e.kind(), ErrorKind::Signaled);
        assert_eq!(e.stderr(), Some(LAST_WORDS));
        Ok(())
    })
}
