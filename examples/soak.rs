//! A seeded soak: a random mix of every way a task can end, with the process,
//! fd and memory accounting checked at quiet points, and the second half of
//! the run compared with the first.
//!
//! `cargo run --release --example soak -- --tasks 20000 --seed 1`
//!
//! Options: `--tasks N`, `--seed S`, `--zygotes Z` (default 2), `--in-flight K`
//! (default 16), `--checkpoints C` (default 20), `--zygote-kills N` (default 4:
//! SIGKILL a zygote N times during the run, spread evenly; the zygotes
//! respawn, `Builder::respawn`), `--no-respawn` (then at most `Z - 1` kills),
//! `--no-cancel-big` (leave out cancelled large results), `--reuse N` (default
//! 1: a fresh process per task; above 1, reuse mode, `Builder::reuse`).
//! Exits with status 1 if any task ended the wrong way or anything leaked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill, raise};
use nix::unistd::Pid;
use run_in_process::{Error, ErrorKind, Zygote};

/// What a soak run does.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) tasks: u64,
    pub(crate) seed: u64,
    pub(crate) zygotes: usize,
    pub(crate) in_flight: usize,
    pub(crate) checkpoints: u64,
    pub(crate) zygote_kills: u64,
    pub(crate) respawn: bool,
    pub(crate) cancel_big: bool,
    pub(crate) reuse: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tasks: 20_000,
            seed: 1,
            zygotes: 2,
            in_flight: 16,
            checkpoints: 20,
            zygote_kills: 4,
            respawn: true,
            cancel_big: true,
            reuse: 1,
        }
    }
}

impl Config {
    fn from_args() -> Result<Config, String> {
        let mut config = Config::default();
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| format!("{flag} needs a number"))
            };
            match flag.as_str() {
                "--tasks" => config.tasks = value()?,
                "--seed" => config.seed = value()?,
                "--zygotes" => config.zygotes = value()? as usize,
                "--in-flight" => config.in_flight = value()? as usize,
                "--checkpoints" => config.checkpoints = value()?.max(2),
                "--zygote-kills" => config.zygote_kills = value()?,
                "--no-cancel-big" => config.cancel_big = false,
                "--no-respawn" => config.respawn = false,
                "--reuse" => {
                    config.reuse = u32::try_from(value()?).map_err(|_| "--reuse is too big")?
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(config)
    }
}

/// The ways a task is made to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ok,
    Panic,
    Segfault,
    Abort,
    Exit,
    Cancel,
    Timeout,
    Kill,
    Big,
    CancelBig,
}

impl Kind {
    /// Weighted: mostly healthy tasks, as a service would see.
    fn pick(r: u64, cancel_big: bool) -> Kind {
        const TABLE: [(Kind, u64); 10] = [
            (Kind::Ok, 45),
            (Kind::Panic, 8),
            (Kind::Segfault, 5),
            (Kind::Abort, 5),
            (Kind::Exit, 5),
            (Kind::Cancel, 6),
            (Kind::Timeout, 4),
            (Kind::Kill, 4),
            (Kind::Big, 10),
            (Kind::CancelBig, 8),
        ];
        let total: u64 = TABLE.iter().map(|(_, w)| w).sum();
        let mut r = r % total;
        for (kind, weight) in TABLE {
            if r < weight {
                return if kind == Kind::CancelBig && !cancel_big {
                    Kind::Big
                } else {
                    kind
                };
            }
            r -= weight;
        }
        Kind::Ok
    }
}

/// splitmix64: a seeded sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------
// The task functions, run in workers.

/// The value, and the worker that computed it.
fn healthy(n: u64) -> (u64, u32) {
    (expected(n), std::process::id())
}

fn expected(n: u64) -> u64 {
    n.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 7
}

fn panics(n: u64) -> u64 {
    panic!("soak task {n} panics");
}

fn segfaults(_: u64) -> u64 {
    // The first one lands in std's stack-overflow handler, which sees no
    // guard-page fault, restores the default action and returns; the
    // second is fatal, as a real crash is.
    let _ = raise(Signal::SIGSEGV);
    let _ = raise(Signal::SIGSEGV);
    unreachable!("SIGSEGV is fatal here");
}

fn aborts(_: u64) -> u64 {
    std::process::abort();
}

#[allow(clippy::disallowed_methods)] // reason: the task exits as user code may
fn exits(n: u64) -> u64 {
    std::process::exit(1 + (n % 100) as i32);
}

fn sleeps(millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

fn spins(_: u64) -> u64 {
    loop {
        std::hint::spin_loop();
    }
}

/// A result too big for a ring slot: it goes through a spill memfd. As a
/// byte string (`ByteBuf`), as large results should be: a `Vec<u8>` is a
/// sequence of `u8`s to serde, encoded one element at a time.
fn big((n, len): (u64, usize)) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(pattern(n, len))
}

/// Task `n`'s bytes: its own fill, and a counter every 4093 bytes (a prime,
/// so a shifted or truncated copy does not match). Cheap even unoptimised.
fn pattern(n: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![n as u8; len];
    for (i, b) in bytes.iter_mut().step_by(4093).enumerate() {
        *b = i as u8 ^ 0x5a;
    }
    bytes
}

// ---------------------------------------------------------------------------
// The parent's side.

/// How a task came out, when it came out as it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    As(Kind),
    /// Cancelled before it finished (a cancelled kind that beat its timer
    /// is counted as finished).
    Cancelled,
    /// In flight on a zygote that was killed: `ZygoteDied`.
    LostToZygoteKill,
    /// An `Ok` task returned the right value, computed in this worker.
    Healthy(u32),
}

/// Runs task `n` of kind `kind` (`r` is its random number). In the batch
/// during which a zygote is killed (`killing`), a task may fail with
/// `ZygoteDied`: it was in flight on that zygote, or sent to it before its
/// death was noticed. In any other batch that is wrong.
async fn one(z: &Zygote, kind: Kind, n: u64, r: u64, killing: bool) -> Result<Seen, String> {
    let died = |e: &Error| e.kind() == ErrorKind::ZygoteDied && killing;
    let wrong = |what: String| Err(format!("task {n} ({kind:?}): {what}"));
    let failed = |e: Error, expect: &dyn Fn(&Error) -> bool| {
        if expect(&e) {
            Ok(Seen::As(kind))
        } else if died(&e) {
            Ok(Seen::LostToZygoteKill)
        } else {
            wrong(format!("unexpected error: {e}"))
        }
    };
    let signaled = |sig: Signal| {
        move |e: &Error| e.kind() == ErrorKind::Signaled && e.signal() == Some(sig as i32)
    };
    match kind {
        Kind::Ok => match z.run(healthy, n).await {
            Ok((v, pid)) if v == expected(n) => Ok(Seen::Healthy(pid)),
            Ok((v, _)) => wrong(format!("WRONG value {v}")),
            Err(e) => failed(e, &|_| false),
        },
        Kind::Panic => match z.run(panics, n).await {
            Ok(v) => wrong(format!("returned {v}")),
            Err(e) => failed(e, &|e| {
                e.kind() == ErrorKind::Panicked
                    && e.panic_message()
                        .is_some_and(|m| m.starts_with(&format!("soak task {n} panics")))
            }),
        },
        Kind::Segfault => match z.run(segfaults, n).await {
            Ok(v) => wrong(format!("returned {v}")),
            Err(e) => failed(e, &signaled(Signal::SIGSEGV)),
        },
        Kind::Abort => match z.run(aborts, n).await {
            Ok(v) => wrong(format!("returned {v}")),
            Err(e) => failed(e, &signaled(Signal::SIGABRT)),
        },
        Kind::Exit => match z.run(exits, n).await {
            Ok(v) => wrong(format!("returned {v}")),
            Err(e) => failed(e, &|e| {
                e.kind() == ErrorKind::Exited && e.exit_code() == Some(1 + (n % 100) as i32)
            }),
        },
        Kind::Cancel => {
            let timer = Duration::from_micros(r % 3000);
            match tokio::time::timeout(timer, z.run(sleeps, 50)).await {
                Err(_elapsed) => Ok(Seen::Cancelled),
                Ok(Ok(50)) => Ok(Seen::As(kind)),
                Ok(Ok(v)) => wrong(format!("WRONG value {v}")),
                Ok(Err(e)) => failed(e, &|_| false),
            }
        }
        Kind::Timeout => {
            // A short grace: the spinner never looks at `stop_requested`, so
            // it is killed when the grace ends (2 s by default).
            let task = z
                .task(spins, n)
                .timeout(Duration::from_millis(10))
                .grace(Duration::from_millis(5));
            match task.run().await {
                Ok(v) => wrong(format!("returned {v}")),
                Err(e) => failed(e, &|e| e.kind() == ErrorKind::TimedOut),
            }
        }
        Kind::Kill => {
            let mut p = match z.open(sleeps, 10_000).await {
                Ok(p) => p,
                Err(e) => return failed(e, &|_| false),
            };
            if let Err(e) = p.kill() {
                return failed(e, &|_| false);
            }
            if let Err(e) = p.wait().await {
                return failed(e, &|_| false);
            }
            match p.result().await {
                Ok(v) => wrong(format!("returned {v}")),
                Err(e) => failed(e, &signaled(Signal::SIGKILL)),
            }
        }
        Kind::Big | Kind::CancelBig => {
            let len = 64 * 1024 + (r % (4 << 20)) as usize;
            let run = z.run(big, (n, len));
            let outcome = if kind == Kind::CancelBig {
                let timer = Duration::from_micros(r % 2000);
                match tokio::time::timeout(timer, run).await {
                    Err(_elapsed) => return Ok(Seen::Cancelled),
                    Ok(outcome) => outcome,
                }
            } else {
                run.await
            };
            match outcome {
                Ok(v) if v.len() == len && *v == pattern(n, len) => Ok(Seen::As(kind)),
                Ok(v) => wrong(format!("WRONG result of {} bytes", v.len())),
                Err(e) => failed(e, &|_| false),
            }
        }
    }
}

/// The process, fd and memory accounting at a quiet point.
#[derive(Clone, Debug)]
pub(crate) struct Checkpoint {
    pub(crate) tasks: u64,
    /// Open fds, not counting those idle workers keep in the parent (a
    /// pidfd each, and a reused one's doorbell and report socket too), whose
    /// number follows how many wait: what is left stays flat unless fds leak.
    pub(crate) fds: usize,
    /// The fds idle workers keep.
    pub(crate) idle_fds: usize,
    pub(crate) rss_kib: u64,
    pub(crate) zombies: usize,
    /// Processes under this one (or its zygotes) that should not be there.
    pub(crate) strays: usize,
}

fn checkpoint(z: &Zygote, tasks: u64, parked: usize, respawn: bool) -> Checkpoint {
    let me = std::process::id();
    let zygotes = z.pids();
    // (pid, ppid, state) of every process.
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().unwrap_or("?").to_string();
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        procs.push((pid, ppid, state));
    }
    let children = |of: u32| procs.iter().filter(move |p| p.1 == of);
    let mut zombies = 0;
    let mut strays = 0;
    // This process's children: the zygotes it started, and with respawn the
    // template, whose only children are the zygotes it respawned.
    let mut templates = 0;
    for (pid, _, state) in children(me) {
        if state == "Z" {
            zombies += 1;
        } else if zygotes.contains(pid) {
        } else if respawn && templates == 0 {
            templates += 1;
            for (child, _, state) in children(*pid) {
                if state == "Z" {
                    zombies += 1;
                } else if !zygotes.contains(child) {
                    strays += 1;
                }
            }
        } else {
            strays += 1;
        }
    }
    // Each zygote keeps up to `parked` idle workers; more is a stray.
    for zygote in &zygotes {
        let workers: Vec<_> = children(*zygote).collect();
        zombies += workers.iter().filter(|w| w.2 == "Z").count();
        strays += workers.len().saturating_sub(parked);
    }
    let stats = z.stats();
    let idle_fds = (stats.parked + 2 * stats.reused) as usize;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map_or(0, |d| d.count())
        .saturating_sub(idle_fds);
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Checkpoint {
        tasks,
        fds,
        idle_fds,
        rss_kib,
        zombies,
        strays,
    }
}

/// What a soak run saw.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) elapsed: Duration,
    pub(crate) counts: BTreeMap<String, u64>,
    pub(crate) wrong: Vec<String>,
    pub(crate) checkpoints: Vec<Checkpoint>,
    pub(crate) zygote_kills: u64,
    pub(crate) problems: Vec<String>,
    /// The workers that computed the `Ok` tasks' values.
    pub(crate) healthy_workers: BTreeSet<u32>,
}

impl Report {
    pub(crate) fn ok(&self) -> bool {
        self.wrong.is_empty() && self.problems.is_empty()
    }

    /// Steady state: no zombie or stray at any quiet point, and the second
    /// half of the run holds no more fds (at its median checkpoint), and
    /// not materially more memory, than the first. In reuse mode, some
    /// worker served more than one `Ok` task (else the run tested fresh
    /// workers only).
    fn judge(&mut self, reuse: u32) {
        let healthy = self.counts.get("Ok").copied().unwrap_or(0);
        if reuse > 1 && healthy > 1 && self.healthy_workers.len() as u64 >= healthy {
            self.problems.push(format!(
                "reuse mode: {healthy} Ok tasks ran in as many workers"
            ));
        }
        for c in &self.checkpoints {
            if c.zombies > 0 || c.strays > 0 {
                self.problems.push(format!(
                    "after {} tasks: {} zombies, {} strays",
                    c.tasks, c.zombies, c.strays
                ));
            }
        }
        let half = self.checkpoints.len() / 2;
        let (first, second) = self.checkpoints.split_at(half);
        let max = |cs: &[Checkpoint], f: fn(&Checkpoint) -> u64| cs.iter().map(f).max();
        // The second half's median, not its maximum: a leak raises most of
        // the second half above the first, while a bounded cache that
        // refills (a respawned zygote's report pairs, say) may add a couple
        // of fds at one quiet point.
        let median = |cs: &[Checkpoint]| {
            let mut fds: Vec<u64> = cs.iter().map(|c| c.fds as u64).collect();
            fds.sort_unstable();
            fds.get(fds.len() / 2).copied()
        };
        if let (Some(a), Some(b)) = (max(first, |c| c.fds as u64), median(second)) {
            if b > a {
                self.problems.push(format!(
                    "fds grew: at most {a} in the first half, a median of {b} in the second"
                ));
            }
        }
        if let (Some(a), Some(b)) = (max(first, |c| c.rss_kib), max(second, |c| c.rss_kib)) {
            // Allocator noise (glibc raises its mmap threshold after large
            // frees, so big results may come to stay on the heap): 10% plus
            // 16 MiB. A per-task leak shows in a long run (docs/soak.md).
            if b > a + a / 10 + 16 * 1024 {
                self.problems.push(format!(
                    "RSS grew: {a} KiB in the first half, {b} KiB in the second"
                ));
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.checkpoints.last().map_or(0, |c| c.tasks);
        writeln!(
            f,
            "{total} tasks in {:.1} s ({:.0} tasks/s), {} zygote kills",
            self.elapsed.as_secs_f64(),
            total as f64 / self.elapsed.as_secs_f64(),
            self.zygote_kills
        )?;
        for (what, n) in &self.counts {
            writeln!(f, "  {what:<24} {n:>9}")?;
        }
        writeln!(
            f,
            "  Ok tasks ran in {} worker processes",
            self.healthy_workers.len()
        )?;
        writeln!(
            f,
            "  {:>9} {:>5} {:>5} {:>9} {:>7} {:>6}",
            "tasks", "fds", "+idle", "RSS KiB", "zombies", "strays"
        )?;
        for c in &self.checkpoints {
            writeln!(
                f,
                "  {:>9} {:>5} {:>5} {:>9} {:>7} {:>6}",
                c.tasks, c.fds, c.idle_fds, c.rss_kib, c.zombies, c.strays
            )?;
        }
        for w in self.wrong.iter().take(20) {
            writeln!(f, "WRONG: {w}")?;
        }
        for p in &self.problems {
            writeln!(f, "PROBLEM: {p}")?;
        }
        write!(
            f,
            "{}",
            if self.ok() {
                "soak: ok"
            } else {
                "soak: FAILED"
            }
        )
    }
}

/// Starts the soak's zygotes. Call it while the process has one thread.
pub(crate) fn start(config: &Config) -> Result<Zygote, Error> {
    Zygote::builder()
        .zygotes(config.zygotes)
        .max_in_flight(config.in_flight.max(config.zygotes) as u32)
        .respawn(config.respawn)
        .reuse(config.reuse)
        .start()
}

/// Runs a soak on zygotes from [`start`], on a runtime of its own.
pub(crate) fn drive(config: &Config, z: Zygote) -> Result<Report, Box<dyn std::error::Error>> {
    // Idle workers a zygote may keep: its parked ones, and in reuse mode
    // one per slot it has (`max_in_flight` divided among the zygotes).
    let slots = config
        .in_flight
        .max(config.zygotes)
        .div_ceil(config.zygotes);
    let parked = if config.reuse > 1 {
        slots.max(run_in_process::DEFAULT_PARKED as usize)
    } else {
        run_in_process::DEFAULT_PARKED as usize
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut rng = Rng(config.seed);
    let mut report = Report::default();
    // The kills allowed: without respawn, never the last live zygote.
    let kills = if config.respawn {
        config.zygote_kills
    } else {
        config.zygote_kills.min(config.zygotes as u64 - 1)
    };
    let per_checkpoint = config.tasks.div_ceil(config.checkpoints).max(1);
    let kill_every = (kills > 0).then(|| config.checkpoints.div_ceil(kills + 1).max(1));
    let start = Instant::now();
    rt.block_on(async {
        // The baseline, before any task.
        report
            .checkpoints
            .push(checkpoint(&z, 0, parked, config.respawn));
        let mut done = 0;
        let mut round = 0;
        while done < config.tasks {
            let batch: Vec<(Kind, u64, u64)> = (done..(done + per_checkpoint).min(config.tasks))
                .map(|n| (Kind::pick(rng.next(), config.cancel_big), n, rng.next()))
                .collect();
            done += batch.len() as u64;
            round += 1;
            let kill_now =
                kill_every.is_some_and(|k| round % k == 0) && report.zygote_kills < kills;
            let victim = z.pids()[report.zygote_kills as usize % config.zygotes];
            let outcomes = futures_util::stream::iter(batch.into_iter().enumerate())
                .map(|(i, (kind, n, r))| {
                    let z = &z;
                    async move {
                        // Mid-batch, so that tasks are in flight on it.
                        if kill_now && i == per_checkpoint as usize / 2 {
                            let _ = kill(Pid::from_raw(victim as i32), Signal::SIGKILL);
                        }
                        (kind, one(z, kind, n, r, kill_now).await)
                    }
                })
                .buffer_unordered(config.in_flight)
                .collect::<Vec<_>>()
                .await;
            if kill_now {
                report.zygote_kills += 1;
            }
            for (kind, outcome) in outcomes {
                match outcome {
                    Ok(seen) => {
                        let what = match seen {
                            Seen::As(k) => format!("{k:?}"),
                            Seen::Healthy(pid) => {
                                report.healthy_workers.insert(pid);
                                format!("{kind:?}")
                            }
                            Seen::Cancelled => format!("{kind:?}: cancelled"),
                            Seen::LostToZygoteKill => format!("{kind:?}: zygote killed"),
                        };
                        *report.counts.entry(what).or_default() += 1;
                    }
                    Err(w) => report.wrong.push(w),
                }
            }
            z.wait_idle().await;
            report
                .checkpoints
                .push(checkpoint(&z, done, parked, config.respawn));
        }
    });
    report.elapsed = start.elapsed();
    drop(rt);
    drop(z);
    // The first checkpoint is before any task ran: the caches (report
    // sockets, the tokio signal pipe) fill during the first batches.
    report.checkpoints.remove(0);
    report.judge(config.reuse);
    Ok(report)
}

/// [`drive`], then prints the report; an error if it found a wrong outcome
/// or a leak. What `main` and the test targets run.
pub(crate) fn check(config: &Config, z: Zygote) -> Result<(), Box<dyn std::error::Error>> {
    let report = drive(config, z)?;
    println!("{report}");
    if report.ok() {
        Ok(())
    } else {
        Err("the soak found wrong outcomes or leaks (see above)".into())
    }
}

#[allow(dead_code)] // reason: tests/soak*.rs include this file for `start` and `check`
fn main() -> std::process::ExitCode {
    let config = match Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    println!("soak: {config:?}");
    match start(&config)
        .map_err(Into::into)
        .and_then(|z| check(&config, z))
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
