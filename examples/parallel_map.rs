//! A bounded parallel map over a few thousand inputs, with a progress bar.
//!
//! `cargo run --release --example parallel_map`
//!
//! Each input is parsed in a worker process of its own, so a parser that
//! panics or crashes on a bad input fails that input only. At most
//! `max_in_flight` tasks run at once, and results come back in input order.

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use run_in_process::Zygote;

/// A deliberately fragile parser: every 500th input is malformed and
/// makes it panic.
fn parse(line: String) -> u64 {
    line.split(',')
        .map(|field| field.trim().parse::<u64>().expect("a number"))
        .sum()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before the runtime and the progress bar, while there is one thread.
    let zygote = Zygote::builder().max_in_flight(8).reuse(100).start()?;
    let inputs: Vec<String> = (0..5_000u64)
        .map(|i| {
            if i % 500 == 499 {
                format!("{i}, not a number")
            } else {
                format!("{i}, {}, {}", i * 2, i * 3)
            }
        })
        .collect();
    let bar = ProgressBar::new(inputs.len() as u64).with_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} inputs, {per_sec}, {msg}",
    )?);
    let (mut total, mut failed) = (0u64, 0u64);
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut results = zygote.map(parse, inputs);
        while let Some(result) = results.next().await {
            match result {
                Ok(sum) => total += sum,
                Err(_) => failed += 1,
            }
            bar.inc(1);
            let stats = zygote.stats();
            bar.set_message(format!(
                "{} panicked, {} running, {} workers",
                stats.panicked, stats.in_flight, stats.workers
            ));
        }
    });
    bar.finish();
    println!("sum of the good inputs: {total}; {failed} inputs failed in their own process");
    assert_eq!(failed, 10);
    Ok(())
}
