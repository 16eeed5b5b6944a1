//! Reuse mode: many small tasks, each worker serving a thousand of them.
//!
//! `cargo run --release --example reuse`
//!
//! It shows what reuse buys (throughput against a fresh process per task),
//! what it gives up (a global set by one task is seen by the next task of
//! the same worker), and what it keeps: a task that panics retires its
//! worker, and `Task::fresh` forces a process that has run nothing before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::StreamExt;
use run_in_process::{ErrorKind, Zygote};

/// Tasks this worker process has run, counting this one.
static RUN_HERE: AtomicU64 = AtomicU64::new(0);

fn count(_: ()) -> (u32, u64) {
    let pid = std::process::id();
    (pid, RUN_HERE.fetch_add(1, Ordering::Relaxed) + 1)
}

fn checksum(data: Vec<u8>) -> u32 {
    data.iter().map(|&b| u32::from(b)).sum()
}

fn fail(_: ()) -> u32 {
    panic!("a bad input")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Both zygotes are started before the runtime, while there is one thread.
    let fresh = Zygote::builder().max_in_flight(8).start()?;
    let reused = Zygote::builder().max_in_flight(8).reuse(1000).start()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let inputs: Vec<Vec<u8>> = (0..20_000u32).map(|i| i.to_le_bytes().repeat(8)).collect();
            for (name, zygote) in [("fresh per task", &fresh), ("reuse(1000)", &reused)] {
                let started = Instant::now();
                let mut results = zygote.map(checksum, inputs.clone());
                let mut n = 0u64;
                while let Some(sum) = results.next().await {
                    sum?;
                    n += 1;
                }
                let rate = n as f64 / started.elapsed().as_secs_f64();
                println!("{name:>15}: {n} tasks, {rate:>9.0} tasks/s");
            }

            // What reuse gives up: a worker's globals outlive its tasks.
            let (pid_a, first) = reused.run(count, ()).await?;
            let (pid_b, second) = reused.run(count, ()).await?;
            println!("two tasks in reuse mode: pid {pid_a} ran {first}, pid {pid_b} ran {second}");

            // What it keeps: a panic retires the worker, and the result of
            // one task is never delivered for another.
            let err = reused.run(fail, ()).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Panicked);
            println!("a panicking task: {err}");

            // A task that must see a pristine process.
            let (pid, runs) = reused.task(count, ()).fresh().run().await?;
            assert_eq!(runs, 1, "a fresh worker has run nothing before");
            println!("Task::fresh(): pid {pid} had run {runs} task (this one)");
            Ok(())
        })
}
