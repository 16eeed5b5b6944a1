//! A task's span and its worker's events, printed by `tracing-subscriber`'s
//! `fmt` layer in the parent.
//!
//! `cargo run --example tracing --features tracing`

use run_in_process::Zygote;
use tracing_subscriber::fmt::format::FmtSpan;

fn checksum(data: Vec<u8>) -> u32 {
    // Emitted in the worker, printed by the parent inside the task's span.
    tracing::info!(len = data.len(), "summing");
    data.iter().map(|&b| u32::from(b)).sum()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let zygote = Zygote::start()?; // before the runtime and the subscriber
    tracing_subscriber::fmt()
        .with_span_events(FmtSpan::CLOSE)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    let sum = rt.block_on(zygote.run(checksum, vec![1, 2, 3]))?;
    assert_eq!(sum, 6);
    Ok(())
}
