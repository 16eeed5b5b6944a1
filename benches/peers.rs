//! Measures the delay of running a trivial function (u64 in, u64 out) elsewhere through each peer: procspawn spawn+join and its `Pool`, `tokio::process` running `/bin/true`, tokio's `spawn_blocking`, and this crate's `run`.
//!
//! All are measured in one run on one machine so their ratios hold, whatever
//! the machine. What each one buys differs: procspawn re-executes this binary
//! per task (or per pool worker) and talks over ipc-channel; `/bin/true` is
//! the cost of any fork+exec of an external program, with no data exchanged;
//! `spawn_blocking` isolates nothing and is the in-process floor; this crate
//! forks a fresh worker per task from a pre-forked zygote.
//!
//! `cargo bench --bench peers`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use run_in_process::Zygote;
use tokio::runtime::Runtime;

fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

fn main() {
    // procspawn re-executes this binary for every child it starts; in the
    // child, `init` runs the requested function and exits, so it has to come
    // before anything else, the zygote included.
    procspawn::init();
    // Then the zygote, while this process still has one thread: procspawn's
    // pool and tokio's blocking pool start threads later on.
    let zygote = Zygote::start().expect("cannot start the zygote");
    // Current-thread, as in benches/run.rs, so the tokio-based peers and this
    // crate are awaited the same way.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");

    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let mut g = c.benchmark_group("peers");
    procspawn_spawn_join(&mut g);
    procspawn_pool(&mut g);
    tokio_command_true(&mut g, &rt);
    tokio_spawn_blocking(&mut g, &rt);
    run_in_process_run(&mut g, &rt, &zygote);
    g.finish();

    c.final_summary();
}

/// `procspawn::spawn(x, square).join()`: a fresh process per task (fork+exec
/// of this binary, ipc-channel bootstrap), as procspawn's own docs start with.
/// Synchronous, as procspawn is; no runtime involved.
fn procspawn_spawn_join(g: &mut BenchmarkGroup<WallTime>) {
    let nine = procspawn::spawn(3u64, square)
        .join()
        .expect("procspawn::spawn(3, square)");
    assert_eq!(nine, 9, "procspawn returned a wrong result");

    g.bench_function("procspawn_spawn_join", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                let r = procspawn::spawn(black_box(i), square)
                    .join()
                    .expect("procspawn spawn+join");
                black_box(r);
            }
            start.elapsed()
        })
    });
}

/// `pool.spawn(x, square).join()` on a `procspawn::Pool` of two reused worker
/// processes: no process creation per task, only the ipc-channel round trip.
fn procspawn_pool(g: &mut BenchmarkGroup<WallTime>) {
    // Created here, after the zygote, because it starts monitor threads.
    let pool = procspawn::Pool::new(2).expect("cannot start a procspawn pool of 2");
    let nine = pool
        .spawn(3u64, square)
        .join()
        .expect("pool.spawn(3, square)");
    assert_eq!(nine, 9, "procspawn's pool returned a wrong result");

    g.bench_function("procspawn_pool2", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                let r = pool
                    .spawn(black_box(i), square)
                    .join()
                    .expect("pool spawn+join");
                black_box(r);
            }
            start.elapsed()
        })
    });
    // Dropping the pool kills its workers; `shutdown` first waits for any
    // job still queued so none is killed mid-way.
    pool.shutdown();
}

/// `tokio::process::Command::new("/bin/true")`, spawn and wait: the cost of a
/// fresh external program, reaped through tokio (pidfd-based since 1.36).
fn tokio_command_true(g: &mut BenchmarkGroup<WallTime>, rt: &Runtime) {
    let status = rt
        .block_on(async { tokio::process::Command::new("/bin/true").status().await })
        .expect("cannot run /bin/true");
    assert!(status.success(), "/bin/true failed: {status}");

    g.bench_function("tokio_command_true", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut child = tokio::process::Command::new("/bin/true")
                        .spawn()
                        .expect("spawn /bin/true");
                    let status = child.wait().await.expect("wait for /bin/true");
                    debug_assert!(status.success());
                    black_box(status);
                }
                start.elapsed()
            })
        })
    });
}

/// `tokio::task::spawn_blocking(|| square(x))`: a hand-off to another thread
/// and back, with no isolation. The floor for "run it off this thread".
fn tokio_spawn_blocking(g: &mut BenchmarkGroup<WallTime>, rt: &Runtime) {
    // Inside the runtime: spawn_blocking needs one to hand the closure to.
    let nine = rt
        .block_on(async { tokio::task::spawn_blocking(|| square(3)).await })
        .expect("spawn_blocking(square(3))");
    assert_eq!(nine, 9);

    g.bench_function("tokio_spawn_blocking", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let x = black_box(i);
                    let r = tokio::task::spawn_blocking(move || square(x))
                        .await
                        .expect("spawn_blocking");
                    black_box(r);
                }
                start.elapsed()
            })
        })
    });
}

/// This crate: `zygote.run(square, x)`, a fresh forked worker per task. The
/// same figure as `noop_run` in benches/run.rs, repeated here so that the
/// peers are compared within one run.
fn run_in_process_run(g: &mut BenchmarkGroup<WallTime>, rt: &Runtime, zygote: &Zygote) {
    let nine = rt.block_on(zygote.run(square, 3)).expect("run(square, 3)");
    assert_eq!(nine, 9, "run(square, 3) returned a wrong result");

    g.bench_function("run_in_process_run", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let r = zygote.run(square, black_box(i)).await.expect("run");
                    black_box(r);
                }
                start.elapsed()
            })
        })
    });
}
