//! The quick example from the README: run functions in fresh processes.
//!
//! `cargo run --release --example quickstart`

use std::time::{Duration, Instant};

use run_in_process::{ErrorKind, State, Zygote};

fn square(x: u64) -> u64 {
    x * x
}

async fn slow_square(x: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(10)).await;
    x * x
}

fn parse(input: String) -> Vec<u32> {
    // Crash-prone code stays in its own process: a bad input panics there.
    input
        .split(',')
        .map(|s| s.trim().parse().expect("not a number"))
        .collect()
}

fn spin(_: ()) -> u64 {
    loop {
        std::hint::spin_loop();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Start the zygote first, while this process has a single thread.
    let zygote = Zygote::start()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let n: u64 = zygote.run(square, 12).await?;
        println!("square(12) = {n}, computed in a fresh process");

        let m: u64 = zygote.run_async(slow_square, 12).await?;
        println!("slow_square(12) = {m}, on a runtime inside the worker");

        let numbers = zygote.run(parse, "1, 2, 3".to_string()).await?;
        println!("parse(\"1, 2, 3\") = {numbers:?}");
        let err = zygote.run(parse, "1, two".to_string()).await.unwrap_err();
        println!("parse(\"1, two\") failed cleanly: {err}");

        let mut p = zygote.open(square, 3).await?;
        println!("worker pid {} is {:?}", p.pid(), p.state());
        let status = p.wait().await?;
        assert_eq!(p.state(), State::Finished);
        println!("it exited with {status}; result {}", p.result().await?);

        let r = zygote
            .task(spin, ())
            .timeout(Duration::from_millis(100))
            .run()
            .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::TimedOut);
        println!("a runaway task was stopped after its 100 ms timeout");

        let start = Instant::now();
        let n = 1000;
        for i in 0..n {
            let _: u64 = zygote.run(square, i).await?;
        }
        println!(
            "{n} sequential tasks, one process each: {:?} per task",
            start.elapsed() / n as u32
        );
        Ok(())
    })
}
