//! Prints one table: this crate's per-task latency and throughput beside the fork and wake-up floors and the peers, all measured in this one run, with p50, p99 and ratios; and writes it to `target/compare.md`.
//!
//! `cargo bench --bench compare`
//!
//! Criterion (`benches/floors.rs`, `run.rs`, `peers.rs`) gives careful means
//! with confidence intervals; this report times every iteration on its own so
//! that p99 is a real tail, and puts each figure next to the denominator it
//! must be judged against. Absolute numbers move with the machine and with
//! vCPU placement on a VM; ratios measured side by side do not.
//!
//! Order matters: `procspawn::init()` must come first (procspawn re-executes
//! this binary for every spawn), and every fork from this process (the floor
//! server, the echo child, the raw fork server, the zygotes) happens before
//! any thread exists. The peers start threads (tokio's blocking pool,
//! procspawn's), so the fork floors are timed in the floor server, a
//! single-threaded child forked at start-up like the zygote.

use std::hint::black_box;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use run_in_process::Zygote;

fn noop(x: u64) -> u64 {
    x
}

fn identity(v: Vec<u8>) -> Vec<u8> {
    v
}

/// The same bytes as one serde byte string (`serde_bytes`), which the codec
/// copies in one piece instead of element by element.
fn identity_bytes(v: serde_bytes::ByteBuf) -> serde_bytes::ByteBuf {
    v
}

/// 64 MiB of bytes in a shared file mapping, made before `blob_zygote` starts:
/// its workers inherit the mapping without copying any page table entry, so
/// a task can return these bytes without first building its own copy.
static BLOB: std::sync::OnceLock<memmap2::Mmap> = std::sync::OnceLock::new();
const BLOB_LEN: usize = 64 << 20;

/// A result that serializes `BLOB` in place and deserializes into an owned
/// buffer: the "64 MiB result" row then times the crate moving 64 MiB from
/// the worker to the parent, not the task making them.
enum Inherited {
    Blob,
    Owned(serde_bytes::ByteBuf),
}

impl serde::Serialize for Inherited {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Inherited::Blob => s.serialize_bytes(blob_bytes()),
            Inherited::Owned(b) => s.serialize_bytes(b),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Inherited {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Inherited, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(Inherited::Owned)
    }
}

fn blob_bytes() -> &'static [u8] {
    BLOB.get().map_or(&[][..], |m| &m[..])
}

/// `BLOB` into a `ByteBuf` in the parent: a copy into fresh heap pages.
fn blob(_: ()) -> Inherited {
    Inherited::Blob
}

/// `BLOB` as a `run_in_process::Blob`: the parent keeps the mapping.
fn blob_mapped(_: ()) -> run_in_process::Blob {
    run_in_process::Blob::from_static(blob_bytes())
}

/// `BLOB` as two `Blob`s of 32 MiB each: the second string's source is as
/// page-aligned as the first's, so this shows whether the writer aligns
/// every large string of a payload or only the first.
fn blob_halves(_: ()) -> (run_in_process::Blob, run_in_process::Blob) {
    let (a, b) = blob_bytes().split_at(BLOB_LEN / 2);
    (
        run_in_process::Blob::from_static(a),
        run_in_process::Blob::from_static(b),
    )
}

/// Runs `f(())` and times it until the caller holds the result; then drops
/// the result and waits for the worker to be reaped, untimed.
async fn until_held<F, R>(zygote: &Zygote, f: F) -> Duration
where
    F: Fn(()) -> R + Copy + 'static,
    R: serde::Serialize + serde::de::DeserializeOwned,
{
    let t = Instant::now();
    let value = black_box(zygote.run(f, ()).await.expect("64 MiB result"));
    let elapsed = t.elapsed();
    drop(value);
    zygote.wait_idle().await;
    elapsed
}

/// Fills a memfd with `len` bytes by `write(2)` and maps it read-only.
fn shared_blob(len: usize) -> memmap2::Mmap {
    // SAFETY: memfd_create with a valid NUL-terminated name; a non-negative
    // result is a new fd that nothing else owns.
    let fd = unsafe { libc::memfd_create(c"bench-blob".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh, open fd owned by nobody else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..len / chunk.len() {
        file.write_all(&chunk).expect("fill the blob");
    }
    // SAFETY: nothing writes to or truncates this memfd after this point: its
    // only fd is closed when `file` drops below, and the mapping is read-only.
    unsafe { memmap2::Mmap::map(&file) }.expect("map the blob")
}

/// 256 MiB that the warm-up hooks below prepare in their zygotes.
const WARM_LEN: usize = 256 << 20;

/// Warm-up into the zygote's private heap: every fork then copies the page
/// tables of 256 MiB (with transparent huge pages, far fewer entries).
fn warm_heap() {
    let heap: Vec<u8> = vec![1; WARM_LEN];
    std::mem::forget(black_box(heap));
}

/// The same 256 MiB in a shared memfd mapping, which `fork` does not copy
/// entry by entry: the workers fault it in when they touch it.
fn warm_shared() {
    std::mem::forget(black_box(shared_blob(WARM_LEN)));
}

fn main() {
    procspawn::init();
    // `cargo bench` passes `--bench`; any other argument would be a filter,
    // which this report does not support.
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 200 } else { 2000 };

    let mut floors = FloorServer::fork();
    let echo = Echo::fork();
    let raw = RawForkServer::fork();
    let raw_pool = RawPool::fork(8);
    let zygote = Zygote::start().expect("start the zygote");
    let cold_zygote = Zygote::builder()
        .parked(0)
        .start()
        .expect("start the zygote without parked workers");
    // Reuse mode, with workers that live as long as the run.
    let reuse_zygote = Zygote::builder()
        .reuse(u32::MAX)
        .idle_timeout(Duration::ZERO)
        .start()
        .expect("start the reuse-mode zygote");
    let two_zygotes = Zygote::builder()
        .zygotes(2)
        .start()
        .expect("start two zygotes");
    // Fork cost after a large warm-up, forked on demand so every task forks.
    let heap_warm = Zygote::builder()
        .parked(0)
        .warm_up(warm_heap)
        .start()
        .expect("start the zygote warmed in its heap");
    let shared_warm = Zygote::builder()
        .parked(0)
        .warm_up(warm_shared)
        .start()
        .expect("start the zygote warmed in a shared mapping");
    // Made after the other zygotes, so only this one's workers map it.
    let _ = BLOB.set(shared_blob(BLOB_LEN));
    let blob_zygote = Zygote::builder()
        .parked(0)
        .start()
        .expect("start the zygote that inherits the blob");

    let mut rows: Vec<Row> = Vec::new();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        assert_eq!(
            zygote.run(noop, 7).await.expect("run"),
            7,
            "noop returns its argument"
        );
        assert_eq!(
            cold_zygote.run(noop, 7).await.expect("run"),
            7,
            "noop returns its argument"
        );
        warm_up(&zygote).await;
        warm_up(&cold_zygote).await;
        warm_up(&reuse_zygote).await;
        warm_up(&two_zygotes).await;
    });

    // Floors, this crate's noop runs and the peers, measured in alternating
    // rounds: this VM's speed drifts by 2x within minutes, and interleaving
    // makes the drift hit numerators and denominators alike (peers timed a
    // minute after the crate once came out 0.26x to 1.83x its speed in five
    // runs of one morning).
    const ROUNDS: usize = 10;
    let per = n / ROUNDS;
    let (mut fork_wait, mut fork_wake) = (Vec::new(), Vec::new());
    let (mut ping_same, mut ping_cross) = (Vec::new(), Vec::new());
    let (mut cold, mut warm, mut warm_paced) = (Vec::new(), Vec::new(), Vec::new());
    let mut reused = Vec::new();
    let (mut limited, mut memory_limited, mut sandboxed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut with_env, mut captured) = (Vec::new(), Vec::new());
    let (mut cold_heap, mut cold_shared) = (Vec::new(), Vec::new());
    let (mut spawn_blocking, mut true_cmd) = (Vec::new(), Vec::new());
    let (mut procspawn_spawn, mut procspawn_pool) = (Vec::new(), Vec::new());
    let pool = procspawn::Pool::new(2).expect("procspawn pool");
    for _ in 0..ROUNDS {
        fork_wait.extend(floors.times(Floor::ForkWait, per));
        fork_wake.extend(floors.times(Floor::ForkWake, per));
        // Pinned both ways: unpinned, the scheduler puts a long-lived echo
        // child on the parent's CPU or the other one by luck, and the round
        // trip is 10x apart between the two. (`pin(0, ..)` pins the calling
        // thread, the only one that runs this loop.)
        pin(0, 0);
        pin(echo.pid, 0);
        ping_same.extend(measure(per, || echo.round_trip()));
        pin(echo.pid, 1);
        ping_cross.extend(measure(per, || echo.round_trip()));
        unpin(0);
        unpin(echo.pid);
        rt.block_on(async {
            cold.extend(runs(&cold_zygote, per, Duration::ZERO).await);
            warm.extend(runs(&zygote, per, Duration::ZERO).await);
            // A pause before each task lets the zygote park a replacement,
            // so every task meets a parked worker.
            warm_paced.extend(runs(&zygote, per, Duration::from_millis(2)).await);
            reused.extend(runs(&reuse_zygote, per, Duration::ZERO).await);
            limited.extend(confined_runs(&zygote, per / 2, Confined::Limits).await);
            memory_limited.extend(confined_runs(&zygote, per / 2, Confined::Memory).await);
            sandboxed.extend(confined_runs(&zygote, per / 2, Confined::Sandbox).await);
            with_env.extend(confined_runs(&zygote, per / 2, Confined::Env).await);
            captured.extend(confined_runs(&zygote, per / 2, Confined::Capture).await);
            cold_heap.extend(runs(&heap_warm, per / 2, Duration::ZERO).await);
            cold_shared.extend(runs(&shared_warm, per / 2, Duration::ZERO).await);
            spawn_blocking.extend(
                measure_async(per, || async {
                    black_box(tokio::task::spawn_blocking(|| noop(1)).await.expect("join"))
                })
                .await,
            );
            true_cmd.extend(
                measure_async(per / 5, || async {
                    let s = tokio::process::Command::new("/bin/true")
                        .status()
                        .await
                        .expect("/bin/true");
                    assert!(s.success());
                })
                .await,
            );
        });
        procspawn_spawn.extend(measure(per / 10, || {
            let h = procspawn::spawn(1u64, noop);
            assert_eq!(h.join().expect("procspawn join"), 1);
        }));
        procspawn_pool.extend(measure(per / 2, || {
            let h = pool.spawn(1u64, noop);
            assert_eq!(h.join().expect("procspawn pool join"), 1);
        }));
    }
    pool.shutdown();
    let (fork_wait, fork_wake) = (Stats::of(fork_wait), Stats::of(fork_wake));
    let (ping_same, ping) = (Stats::of(ping_same), Stats::of(ping_cross));
    let (cold, warm, warm_paced) = (Stats::of(cold), Stats::of(warm), Stats::of(warm_paced));
    let reused = Stats::of(reused);
    let (limited, memory_limited, sandboxed) = (
        Stats::of(limited),
        Stats::of(memory_limited),
        Stats::of(sandboxed),
    );
    let (with_env, captured) = (Stats::of(with_env), Stats::of(captured));
    let (cold_heap, cold_shared) = (Stats::of(cold_heap), Stats::of(cold_shared));
    rows.push(Row::new("floor: fork + _exit + waitpid", fork_wait));
    rows.push(Row::new(
        "floor: fork -> child rings eventfd -> parent wakes",
        fork_wake,
    ));
    rows.push(Row::new(
        "floor: eventfd ping-pong, both on one CPU",
        ping_same,
    ));
    rows.push(Row::new("floor: eventfd ping-pong, across CPUs", ping));
    rows.push(
        Row::new("run_in_process: noop run, forked on demand (cold)", cold)
            .vs(&fork_wake, "fork->wake floor"),
    );
    rows.push(
        Row::new(
            "run_in_process: noop run, parked workers, back to back",
            warm,
        )
        .vs(&ping, "cross-CPU ping-pong"),
    );
    rows.push(
        Row::new(
            "run_in_process: noop run, parked workers, 2 ms apart",
            warm_paced,
        )
        .vs(&ping, "cross-CPU ping-pong"),
    );
    rows.push(
        Row::new("run_in_process: noop run, reuse mode, back to back", reused)
            .vs(&ping, "cross-CPU ping-pong"),
    );
    for (name, stats) in [
        ("run_in_process: noop run, CPU + open-files limits", limited),
        ("run_in_process: noop run, memory limit", memory_limited),
        (
            "run_in_process: noop run, sandbox (seccomp + Landlock)",
            sandboxed,
        ),
        (
            "run_in_process: noop run, one env var + current_dir",
            with_env,
        ),
        (
            "run_in_process: noop run_captured (stdout + stderr)",
            captured,
        ),
    ] {
        rows.push(Row::new(name, stats).vs(&warm, "unconfined back to back"));
    }
    rows.push(
        Row::new(
            "run_in_process: cold run after a 256 MiB heap warm-up",
            cold_heap,
        )
        .vs(&cold, "cold run, no warm-up"),
    );
    rows.push(
        Row::new(
            "run_in_process: cold run after a 256 MiB shared-mapping warm-up",
            cold_shared,
        )
        .vs(&cold, "cold run, no warm-up"),
    );

    let open = rt.block_on(async {
        Stats::of(
            measure_async(n / 2, || async {
                let p = zygote.open(noop, 1).await.expect("open");
                black_box(p.result().await.expect("result"))
            })
            .await,
        )
    });
    rows.push(Row::new("run_in_process: open + result", open).vs(&fork_wake, "fork->wake floor"));

    let tput_total = |zygote: &Zygote, in_flight: usize, total: usize| {
        rt.block_on(async {
            let start = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for k in 0..in_flight {
                let z = zygote.clone();
                let share = total / in_flight + usize::from(k < total % in_flight);
                set.spawn(async move {
                    for _ in 0..share {
                        black_box(z.run(noop, 1).await.expect("run"));
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("join");
            }
            total as f64 / start.elapsed().as_secs_f64()
        })
    };
    let tput_on = |zygote: &Zygote, in_flight: usize| tput_total(zygote, in_flight, n.max(400));
    // procspawn's Pool with the same number of tasks in flight: a window of
    // join handles, the oldest joined before the next is spawned.
    let peer_pool = procspawn::Pool::new(2).expect("procspawn pool");
    let pool_tput = |in_flight: usize, total: usize| {
        let start = Instant::now();
        let mut window = std::collections::VecDeque::new();
        for _ in 0..total {
            if window.len() == in_flight {
                let h: procspawn::JoinHandle<u64> = window.pop_front().expect("window");
                assert_eq!(h.join().expect("procspawn pool join"), 1);
            }
            window.push_back(peer_pool.spawn(1u64, noop));
        }
        for h in window {
            assert_eq!(h.join().expect("procspawn pool join"), 1);
        }
        total as f64 / start.elapsed().as_secs_f64()
    };
    // The target's rows (8 in flight, with and without parked workers, and
    // the raw fork server) in alternating rounds: this VM's speed drifts by
    // up to 2x within a minute, so rows measured seconds apart would compare
    // two different machines. Each row reports its median round, and the
    // ratio is the median of the per-round ratios.
    let (mut parked8, mut cold8, mut raw8, mut ratios8) = (vec![], vec![], vec![], vec![]);
    let (mut reuse8, mut two8, mut pool8) = (vec![], vec![], vec![]);
    let (mut reuse_vs_pool, mut two_vs_one) = (vec![], vec![]);
    let (mut raw_pool8, mut reuse_vs_raw_pool) = (vec![], vec![]);
    for _ in 0..if quick { 2 } else { 9 } {
        let (p, c, r) = (
            tput_on(&zygote, 8),
            tput_on(&cold_zygote, 8),
            raw.throughput(n.max(400), 8),
        );
        let (u, t, q, f) = (
            tput_total(&reuse_zygote, 8, 10 * n.max(400)),
            tput_on(&two_zygotes, 8),
            pool_tput(8, n.max(400)),
            raw_pool.throughput(10 * n.max(400)),
        );
        parked8.push(p);
        cold8.push(c);
        raw8.push(r);
        ratios8.push(p / r);
        reuse8.push(u);
        two8.push(t);
        pool8.push(q);
        reuse_vs_pool.push(u / q);
        raw_pool8.push(f);
        reuse_vs_raw_pool.push(u / f);
        two_vs_one.push(t / p);
    }
    peer_pool.shutdown();
    let mut throughput = Vec::new();
    for k in [1usize, 2, 8, 64] {
        let tput = if k == 8 {
            median(&parked8)
        } else {
            tput_on(&zygote, k)
        };
        throughput.push((format!("run_in_process: tasks/s, {k} in flight"), tput));
    }
    throughput.push((
        "run_in_process: tasks/s, 8 in flight, no parked workers".into(),
        median(&cold8),
    ));
    throughput.push((
        "floor: raw fork server, tasks/s, 8 in flight".into(),
        median(&raw8),
    ));
    throughput.push((
        "run_in_process: tasks/s, 8 in flight, reuse mode".into(),
        median(&reuse8),
    ));
    throughput.push((
        "floor: raw process pool (8 workers, socket jobs), tasks/s, 8 in flight".into(),
        median(&raw_pool8),
    ));
    throughput.push((
        "run_in_process: tasks/s, 8 in flight, zygotes(2), fresh per task".into(),
        median(&two8),
    ));
    throughput.push((
        "peer: procspawn Pool(2), tasks/s, 8 in flight".into(),
        median(&pool8),
    ));

    let payload = rt.block_on(async {
        let big = vec![0x5au8; 64 << 20];
        let back = zygote.run(identity, big.clone()).await.expect("64 MiB");
        assert!(back == big, "64 MiB round trip");
        let times = measure_async(if quick { 2 } else { 5 }, || async {
            black_box(
                zygote
                    .run(identity, big.clone())
                    .await
                    .expect("64 MiB")
                    .len(),
            )
        })
        .await;
        Stats::of(times)
    });
    let payload_bytes = rt.block_on(async {
        let big = serde_bytes::ByteBuf::from(vec![0x5au8; 64 << 20]);
        let back = zygote
            .run(identity_bytes, big.clone())
            .await
            .expect("64 MiB");
        assert!(back == big, "64 MiB round trip");
        let times = measure_async(if quick { 2 } else { 5 }, || async {
            black_box(
                zygote
                    .run(identity_bytes, big.clone())
                    .await
                    .expect("64 MiB")
                    .len(),
            )
        })
        .await;
        Stats::of(times)
    });

    // 64 MiB from worker to parent, and the floor for that: one process
    // copying the same bytes into a fresh Vec (the parent must end up owning
    // a buffer like that, and every fresh page costs a fault here).
    let blob_bytes = BLOB.get().expect("blob");
    let (mut big_result, mut big_mapped, mut big_halves, mut fresh_copy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        let Inherited::Owned(got) = blob_zygote.run(blob, ()).await.expect("64 MiB result") else {
            unreachable!("deserializes as owned")
        };
        assert!(got[..] == blob_bytes[..], "64 MiB result arrives intact");
        let got = blob_zygote.run(blob_mapped, ()).await.expect("64 MiB Blob");
        assert!(got.is_mapped(), "a 64 MiB Blob arrives without a copy");
        assert!(got[..] == blob_bytes[..], "64 MiB Blob arrives intact");
        drop(got);
        let (a, b) = blob_zygote.run(blob_halves, ()).await.expect("two Blobs");
        assert!(a.is_mapped() && b.is_mapped(), "both halves arrive mapped");
        assert!(
            a.len() + b.len() == BLOB_LEN && [&a[..], &b[..]].concat() == blob_bytes[..],
            "two 32 MiB Blobs arrive intact"
        );
        drop((a, b));
        // Each row times the call until the caller holds the value. Dropping
        // it, and the task's cleanup that the crate defers to its reaper
        // (unmapping, freeing the memfd's pages), happen outside the timed
        // region, for the floor too, so no row pays for the one before it.
        for _ in 0..if quick { 2 } else { 9 } {
            let t = Instant::now();
            let copy = black_box(blob_bytes.to_vec());
            fresh_copy.push(t.elapsed());
            drop(copy);
            big_result.push(until_held(&blob_zygote, blob).await);
            big_mapped.push(until_held(&blob_zygote, blob_mapped).await);
            big_halves.push(until_held(&blob_zygote, blob_halves).await);
        }
    });
    let (big_result, big_mapped, big_halves, fresh_copy) = (
        Stats::of(big_result),
        Stats::of(big_mapped),
        Stats::of(big_halves),
        Stats::of(fresh_copy),
    );

    let (spawn_blocking, true_cmd) = (Stats::of(spawn_blocking), Stats::of(true_cmd));
    let (procspawn_spawn, procspawn_pool) = (Stats::of(procspawn_spawn), Stats::of(procspawn_pool));
    rows.push(Row::new(
        "peer: tokio spawn_blocking (no process)",
        spawn_blocking,
    ));
    rows.push(Row::new("peer: tokio::process /bin/true", true_cmd));
    rows.push(Row::new("peer: procspawn spawn + join", procspawn_spawn));
    rows.push(Row::new(
        "peer: procspawn Pool(2), reused workers",
        procspawn_pool,
    ));

    // The same noop runs while the parent holds 2 GiB of touched heap that it
    // allocated after the zygote started: the zygote, not the parent, forks.
    // Rounds alternate with and without the heap, so that drift in this VM's
    // speed hits both sides alike, and the ratio is the median of the
    // rounds' ratios, as for throughput: the p50 of one side's pooled runs
    // against the other's (four rounds of 500) moved between 0.97x and 1.18x
    // from run to run with the drift alone. Most of the row's time is the
    // touching of the heap, so the rounds are long.
    let big_parent = {
        let (mut small, mut big, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let rounds = if quick { 2 } else { 8 };
        for _ in 0..rounds {
            let without = rt.block_on(runs(&zygote, n / 2, Duration::ZERO));
            let mut heap = Vec::<u8>::new();
            if heap.try_reserve_exact(2 << 30).is_err() {
                break;
            }
            // Writes every byte, so every page is resident.
            heap.resize(2 << 30, 1);
            let with = rt.block_on(runs(&zygote, n / 2, Duration::ZERO));
            black_box(&heap);
            ratios.push(
                Stats::of(with.clone()).p50.as_secs_f64()
                    / Stats::of(without.clone()).p50.as_secs_f64(),
            );
            small.extend(without);
            big.extend(with);
        }
        (!big.is_empty()).then(|| (Stats::of(small), Stats::of(big), ratios))
    };

    let zygote_rss = rss_kib(zygote.pid());
    let parked_private = parked_private_kib(&zygote);
    #[cfg(feature = "tracing")]
    let tracing_row = tracing_rows(&rt, &zygote, n);
    #[cfg(not(feature = "tracing"))]
    let tracing_row = String::new();
    drop(zygote);
    drop(cold_zygote);
    drop(blob_zygote);
    drop(reuse_zygote);
    drop(two_zygotes);
    drop(heap_warm);
    drop(shared_warm);
    floors.stop();
    echo.stop();
    raw.stop();
    raw_pool.stop();

    // The report.
    let mut out = String::new();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out += &format!(
        "Measured {date} on {} ({} CPUs), {} iterations per latency row.\n\n",
        machine(),
        cpus(),
        n
    );
    out += "| operation | p50 | p99 | vs floor |\n|---|---:|---:|---|\n";
    for r in &rows {
        out += &format!(
            "| {} | {} | {} | {} |\n",
            r.name,
            us(r.stats.p50),
            us(r.stats.p99),
            r.vs.clone().unwrap_or_default()
        );
    }
    if let Some((small, big, ratios)) = &big_parent {
        out += &format!(
            "| run_in_process: noop run, parked workers, parent holding 2 GiB | {} | {} | {:.2}x the small-parent p50 of {} (median of {} alternating rounds' ratios; rounds {}) |\n",
            us(big.p50),
            us(big.p99),
            median(ratios),
            us(small.p50),
            ratios.len(),
            span(ratios),
        );
    }
    out += "\n| throughput | tasks/s |\n|---|---:|\n";
    for (name, t) in &throughput {
        out += &format!("| {name} | {t:.0} |\n");
    }
    let ratio = |a: &Stats, b: &Stats| a.p50.as_secs_f64() / b.p50.as_secs_f64();
    let gbps = |s: &Stats| 2.0 * (64u64 << 20) as f64 / s.p50.as_secs_f64() / 1e9;
    out += &format!(
        "\n64 MiB argument and 64 MiB result, one round trip: as `Vec<u8>` (serde, element by element) p50 {} ({:.2} GB/s moved); as `serde_bytes::ByteBuf` p50 {} ({:.2} GB/s moved).\n",
        us(payload.p50),
        gbps(&payload),
        us(payload_bytes.p50),
        gbps(&payload_bytes)
    );
    let gbs = |s: &Stats| BLOB_LEN as f64 / s.p50.as_secs_f64() / 1e9;
    out += &format!(
        "64 MiB result, worker to parent (bytes the worker inherited, so only the transfer is timed), until the caller holds the value: as `run_in_process::Blob` (the parent maps the sealed memfd) p50 {} ({:.2} GB/s); as `serde_bytes::ByteBuf` (copied into the parent's heap) p50 {} ({:.2} GB/s). Floor, one process copying the same bytes into a fresh `Vec`: p50 {} ({:.2} GB/s); the `Blob` takes {:.2}x that, the `ByteBuf` {:.2}x.\n",
        us(big_mapped.p50),
        gbs(&big_mapped),
        us(big_result.p50),
        gbs(&big_result),
        us(fresh_copy.p50),
        gbs(&fresh_copy),
        ratio(&big_mapped, &fresh_copy),
        ratio(&big_result, &fresh_copy)
    );
    out += &format!(
        "The same 64 MiB as two `Blob`s of 32 MiB (each page-aligned in the worker, so each is copied fastest if the writer aligns it): p50 {} ({:.2} GB/s), {:.2}x the single `Blob`.\n",
        us(big_halves.p50),
        gbs(&big_halves),
        ratio(&big_halves, &big_mapped)
    );
    if let Some(rss) = zygote_rss {
        out += &format!("Zygote resident set: {rss} KiB.\n");
    }
    if let Some(kib) = parked_private {
        out += &format!("Private memory of an idle parked worker: {kib} KiB.\n");
    }
    out += "\nRatios (p50):\n\n";
    out += &format!(
        "- cold run / fork->wake floor: {:.2}x (p99 {:.2}x)\n",
        ratio(&cold, &fork_wake),
        cold.p99.as_secs_f64() / fork_wake.p99.as_secs_f64()
    );
    out += &format!(
        "- procspawn spawn+join / run: {:.1}x faster cold, {:.1}x back to back with parked workers (the default), {:.1}x paced\n",
        ratio(&procspawn_spawn, &cold),
        ratio(&procspawn_spawn, &warm),
        ratio(&procspawn_spawn, &warm_paced)
    );
    out += &format!(
        "- parked run, 2 ms apart / cross-CPU ping-pong floor: {:.2}x; back to back: {:.2}x\n",
        ratio(&warm_paced, &ping),
        ratio(&warm, &ping)
    );
    out += &format!(
        "- parked runs back to back / fork + _exit + waitpid floor: {:.2}x (each task still costs a fork and an exit, now off its path but not off the CPUs)\n",
        ratio(&warm, &fork_wait)
    );
    out += &format!(
        "- procspawn Pool(2) / parked run, 2 ms apart: {:.2}x (above 1 means we are faster)\n",
        ratio(&procspawn_pool, &warm_paced)
    );
    out += &format!(
        "- tokio::process /bin/true / run: {:.1}x faster cold, {:.1}x back to back parked, {:.1}x paced\n",
        ratio(&true_cmd, &cold),
        ratio(&true_cmd, &warm),
        ratio(&true_cmd, &warm_paced)
    );
    out += &format!(
        "- seed (trio-run-in-process, 105 ms measured externally) / run: {:.0}x faster cold, {:.0}x back to back parked, {:.0}x paced\n",
        0.105 / cold.p50.as_secs_f64(),
        0.105 / warm.p50.as_secs_f64(),
        0.105 / warm_paced.p50.as_secs_f64()
    );
    let cold_ratios: Vec<f64> = cold8.iter().zip(&raw8).map(|(c, r)| c / r).collect();
    out += &format!(
        "- throughput, 8 in flight / raw fork server: {:.2}x, no parked workers {:.2}x (medians of {} alternating rounds; rounds {} and {})\n",
        median(&ratios8),
        median(&cold_ratios),
        ratios8.len(),
        span(&ratios8),
        span(&cold_ratios),
    );

    out += &format!(
        "- reuse mode, 8 in flight: {:.0} tasks/s (target 100k); / procspawn Pool(2), 8 in flight: {:.1}x (target 5x; medians of alternating rounds, rounds {})\n",
        median(&reuse8),
        median(&reuse_vs_pool),
        span(&reuse_vs_pool),
    );
    out += &format!(
        "- reuse mode / raw process pool, 8 in flight: {:.2}x (what the runtime, the ring and the result cost over the bare system calls; rounds {})\n",
        median(&reuse_vs_raw_pool),
        span(&reuse_vs_raw_pool),
    );
    out += &format!(
        "- reuse mode back to back / ping-pong floor: {:.2}x cross-CPU, {:.2}x one CPU (target 3x)\n",
        ratio(&reused, &ping),
        ratio(&reused, &ping_same),
    );
    out += &format!(
        "- zygotes(2) / zygotes(1), fresh per task, 8 in flight: {:.2}x (target 1.6x; rounds {})\n",
        median(&two_vs_one),
        span(&two_vs_one),
    );
    out += &format!(
        "- cold run after a 256 MiB warm-up / without: {:.2}x in the heap, {:.2}x in a shared mapping\n",
        ratio(&cold_heap, &cold),
        ratio(&cold_shared, &cold),
    );

    out += &tracing_row;
    print!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/compare.svg", svg(&rows, &date));
    if let Ok(mut f) = std::fs::File::create("target/compare.md") {
        let _ = f.write_all(out.as_bytes());
        println!("\n(written to target/compare.md and target/compare.svg)");
    }
}

/// With `--features tracing`: noop runs with no subscriber, then with one
/// (a registry and a layer that does nothing, as this thread's default,
/// which enables every task span and so its trace buffer), in alternating
/// rounds. Without a subscriber the feature should cost nothing.
#[cfg(feature = "tracing")]
fn tracing_rows(rt: &tokio::runtime::Runtime, z: &Zygote, n: usize) -> String {
    use tracing_subscriber::layer::SubscriberExt;
    struct Nothing;
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Nothing {}
    let (mut off, mut on) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..5 {
            off.extend(runs(z, n / 5, Duration::ZERO).await);
            let _default =
                tracing::subscriber::set_default(tracing_subscriber::registry().with(Nothing));
            on.extend(runs(z, n / 5, Duration::ZERO).await);
        }
    });
    let (off, on) = (Stats::of(off), Stats::of(on));
    format!(
        "- tracing feature, a subscriber / none: {:.2}x (p50 {} vs {}, alternating rounds)\n",
        on.p50.as_secs_f64() / off.p50.as_secs_f64(),
        us(on.p50),
        us(off.p50),
    )
}

/// How a confined noop task is set up, for the confinement rows.
#[derive(Clone, Copy)]
enum Confined {
    /// CPU and open-files limits (two `setrlimit` calls).
    Limits,
    /// A memory limit (its footprint check reads `/proc/self/statm`).
    Memory,
    /// The full sandbox: seccomp, Landlock, `no_new_privs`.
    Sandbox,
    /// Task I/O: one environment variable and a working directory.
    Env,
    /// Task I/O: stdout and stderr captured (two pipes, two drains).
    Capture,
}

/// `n` sequential confined noop runs, parked workers; the time of each.
async fn confined_runs(z: &Zygote, n: usize, how: Confined) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let task = z.task(noop, 1);
        let task = match how {
            Confined::Limits => task
                .cpu_limit(Duration::from_secs(60))
                .open_files_limit(256),
            Confined::Memory => task.memory_limit(256 << 20),
            Confined::Sandbox => task.sandbox(
                run_in_process::Sandbox::new()
                    .deny_network()
                    .deny_exec()
                    .deny_fs_writes(),
            ),
            Confined::Env => task.env("RUN_IN_PROCESS_BENCH", "1").current_dir("/"),
            Confined::Capture => {
                black_box(task.run_captured().await.expect("captured run").value);
                times.push(t.elapsed());
                continue;
            }
        };
        black_box(task.run().await.expect("confined run"));
        times.push(t.elapsed());
    }
    times
}

/// `n` sequential noop runs, each after `gap`; the time of each.
async fn runs(z: &Zygote, n: usize, gap: Duration) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let t = Instant::now();
        black_box(z.run(noop, 1).await.expect("run"));
        times.push(t.elapsed());
    }
    times
}

async fn warm_up(z: &Zygote) {
    for _ in 0..100 {
        black_box(z.run(noop, 1).await.expect("warm-up run"));
    }
    z.wait_idle().await;
}

/// A horizontal bar chart of the latency rows: p50 bars, p99 whiskers, on a
/// log scale so floors and peers of very different sizes fit one picture.
fn svg(rows: &[Row], date: &str) -> String {
    let (left, width, bar, gap) = (420.0, 460.0, 16.0, 8.0);
    let height = 60.0 + rows.len() as f64 * (bar + gap);
    let (lo, hi) = (1.0f64.log10(), 20_000.0f64.log10()); // 1 µs .. 20 ms
    let x = |d: Duration| {
        let us = (d.as_secs_f64() * 1e6).clamp(1.0, 20_000.0);
        left + (us.log10() - lo) / (hi - lo) * width
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">run-in-process: per-task latency, p50 (bar) and p99 (whisker), log scale. {date}</text>\n",
        left + width + 40.0
    );
    for tick in [1.0, 10.0, 100.0, 1_000.0, 10_000.0] {
        let tx = x(Duration::from_secs_f64(tick / 1e6));
        let label = if tick >= 1000.0 {
            format!("{} ms", tick / 1000.0)
        } else {
            format!("{tick} µs")
        };
        out += &format!(
            "<line x1=\"{tx:.1}\" y1=\"30\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
            height - 20.0,
            height - 6.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = 36.0 + i as f64 * (bar + gap);
        let colour = if r.name.starts_with("floor") {
            "#999"
        } else if r.name.starts_with("peer") {
            "#d98c3f"
        } else {
            "#3f7fd9"
        };
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{left}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bar}\" fill=\"{colour}\"/>\n\
             <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
            left - 8.0,
            y + bar - 4.0,
            r.name,
            (x(r.stats.p50) - left).max(1.0),
            x(r.stats.p50),
            y + bar / 2.0,
            x(r.stats.p99),
            y + bar / 2.0
        );
    }
    out + "</svg>\n"
}

// ---------------------------------------------------------------------------
// Measurement.

fn measure(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..n / 10 {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

async fn measure_async<F, Fut>(n: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        black_box(f().await);
        out.push(t.elapsed());
    }
    out
}

#[derive(Clone, Copy)]
struct Stats {
    p50: Duration,
    p99: Duration,
}

impl Stats {
    fn of(mut v: Vec<Duration>) -> Stats {
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        Stats {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

struct Row {
    name: &'static str,
    stats: Stats,
    vs: Option<String>,
}

impl Row {
    fn new(name: &'static str, stats: Stats) -> Row {
        Row {
            name,
            stats,
            vs: None,
        }
    }

    fn vs(mut self, floor: &Stats, what: &str) -> Row {
        self.vs = Some(format!(
            "{:.2}x {what} (p99 {:.2}x)",
            self.stats.p50.as_secs_f64() / floor.p50.as_secs_f64(),
            self.stats.p99.as_secs_f64() / floor.p99.as_secs_f64()
        ));
        self
    }
}

fn us(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Private (not shared with the zygote) memory of one idle parked worker,
/// from `/proc/<pid>/smaps_rollup`.
fn parked_private_kib(z: &Zygote) -> Option<u64> {
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", z.pid())).ok()?;
    let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Some(field("Private_Clean:") + field("Private_Dirty:"))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------
// Raw process primitives for the floors (no crate code involved).

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory-safety preconditions; a non-negative
    // result is a new fd that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh, open fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn write_u64(fd: RawFd, v: u64) {
    // SAFETY: writing 8 bytes from a valid local buffer.
    unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
}

fn read_u64(fd: RawFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a valid local buffer.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    v
}

/// Forks a child that runs `f` and `_exit`s. Only for a single-threaded
/// process: the bench process before it starts any thread, and the children
/// it forks then, which never start one.
fn fork_then(f: impl FnOnce()) -> libc::pid_t {
    // SAFETY: this benchmark forks only from processes that have one thread
    // (see `main` and `FloorServer`), so the child may run any code; it
    // leaves through `_exit`, running no destructor of the parent's.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        f();
        // SAFETY: `_exit` has no preconditions.
        unsafe { libc::_exit(0) };
    }
    pid
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// CPUs online, whatever this process's affinity (which `available_parallelism`
/// would follow, and which `pin` changes).
fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Pins process `pid` (0: this one) to `cpu`, if the machine has it.
fn pin(pid: libc::pid_t, cpu: usize) {
    if cpu >= cpus() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is the empty set (all bits clear).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the CPU count, far below CPU_SETSIZE, so the
    // bit CPU_SET writes is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of the size we pass; this affects scheduling only.
    unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// Lets process `pid` (0: this one) run on every CPU again.
fn unpin(pid: libc::pid_t) {
    // SAFETY: a zeroed cpu_set_t is the empty set (all bits clear).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..cpus() {
        // SAFETY: `cpu` is below the CPU count, far below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: a valid set of the size we pass; this affects scheduling only.
    unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// A fork floor to time in the floor server.
#[derive(Clone, Copy)]
enum Floor {
    /// `fork` + `_exit` + `waitpid`.
    ForkWait = 1,
    /// `fork`, the child writes an eventfd, the server wakes on it.
    ForkWake = 2,
}

/// A single-threaded child, forked at start-up as the zygote is, that times
/// the fork floors on request: the bench process itself has threads once
/// the peers have run, and a fork from it would then neither be allowed to
/// run Rust code nor cost what a fork from the zygote costs.
struct FloorServer {
    pid: libc::pid_t,
    stream: std::os::unix::net::UnixStream,
}

/// The floor server's request to exit.
const STOP: u64 = 0;

impl FloorServer {
    fn fork() -> FloorServer {
        let (stream, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let pid = fork_then(move || {
            use std::io::Read;
            let mut theirs = theirs;
            let efd = eventfd();
            let mut request = [0u8; 16];
            while theirs.read_exact(&mut request).is_ok() {
                let [kind, n] = [&request[..8], &request[8..]]
                    .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
                let times = if kind == STOP {
                    return;
                } else if kind == Floor::ForkWait as u64 {
                    measure(n as usize, || reap(fork_then(|| ())))
                } else {
                    measure(n as usize, || {
                        let pid = fork_then(|| write_u64(efd.as_raw_fd(), 1));
                        read_u64(efd.as_raw_fd());
                        // The reap is not on the caller's path in the crate
                        // either, but it must happen before the next fork so
                        // children never pile up.
                        let t = Instant::now();
                        reap(pid);
                        black_box(t.elapsed());
                    })
                };
                let bytes: Vec<u8> = times
                    .iter()
                    .flat_map(|t| (t.as_nanos() as u64).to_ne_bytes())
                    .collect();
                if theirs.write_all(&bytes).is_err() {
                    return;
                }
            }
        });
        FloorServer { pid, stream }
    }

    /// Sends one request: `kind` (a `Floor`, or `STOP`) and a count.
    fn ask(&mut self, kind: u64, n: usize) {
        let mut request = [0u8; 16];
        request[..8].copy_from_slice(&kind.to_ne_bytes());
        request[8..].copy_from_slice(&(n as u64).to_ne_bytes());
        self.stream
            .write_all(&request)
            .expect("ask the floor server");
    }

    /// `n` timings of `floor`, after `n / 10` untimed ones.
    fn times(&mut self, floor: Floor, n: usize) -> Vec<Duration> {
        use std::io::Read;
        self.ask(floor as u64, n);
        let mut bytes = vec![0u8; n * 8];
        self.stream
            .read_exact(&mut bytes)
            .expect("read the floor server's timings");
        bytes
            .chunks_exact(8)
            .map(|b| Duration::from_nanos(u64::from_ne_bytes(b.try_into().expect("8 bytes"))))
            .collect()
    }

    fn stop(mut self) {
        // Not end-of-stream: the children forked after it hold our end too.
        self.ask(STOP, 0);
        reap(self.pid);
    }
}

/// A child that answers each eventfd write with one of its own.
struct Echo {
    pid: libc::pid_t,
    ping: OwnedFd,
    pong: OwnedFd,
}

impl Echo {
    fn fork() -> Echo {
        let (ping, pong) = (eventfd(), eventfd());
        let (pi, po) = (ping.as_raw_fd(), pong.as_raw_fd());
        let pid = fork_then(move || {
            loop {
                if read_u64(pi) == u64::MAX {
                    return;
                }
                write_u64(po, 1);
            }
        });
        Echo { pid, ping, pong }
    }

    fn round_trip(&self) {
        write_u64(self.ping.as_raw_fd(), 1);
        read_u64(self.pong.as_raw_fd());
    }

    fn stop(self) {
        // SAFETY: signalling our own, unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid);
    }
}

/// The simplest fork server: a child that, per request byte, forks a worker
/// which rings an eventfd and exits, and reaps finished workers as it goes.
/// The throughput floor for "a fresh process per task".
struct RawForkServer {
    pid: libc::pid_t,
    requests: OwnedFd,
    done: OwnedFd,
}

impl RawForkServer {
    fn fork() -> RawForkServer {
        let (requests, done) = (eventfd(), eventfd());
        let (rq, dn) = (requests.as_raw_fd(), done.as_raw_fd());
        let pid = fork_then(move || {
            loop {
                let k = read_u64(rq);
                if k == u64::MAX {
                    return;
                }
                for _ in 0..k {
                    fork_then(|| write_u64(dn, 1));
                }
                let mut status = 0;
                // SAFETY: reaping our own children without blocking.
                while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
            }
        });
        RawForkServer {
            pid,
            requests,
            done,
        }
    }

    /// Tasks per second with `in_flight` requests outstanding.
    fn throughput(&self, total: usize, in_flight: usize) -> f64 {
        let start = Instant::now();
        write_u64(self.requests.as_raw_fd(), in_flight as u64);
        let (mut sent, mut finished) = (in_flight, 0);
        while finished < total {
            let k = read_u64(self.done.as_raw_fd()) as usize;
            finished += k;
            let more = k.min(total.saturating_sub(sent));
            if more > 0 {
                write_u64(self.requests.as_raw_fd(), more as u64);
                sent += more;
            }
        }
        total as f64 / start.elapsed().as_secs_f64()
    }

    fn stop(self) {
        // SAFETY: signalling our own, unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid);
    }
}

/// The floor for reuse mode: long-lived workers, each woken by a 64-byte job
/// on a `SOCK_SEQPACKET` pair and answering on an eventfd of its own, which
/// the parent waits on with epoll. These are the system calls a reused task
/// makes (`ppoll`, `recv` and `write` in the worker; `sendmsg`, `read` and
/// `epoll_wait` in the parent), with no runtime, no ring and no result.
struct RawPool {
    pids: Vec<libc::pid_t>,
    jobs: Vec<OwnedFd>,
    done: Vec<OwnedFd>,
    epoll: OwnedFd,
}

impl RawPool {
    fn fork(workers: usize) -> RawPool {
        // SAFETY: epoll_create1 has no memory-safety preconditions.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            epoll >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh, open fd owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let (mut pids, mut jobs, mut done) = (vec![], vec![], vec![]);
        for i in 0..workers {
            let mut pair = [0; 2];
            // SAFETY: `pair` has room for the two fds socketpair writes.
            let r = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    pair.as_mut_ptr(),
                )
            };
            assert!(r == 0, "socketpair: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh, open fd owned by nobody else.
            let ours = unsafe { OwnedFd::from_raw_fd(pair[0]) };
            // SAFETY: the other fresh, open fd, owned by nobody else.
            let theirs = unsafe { OwnedFd::from_raw_fd(pair[1]) };
            let doorbell = eventfd();
            let (sock, bell) = (theirs.as_raw_fd(), doorbell.as_raw_fd());
            pids.push(fork_then(move || {
                let mut buf = [0u8; 256];
                loop {
                    let mut p = libc::pollfd {
                        fd: sock,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; no timeout, no signal mask.
                    unsafe { libc::ppoll(&mut p, 1, std::ptr::null(), std::ptr::null()) };
                    // SAFETY: receiving into a valid local buffer of its length.
                    let n = unsafe {
                        libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                    };
                    if n <= 0 {
                        return;
                    }
                    write_u64(bell, 1);
                }
            }));
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: registering an open fd with a valid event.
            let r = unsafe {
                libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, bell, &mut event)
            };
            assert!(r == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
            drop(theirs);
            jobs.push(ours);
            done.push(doorbell);
        }
        RawPool {
            pids,
            jobs,
            done,
            epoll,
        }
    }

    fn send(&self, worker: usize) {
        let job = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: job.as_ptr() as *mut _,
            iov_len: job.len(),
        };
        // SAFETY: a zeroed msghdr is a message with no name and no control data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: `msg` names one valid buffer, which the kernel only reads.
        unsafe { libc::sendmsg(self.jobs[worker].as_raw_fd(), &msg, 0) };
    }

    /// Tasks per second, one job in flight per worker.
    fn throughput(&self, total: usize) -> f64 {
        let start = Instant::now();
        let mut sent = 0;
        for worker in 0..self.jobs.len().min(total) {
            self.send(worker);
            sent += 1;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let mut finished = 0;
        while finished < total {
            // SAFETY: `events` has room for the 8 events we allow.
            let k = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 8, -1) };
            for event in events.iter().take(usize::try_from(k).unwrap_or(0)) {
                let worker = event.u64 as usize;
                finished += read_u64(self.done[worker].as_raw_fd()) as usize;
                if sent < total {
                    self.send(worker);
                    sent += 1;
                }
            }
        }
        total as f64 / start.elapsed().as_secs_f64()
    }

    fn stop(self) {
        for pid in self.pids {
            // SAFETY: signalling our own, unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
        }
    }
}

/// The lowest and highest of a few ratios, as `0.52-0.87x`.
fn span(values: &[f64]) -> String {
    let (lo, hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{lo:.2}-{hi:.2}x")
}

/// The median of a few measurements (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}
