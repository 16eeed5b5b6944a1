//! `Builder::respawn`: a zygote that dies is replaced by one forked from the
//! template. A `harness = false` target: every zygote (and its template)
//! starts in `main` while the process has one thread, and each trial owns
//! one, drops it, and checks that nothing of it is left.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{HANG, TestResult, ensure, open_fds, processes};
use libtest_mimic::{Failed, Trial};
use run_in_process::{Builder, ErrorKind, Zygote};

/// The test process's pid, for the warm-up hook to tell a zygote forked by
/// the template (whose parent is the template) from the first one.
static MAIN: AtomicU32 = AtomicU32::new(0);

/// A zygote of a trial's own, and its template's pid.
struct Owned {
    zygote: Zygote,
    template: u32,
}

fn children() -> BTreeSet<u32> {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|p| p.ppid == me)
        .map(|p| p.pid)
        .collect()
}

/// Starts a zygote with respawn, and finds its template: the one new child
/// that is not a zygote.
fn start(builder: Builder) -> Owned {
    let before = children();
    let zygote = builder.respawn(true).start().expect("start a zygote");
    let zygotes: BTreeSet<u32> = zygote.pids().into_iter().collect();
    let new: Vec<u32> = children()
        .difference(&before)
        .filter(|p| !zygotes.contains(p))
        .copied()
        .collect();
    assert_eq!(new.len(), 1, "one template besides the zygotes: {new:?}");
    Owned {
        zygote,
        template: new[0],
    }
}

fn main() {
    MAIN.store(std::process::id(), Ordering::Relaxed);
    let owned: Vec<(&str, Owned, Trial_)> = vec![
        (
            "killed_zygote_fails_tasks_in_flight_then_respawns",
            start(Zygote::builder()),
            in_flight_fail_then_respawn,
        ),
        (
            "repeated_kills_each_respawn",
            start(Zygote::builder()),
            repeated_kills,
        ),
        (
            "one_of_two_zygotes_killed_is_respawned",
            start(Zygote::builder().zygotes(2)),
            one_of_two,
        ),
        (
            "after_the_template_is_killed_calls_fail_zygote_died",
            start(Zygote::builder()),
            template_killed,
        ),
        (
            "a_warm_up_that_panics_on_respawn_fails_the_call",
            start(Zygote::builder().warm_up(panics_unless_first)),
            warm_up_panics,
        ),
        (
            "a_warm_up_hook_runs_in_a_respawned_zygote",
            start(Zygote::builder().warm_up(mark_warm)),
            warm_up_runs,
        ),
    ];
    let args = common::harness_args();
    let trials = owned
        .into_iter()
        .map(|(name, owned, body)| Trial::test(name, move || run_trial(owned, body)))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

type Trial_ = fn(&Owned) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>>;

/// Runs `body` on a fresh runtime, drops the zygote, and checks that no
/// process, zombie or fd of it (nor of any zygote it respawned) is left.
fn run_trial(owned: Owned, body: Trial_) -> TestResult {
    let fds_before = open_fds();
    let rt = tokio::runtime::Runtime::new()?;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    let outcome = rt.block_on(async {
        seen.lock().unwrap().extend(owned.zygote.pids());
        let outcome = tokio::time::timeout(HANG, body(&owned))
            .await
            .unwrap_or_else(|_| Err("trial hung".into()));
        seen.lock().unwrap().extend(owned.zygote.pids());
        tokio::time::timeout(HANG, owned.zygote.wait_idle())
            .await
            .map_err(|_| Failed::from("workers were not reaped"))?;
        outcome
    });
    drop(rt);
    let template = owned.template;
    drop(owned);
    outcome?;
    let mut parents = seen.into_inner().unwrap();
    parents.insert(template);
    let me = std::process::id();
    let left = || -> Vec<_> {
        processes()
            .into_iter()
            .filter(|p| {
                parents.contains(&p.pid)
                    || parents.contains(&p.ppid)
                    || (p.ppid == me && p.state == 'Z')
            })
            .collect()
    };
    // A zygote whose template was killed is reparented to init, which reaps
    // it in its own time: wait for that, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = left();
    ensure(left.is_empty(), format!("left behind: {left:?}"))?;
    let leaked: Vec<_> = open_fds().difference(&fds_before).cloned().collect();
    ensure(leaked.is_empty(), format!("leaked fds: {leaked:?}"))
}

fn square(x: u64) -> u64 {
    x * x
}

fn sleep_forever(_: ()) -> u64 {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Panics in a zygote forked by the template, not in the first one.
fn panics_unless_first() {
    if std::os::unix::process::parent_id() != MAIN.load(Ordering::Relaxed) {
        panic!("this warm-up refuses to run in a respawned zygote");
    }
}

static WARM: AtomicU32 = AtomicU32::new(0);

fn mark_warm() {
    WARM.store(std::os::unix::process::parent_id(), Ordering::Relaxed);
}

/// The warm-up's mark, as a worker inherits it from its zygote.
fn warm_mark(_: ()) -> u32 {
    WARM.load(Ordering::Relaxed)
}

fn kill(pid: u32) -> TestResult {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    ensure(r == 0, format!("kill {pid}"))
}

fn parent_of(pid: u32) -> Option<u32> {
    processes()
        .into_iter()
        .find(|p| p.pid == pid)
        .map(|p| p.ppid)
}

/// Waits until `pid` has exited (a zombie, or reaped).
async fn wait_dead(pid: u32) -> TestResult {
    let deadline = Instant::now() + HANG;
    loop {
        match processes().into_iter().find(|p| p.pid == pid) {
            None => return Ok(()),
            Some(p) if p.state == 'Z' => return Ok(()),
            Some(_) if Instant::now() > deadline => {
                return Err(format!("{pid} did not die").into());
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

fn in_flight_fail_then_respawn(
    o: &Owned,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>> {
    Box::pin(async move {
        let z = &o.zygote;
        let first = z.pid();
        let before = z.stats();
        let a = z.open(sleep_forever, ()).await?;
        let b = z.open(sleep_forever, ()).await?;
        kill(first)?;
        for p in [a, b] {
            let e = p.result().await.unwrap_err();
            ensure(
                e.kind() == ErrorKind::ZygoteDied,
                format!("in flight: {e:?}"),
            )?;
        }
        let n: u64 = z.run(square, 7).await?;
        ensure(n == 49, format!("square(7) = {n}"))?;
        let second = z.pid();
        ensure(second != first, "a new zygote pid")?;
        ensure(
            parent_of(second) == Some(o.template),
            format!(
                "the new zygote's parent is the template: {:?}",
                parent_of(second)
            ),
        )?;
        // It serves as the first one did, many tasks at once.
        let all = futures_util::future::join_all((0..20u64).map(|i| z.run(square, i))).await;
        for (i, r) in all.into_iter().enumerate() {
            ensure(r? == (i * i) as u64, "a later task's value")?;
        }
        // The counts go on across the respawn: two tasks lost with the
        // first zygote, 21 completed by its replacement.
        z.wait_idle().await;
        let after = z.stats();
        ensure(
            (
                after.spawned - before.spawned,
                after.lost - before.lost,
                after.completed - before.completed,
            ) == (23, 2, 21),
            format!("stats across the respawn: {before:?} then {after:?}"),
        )
    })
}

fn repeated_kills(
    o: &Owned,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>> {
    Box::pin(async move {
        let z = &o.zygote;
        let mut pids = BTreeSet::new();
        let mut costs = Vec::new();
        for round in 0..5u64 {
            let pid = z.pid();
            pids.insert(pid);
            // Every other round with a task in flight; the others with none,
            // so that only the zygote's pidfd tells its death.
            let doomed = if round % 2 == 0 {
                Some(z.open(sleep_forever, ()).await?)
            } else {
                None
            };
            let killed = Instant::now();
            kill(pid)?;
            if let Some(p) = doomed {
                let e = p.result().await.unwrap_err();
                ensure(
                    e.kind() == ErrorKind::ZygoteDied,
                    format!("in flight: {e:?}"),
                )?;
            }
            wait_dead(pid).await?;
            let noticed = Instant::now();
            let n: u64 = z.run(square, round).await?;
            costs.push((noticed - killed, noticed.elapsed()));
            ensure(n == round * round, format!("round {round}: {n}"))?;
            ensure(
                !pids.contains(&z.pid()),
                format!("round {round}: a new pid"),
            )?;
        }
        eprintln!("respawn: (kill to death seen, death seen to first result) per round: {costs:?}");
        Ok(())
    })
}

fn one_of_two(o: &Owned) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>> {
    Box::pin(async move {
        let z = &o.zygote;
        let before = z.pids();
        kill(before[1])?;
        wait_dead(before[1]).await?;
        for i in 0..10u64 {
            ensure(z.run(square, i).await? == i * i, "a task after the kill")?;
        }
        let after = z.pids();
        ensure(after[0] == before[0], "the live zygote stays")?;
        ensure(after[1] != before[1], "the dead one is replaced")?;
        ensure(
            parent_of(after[1]) == Some(o.template),
            "the new one is the template's child",
        )
    })
}

fn template_killed(
    o: &Owned,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>> {
    Box::pin(async move {
        let z = &o.zygote;
        let first = z.pid();
        kill(first)?;
        wait_dead(first).await?;
        ensure(z.run(square, 3).await? == 9, "respawned once")?;
        let second = z.pid();
        // The zygote it respawned dies with the template.
        kill(o.template)?;
        wait_dead(second).await?;
        for _ in 0..3 {
            let e = z.run(square, 4).await.unwrap_err();
            ensure(
                e.kind() == ErrorKind::ZygoteDied,
                format!("later call: {e:?}"),
            )?;
        }
        Ok(())
    })
}

fn warm_up_panics(
    o: &Owned,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>> {
    Box::pin(async move {
        let z = &o.zygote;
        ensure(z.run(square, 2).await? == 4, "the first zygote serves")?;
        let first = z.pid();
        kill(first)?;
        wait_dead(first).await?;
        for _ in 0..3 {
            let e = z.run(square, 4).await.unwrap_err();
            ensure(
                e.kind() == ErrorKind::ZygoteDied
                    && e.to_string().contains("warm-up hook panicked"),
                format!("a failed respawn: {e}"),
            )?;
        }
        ensure(z.pid() == first, "no zygote replaced the dead one")
    })
}

fn warm_up_runs(
    o: &Owned,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult> + '_>> {
    Box::pin(async move {
        let z = &o.zygote;
        let main = MAIN.load(Ordering::Relaxed);
        ensure(
            z.run(warm_mark, ()).await? == main,
            "the first hook ran in a child of main",
        )?;
        let first = z.pid();
        kill(first)?;
        wait_dead(first).await?;
        let mark = z.run(warm_mark, ()).await?;
        ensure(
            mark == o.template,
            format!("the hook ran in the template's child: {mark}"),
        )
    })
}
