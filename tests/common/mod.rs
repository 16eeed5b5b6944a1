//! Shared harness for the `harness = false` fork-test targets: run a trial on
//! a fresh runtime, then check `/proc` for zombies, stray workers and leaked
//! fds.

#![allow(dead_code)] // reason: each test target uses a different subset

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed};
use run_in_process::Zygote;

pub(crate) type TestResult = Result<(), Failed>;

/// The harness arguments for a fork-test target. Call it after starting the
/// zygotes (it creates a runtime, which starts threads).
///
/// One test thread makes libtest-mimic run every trial on `main`. And tokio
/// keeps a process-wide socketpair for its signal driver, created by the
/// first runtime: creating it here keeps the fd checks from counting it.
pub(crate) fn harness_args() -> Arguments {
    drop(tokio::runtime::Runtime::new().expect("warm-up runtime"));
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    args
}

/// A catch-all timeout so that a hang fails the trial instead of the job.
pub(crate) const HANG: Duration = Duration::from_secs(60);

/// Runs one trial on a fresh multi-threaded runtime, then checks hygiene.
pub(crate) fn checked<F, Fut>(zygote: &Zygote, body: F) -> TestResult
where
    F: FnOnce(Zygote) -> Fut,
    Fut: Future<Output = TestResult>,
{
    checked_pooled(zygote, &[], body)
}

/// What an idle reused worker keeps in the parent between its tasks (reuse
/// mode): its pidfd, and its doorbell and report socket (`mailbox::Kept`).
pub(crate) const REUSED_KEPT: &[&str] = &["anon_inode:[pidfd]", "anon_inode:[eventfd]", "socket:["];

/// As [`checked`], for a zygote whose idle workers may keep fds of the
/// kinds in `kept` (the `/proc/self/fd` link text they contain) in the
/// parent: at most one of each kind per worker of the pools.
pub(crate) fn checked_pooled<F, Fut>(zygote: &Zygote, kept: &[&str], body: F) -> TestResult
where
    F: FnOnce(Zygote) -> Fut,
    Fut: Future<Output = TestResult>,
{
    let fds_before = open_fds();
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async {
        let outcome = tokio::time::timeout(HANG, body(zygote.clone()))
            .await
            .unwrap_or_else(|_| Err("trial hung".into()));
        tokio::time::timeout(HANG, zygote.wait_idle())
            .await
            .map_err(|_| Failed::from("workers were not reaped"))?;
        outcome
    });
    drop(rt);
    outcome?;
    check_pooled_hygiene(zygote, &fds_before, kept)
}

pub(crate) fn check_hygiene(zygote: &Zygote, fds_before: &BTreeSet<String>) -> TestResult {
    check_pooled_hygiene(zygote, fds_before, &[])
}

pub(crate) fn check_pooled_hygiene(
    zygote: &Zygote,
    fds_before: &BTreeSet<String>,
    kept: &[&str],
) -> TestResult {
    let me = std::process::id();
    let procs = processes();
    let zombies: Vec<_> = procs
        .iter()
        .filter(|p| p.ppid == me && p.state == 'Z')
        .collect();
    if !zombies.is_empty() {
        return Err(format!("zombie children: {zombies:?}").into());
    }
    // Each zygote's only children now should be its parked (or idle
    // reused) workers: idle, alive, and no more than it keeps (the default).
    let pool = run_in_process::DEFAULT_PARKED as usize;
    for pid in zygote.pids() {
        let children: Vec<_> = procs.iter().filter(|p| p.ppid == pid).collect();
        if children.len() > pool || children.iter().any(|p| p.state == 'Z') {
            return Err(format!("processes left under zygote {pid}: {children:?}").into());
        }
    }
    if zygote.workers() != 0 {
        return Err(format!("{} workers still counted", zygote.workers()).into());
    }
    // Fewer fds is fine (a trial may drop a zygote); a new one is a leak,
    // unless it is of a kind idle workers keep, within their number.
    let new: Vec<_> = open_fds().difference(fds_before).cloned().collect();
    let leaked: Vec<_> = new
        .iter()
        .filter(|fd| !kept.iter().any(|k| fd.contains(k)))
        .collect();
    if !leaked.is_empty() {
        return Err(format!("leaked fds: {leaked:?}").into());
    }
    for kind in kept {
        if new.iter().filter(|fd| fd.contains(kind)).count() > pool * zygote.pids().len() {
            return Err(format!("more {kind} fds than pooled workers: {new:?}").into());
        }
    }
    Ok(())
}

#[derive(Debug)]
#[allow(dead_code)] // reason: fields are read through Debug in failure messages
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pub(crate) ppid: u32,
    pub(crate) state: char,
}

pub(crate) fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push(Proc { pid, ppid, state });
    }
    out
}

pub(crate) fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub(crate) fn open_fds() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some(format!(
                        "{}->{}",
                        e.file_name().to_string_lossy(),
                        target.display()
                    ))
                })
                // The directory handle used for the listing itself.
                .filter(|s| !s.contains("/proc/") || !s.ends_with("/fd"))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn ensure(cond: bool, what: impl Into<String>) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(what.into().into())
    }
}
