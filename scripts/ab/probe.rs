//! The A/B probe of `scripts/ab.sh`: the median latency, in microseconds, of
//! back-to-back noop tasks on a default zygote. Only public API, so that the
//! same file builds at any commit being compared.

use run_in_process::Zygote;

fn noop(x: u64) -> u64 {
    x
}

fn main() {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let zygote = Zygote::start().expect("start a zygote");
    let runtime = tokio::runtime::Runtime::new().expect("start a runtime");
    runtime.block_on(async {
        // Warm: the first tasks fault in what later ones find mapped.
        for _ in 0..200 {
            zygote.run(noop, 1).await.expect("a warm-up task");
        }
        let mut micros = Vec::with_capacity(tasks);
        for i in 0..tasks as u64 {
            let start = std::time::Instant::now();
            let value = zygote.run(noop, i).await.expect("a task");
            micros.push(start.elapsed().as_secs_f64() * 1e6);
            assert_eq!(value, i);
        }
        micros.sort_by(f64::total_cmp);
        println!("{:.1}", micros[micros.len() / 2]);
    });
}
