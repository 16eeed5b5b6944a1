//! The throughput probe of `scripts/ab.sh -p tput`: noop tasks per second
//! in reuse mode, 8 in flight on one current-thread runtime (the compare
//! bench's reuse-mode row). Only public API, so that the same file builds
//! at any commit being compared.

use std::time::{Duration, Instant};

use run_in_process::Zygote;

fn noop(x: u64) -> u64 {
    x
}

fn main() {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let zygote = Zygote::builder()
        .reuse(u32::MAX)
        .idle_timeout(Duration::ZERO)
        .start()
        .expect("start a zygote");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start a runtime");
    runtime.block_on(async {
        // Warm: every worker has served tasks before the clock starts.
        for _ in 0..2000 {
            zygote.run(noop, 1).await.expect("a warm-up task");
        }
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for k in 0..8 {
            let z = zygote.clone();
            let share = tasks / 8 + usize::from(k < tasks % 8);
            set.spawn(async move {
                for i in 0..share as u64 {
                    assert_eq!(z.run(noop, i).await.expect("a task"), i);
                }
            });
        }
        while let Some(done) = set.join_next().await {
            done.expect("a task loop");
        }
        println!("{:.0}", tasks as f64 / start.elapsed().as_secs_f64());
    });
}
