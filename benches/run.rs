//! Measures this crate's per-task delay: from `run` (or `open`) to the result in the caller, for small and large payloads (one large byte string or two, and a mapped `Blob` passed on), with 1–64 tasks in flight, from cancellation to a freed slot, and with a large parent heap.
//!
//! Compare with `benches/floors.rs` (fork and wake-up floors) and
//! `benches/peers.rs` (other ways to run a function elsewhere), measured the
//! same way on the same machine.
//!
//! The zygote starts first thing in `main`, before the runtime and criterion
//! exist: it refuses to start in a multi-threaded process
//! (`ErrorKind::MultiThreaded`), and starting it outside every timed closure
//! keeps its one-off cost out of the figures.
//!
//! The runtime is pinned to tokio's current-thread flavour: the caller's side
//! of a task is a few system calls and wake-ups, and on one thread they all
//! happen on the thread that awaits, so the figures are the crate's latency
//! rather than the multi-threaded scheduler's cross-thread hand-offs. The
//! throughput groups therefore show how far one caller thread goes.
//!
//! `cargo bench --bench run`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use run_in_process::{Blob, State, Zygote};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

fn echo(bytes: Vec<u8>) -> Vec<u8> {
    bytes
}

fn echo_blob(bytes: Blob) -> Blob {
    bytes
}

fn make_blob(len: usize) -> Blob {
    Blob::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn first_byte(bytes: Blob) -> u8 {
    bytes.first().copied().unwrap_or(0)
}

fn sleep_forever(_: ()) -> u64 {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    // Before any thread exists; see the module docs. The default limit of 64
    // workers alive at once covers the largest throughput group.
    let zygote = Zygote::start().expect("cannot start the zygote");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");

    // Defaults for this file, set before `configure_from_args` so that
    // `--sample-size`, `--warm-up-time` and `--measurement-time` still win.
    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    noop_run(&mut c, &rt, &zygote, "noop_run");
    open_result(&mut c, &rt, &zygote);
    payload_round_trip(&mut c, &rt, &zygote, "payload_round_trip", echo);
    payload_round_trip(&mut c, &rt, &zygote, "payload_round_trip_blob", echo_blob);
    blob_passed_on(&mut c, &rt, &zygote);
    large_strings(&mut c, &rt, &zygote);
    throughput(&mut c, &rt, &zygote);
    cancel_to_idle(&mut c, &rt, &zygote);
    // Last: it leaves 2 GiB resident until it returns.
    big_parent_heap(&mut c, &rt, &zygote);

    c.final_summary();
}

/// `run(square, x)`: request, fork from the zygote, run, result back.
fn noop_run(c: &mut Criterion, rt: &Runtime, zygote: &Zygote, name: &str) {
    let nine = rt.block_on(zygote.run(square, 3)).expect("run(square, 3)");
    assert_eq!(nine, 9, "run(square, 3) returned a wrong result");

    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let r = zygote.run(square, black_box(i)).await.expect("run");
                    debug_assert_eq!(r, i.wrapping_mul(i));
                    black_box(r);
                }
                start.elapsed()
            })
        })
    });
}

/// `open` then `result`: the same round trip through the `Process` handle,
/// which first waits for the worker's pid to arrive.
fn open_result(c: &mut Criterion, rt: &Runtime, zygote: &Zygote) {
    rt.block_on(async {
        let p = zygote.open(square, 3).await.expect("open(square, 3)");
        assert_ne!(p.pid(), 0, "open returned before the worker existed");
        assert_eq!(p.result().await.expect("result"), 9);
    });

    c.bench_function("open_result", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let p = zygote.open(square, black_box(i)).await.expect("open");
                    black_box(p.result().await.expect("result"));
                }
                start.elapsed()
            })
        })
    });
}

/// `run(echo, bytes)` for 1 KiB, 1 MiB and 64 MiB of bytes, as a `Vec<u8>`
/// (`payload_round_trip`) and as a `Blob` (`payload_round_trip_blob`, which
/// the receiving side maps instead of copying once it takes the memfd path).
/// The payload crosses twice (argument in, result out); throughput is
/// reported against its size. Small results fit the 64 KiB shared-memory
/// slot; the larger ones take the memfd path.
fn payload_round_trip<T, F>(c: &mut Criterion, rt: &Runtime, zygote: &Zygote, group: &str, echo: F)
where
    T: From<Vec<u8>> + AsRef<[u8]> + serde::Serialize + serde::de::DeserializeOwned,
    F: Fn(T) -> T + Copy + 'static,
{
    let mut g = c.benchmark_group(group);
    // Flat sampling: at 64 MiB a single round trip takes a sizeable part of a
    // sample, and linear sampling's growing iteration counts would not fit.
    g.sampling_mode(SamplingMode::Flat);
    for (label, len) in [("1KiB", 1 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let back = rt
            .block_on(zygote.run(echo, T::from(payload.clone())))
            .expect("run(echo, payload)");
        assert!(
            back.as_ref() == payload,
            "{label} payload came back changed"
        );

        if len >= 64 << 20 {
            // Ten round trips of up to a second each: give them the time
            // rather than have criterion warn and stretch it anyway.
            g.sample_size(10);
            g.measurement_time(Duration::from_secs(10));
        }
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(label),
            &payload,
            |b, payload| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            // The copy the argument needs and the check of what
                            // came back are not part of the crate's cost.
                            let arg = T::from(payload.clone());
                            let start = Instant::now();
                            let back = zygote.run(echo, arg).await.expect("run(echo)");
                            timed += start.elapsed();
                            assert!(
                                back.as_ref() == &payload[..],
                                "{label} payload came back changed"
                            );
                        }
                        timed
                    })
                })
            },
        );
    }
    g.finish();
}

/// `run(first_byte, blob)` where `blob` is a mapped `Blob` result of an
/// earlier task: the argument is forwarded in the result's sealed memfd, so
/// the cost should not grow with the size. `copied` passes the same bytes
/// as `(blob, 0u8)`, which cannot be forwarded (something follows the
/// `Blob`) and is copied into a new memfd, as every mapped `Blob` argument
/// was before forwarding.
fn blob_passed_on(c: &mut Criterion, rt: &Runtime, zygote: &Zygote) {
    fn first_of((bytes, _): (Blob, u8)) -> u8 {
        first_byte(bytes)
    }
    let mut g = c.benchmark_group("blob_passed_on");
    g.sampling_mode(SamplingMode::Flat);
    for (label, len) in [("1MiB", 1 << 20), ("64MiB", 64 << 20)] {
        let blob = rt
            .block_on(zygote.run(make_blob, len))
            .expect("run(make_blob)");
        assert!(blob.is_mapped(), "a {label} result is mapped");
        let first = rt
            .block_on(zygote.run(first_byte, blob.clone()))
            .expect("run(first_byte)");
        assert_eq!(first, 0, "{label}: the worker read another byte");
        if len >= 64 << 20 {
            g.sample_size(10);
        }
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("forwarded", label), &blob, |b, blob| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(zygote.run(first_byte, blob.clone()).await.expect("run"));
                    }
                    start.elapsed()
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("copied", label), &blob, |b, blob| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let arg = (blob.clone(), 0u8);
                        black_box(zygote.run(first_of, arg).await.expect("run"));
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// `run(first_bytes, arg)` where `arg` is 64 MiB of heap bytes as one `Blob`
/// (`one_64MiB`) or as two of 32 MiB (`two_32MiB`), which the parent copies
/// into the argument's memfd; the worker maps them and reads a byte of each.
/// Each source is in its own heap allocation, at the same offset within a
/// page; the second string's copy runs at full speed only if the writer
/// aligns every large string of a payload, not just the first.
fn large_strings(c: &mut Criterion, rt: &Runtime, zygote: &Zygote) {
    fn first_bytes(blobs: Vec<Blob>) -> u8 {
        blobs
            .iter()
            .map(|b| first_byte(b.clone()))
            .fold(0, u8::wrapping_add)
    }
    let mut g = c.benchmark_group("large_strings");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.throughput(Throughput::Bytes(64 << 20));
    for (label, parts) in [("one_64MiB", 1), ("two_32MiB", 2)] {
        let arg: Vec<Blob> = (0..parts).map(|_| make_blob((64 << 20) / parts)).collect();
        let sum = rt
            .block_on(zygote.run(first_bytes, arg.clone()))
            .expect("run(first_bytes)");
        assert_eq!(sum, 0, "{label}: the worker read other bytes");
        g.bench_with_input(BenchmarkId::from_parameter(label), &arg, |b, arg| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(zygote.run(first_bytes, arg.clone()).await.expect("run"));
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// Tasks per second with 1, 2, 8 and 64 tasks kept in flight: whenever one
/// finishes, the next starts. Reported as time per task, so throughput is
/// tasks per second.
fn throughput(c: &mut Criterion, rt: &Runtime, zygote: &Zygote) {
    let mut g = c.benchmark_group("throughput");
    // Flat: every sample runs the same number of tasks, enough to fill the
    // pipeline many times over.
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(1));
    for in_flight in [1usize, 2, 8, 64] {
        // Check before timing: `run_many` asserts every result it collects.
        rt.block_on(run_many(zygote, 2 * in_flight as u64, in_flight));

        g.bench_function(BenchmarkId::new("in_flight", in_flight), |b| {
            b.iter_custom(|iters| {
                // With fewer tasks than ~4 pipelines' worth, the ramp-up and
                // drain would dominate; run more and scale back to `iters`.
                let tasks = iters.max(4 * in_flight as u64);
                let elapsed = rt.block_on(run_many(zygote, tasks, in_flight));
                elapsed.mul_f64(iters as f64 / tasks as f64)
            })
        });
    }
    g.finish();
}

/// Runs `total` tasks, at most `in_flight` at a time, checking every result.
async fn run_many(zygote: &Zygote, total: u64, in_flight: usize) -> Duration {
    let mut set = JoinSet::new();
    let mut issued = 0u64;
    let spawn = |set: &mut JoinSet<_>, i: u64| {
        let zygote = zygote.clone();
        set.spawn(async move { (i, zygote.run(square, i).await) });
    };
    let start = Instant::now();
    while issued < total && set.len() < in_flight {
        spawn(&mut set, issued);
        issued += 1;
    }
    while let Some(joined) = set.join_next().await {
        let (i, result) = joined.expect("a throughput task panicked");
        assert_eq!(result.expect("run"), i.wrapping_mul(i));
        if issued < total {
            spawn(&mut set, issued);
            issued += 1;
        }
    }
    start.elapsed()
}

/// From dropping the handle of a running task to `wait_idle` returning: the
/// worker is killed, reaped by the zygote, reported, and its slot freed.
fn cancel_to_idle(c: &mut Criterion, rt: &Runtime, zygote: &Zygote) {
    rt.block_on(async {
        // Workers of earlier groups may still be exiting (a worker hands over
        // its result before it exits); let them go first.
        zygote.wait_idle().await;
        let p = zygote
            .open(sleep_forever, ())
            .await
            .expect("open(sleep_forever)");
        assert_eq!(p.state(), State::Running);
        assert_eq!(zygote.workers(), 1);
        drop(p);
        zygote.wait_idle().await;
        assert_eq!(zygote.workers(), 0, "the cancelled worker was not reaped");
    });

    c.bench_function("cancel_to_idle", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Starting the worker is not part of the cancellation.
                    let p = zygote.open(sleep_forever, ()).await.expect("open");
                    let start = Instant::now();
                    drop(p);
                    zygote.wait_idle().await;
                    timed += start.elapsed();
                }
                timed
            })
        })
    });
}

const BIG_HEAP: usize = 2 << 30;

/// `noop_run` again while the parent holds 2 GiB of touched heap, allocated
/// after the zygote started. The parent never forks per task, so the figure
/// should match `noop_run`; a fork-per-task design from the parent would pay
/// for every one of those page-table entries.
fn big_parent_heap(c: &mut Criterion, rt: &Runtime, zygote: &Zygote) {
    // Refuse rather than risk the OOM killer: with overcommit the reservation
    // succeeds and the touching is what fails.
    let available = meminfo_kib("MemAvailable:").unwrap_or(0) * 1024;
    if available < (BIG_HEAP + (512 << 20)) as u64 {
        eprintln!(
            "run: skipping noop_run_parent_2GiB_heap: {} MiB available, need 2.5 GiB",
            available >> 20
        );
        return;
    }
    let mut heap: Vec<u8> = Vec::new();
    if let Err(e) = heap.try_reserve_exact(BIG_HEAP) {
        eprintln!("run: skipping noop_run_parent_2GiB_heap: cannot allocate 2 GiB: {e}");
        return;
    }
    let rss_before = status_kib("VmRSS:").expect("VmRSS in /proc/self/status");
    // One write per 4 KiB page makes every page resident and gives it a
    // page-table entry; the rest of each page stays as the kernel zeroed it.
    for page in heap.spare_capacity_mut().iter_mut().step_by(4096) {
        page.write(1);
    }
    black_box(heap.spare_capacity_mut().as_mut_ptr());
    let rss_after = status_kib("VmRSS:").expect("VmRSS in /proc/self/status");
    let grown = (rss_after.saturating_sub(rss_before)) * 1024;
    assert!(
        grown >= (BIG_HEAP as u64) * 15 / 16,
        "touching 2 GiB grew RSS by only {} MiB",
        grown >> 20
    );

    noop_run(c, rt, zygote, "noop_run_parent_2GiB_heap");
    drop(heap);
}

fn meminfo_kib(key: &str) -> Option<u64> {
    proc_kib("/proc/meminfo", key)
}

fn status_kib(key: &str) -> Option<u64> {
    proc_kib("/proc/self/status", key)
}

/// Reads a `Key:   123 kB` line from a /proc file.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
