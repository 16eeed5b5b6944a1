//! Hostile workers: tasks that attack the shared result ring. A `harness =
//! false` target (it forks).
//!
//! A worker keeps only its own slot of the ring mapped before its task runs
//! (slot isolation, SAFETY.md S4), so a task can find its slot in
//! `/proc/self/maps` and write anything anywhere in it, and nothing else of
//! the ring: other tasks must get their true values, and writing where
//! another slot was kills the writer. Whatever it writes, the parent must
//! return either the right value or a clean error for the writer's own task,
//! never a wrong value, never panic, never allocate what a length field
//! claims; and the zygote must keep serving. (A reused worker keeps the whole
//! ring until its last task, so there the MAC is what stands between a
//! scribbler and the other tasks, S3.)

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{TestResult, checked, ensure};
use libtest_mimic::Trial;
use run_in_process::{Error, ErrorKind, Zygote};

fn main() {
    let zygote = Zygote::builder()
        .max_in_flight(8)
        .slot_size(64 * 1024)
        .start()
        .expect("start the shared zygote");
    let single = Zygote::builder()
        .max_in_flight(1)
        .start()
        .expect("start the one-slot zygote");
    // Every task through the zygote, none to a parked worker.
    let cold = Zygote::builder()
        .parked(0)
        .start()
        .expect("start the zygote without parked workers");
    // Dropped by their one trial each, with a task still running: forked on
    // demand, and parked.
    let disposable = |parked| {
        Zygote::builder()
            .parked(parked)
            .max_in_flight(2)
            .slot_size(64)
            .start()
            .expect("start a disposable zygote")
    };
    let (disposable_cold, disposable_parked) = (disposable(0), disposable(1));
    let reused = Zygote::builder()
        .max_in_flight(2)
        .reuse(100)
        .start()
        .expect("start the reuse zygote");
    // Reuse mode with one mailbox, which one reused worker fills.
    let reused_one = Zygote::builder()
        .max_in_flight(1)
        .parked(1)
        .reuse(100)
        .start()
        .expect("start the one-mailbox reuse zygote");

    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! trial {
        ($z:expr, $name:ident) => {{
            let z = $z.clone();
            trials.push(Trial::test(stringify!($name), move || checked(&z, $name)));
        }};
    }
    trial!(
        zygote,
        scribbling_all_it_maps_leaves_other_tasks_their_values
    );
    trial!(zygote, forged_records_with_huge_lengths_hit_only_the_forger);
    trial!(zygote, writing_where_another_slot_was_kills_the_writer);
    trial!(zygote, isolation_cannot_be_undone_from_the_own_slot);
    trial!(zygote, a_worker_maps_only_its_own_slot);
    trials.push(Trial::test("a_worker_maps_only_its_own_slot_cold", {
        let z = cold.clone();
        move || checked(&z, a_worker_maps_only_its_own_slot)
    }));
    trial!(zygote, a_sandboxed_task_cannot_reach_the_zygotes_memory);
    trial!(zygote, a_fresh_worker_maps_no_job_cells);
    trial!(zygote, ring_file_cannot_be_resized_or_written_again);
    trial!(zygote, zero_sized_elements_cannot_stall_the_parent);
    trial!(zygote, spinning_task_is_stopped_and_zygote_keeps_serving);
    trial!(
        single,
        worker_killed_mid_write_never_delivers_a_torn_or_stale_record
    );
    trial!(cold, no_worker_inherits_an_earlier_argument);
    trials.push(Trial::test(
        "dropping_the_last_handle_ends_a_worker_made_to_look_finished_cold",
        move || dropping_the_last_handle_ends_a_worker_made_to_look_finished(disposable_cold),
    ));
    trials.push(Trial::test(
        "dropping_the_last_handle_ends_a_parked_worker_made_to_look_finished",
        move || dropping_the_last_handle_ends_a_worker_made_to_look_finished(disposable_parked),
    ));
    // Reuse mode: each reused worker keeps its pidfd, doorbell and report
    // socket in the parent between tasks.
    macro_rules! reused_trial {
        ($z:expr, $name:ident) => {{
            let z = $z.clone();
            trials.push(Trial::test(stringify!($name), move || {
                common::checked_pooled(&z, common::REUSED_KEPT, $name)
            }));
        }};
    }
    reused_trial!(reused, a_reused_worker_keeps_the_ring_until_its_last_task);
    reused_trial!(reused_one, a_worker_forked_for_one_task_maps_no_job_cell);
    reused_trial!(reused, a_reused_worker_maps_only_its_own_job_cell);
    reused_trial!(
        reused,
        a_reused_worker_can_read_but_never_write_its_job_cell
    );
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------------------
// Attack tools (they run in workers).

/// The digest that [`find_in_own_memory`] looks for: a worker given it can
/// search for 16 bytes without holding them.
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x5eed, 0xfeed);
    h.write(bytes);
    h.finish()
}

/// Counts the places in this process's private writable memory (heap,
/// stack, statics, anonymous mappings) where 16 bytes have digest `target`.
fn find_in_own_memory(target: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let mem = std::fs::File::open("/proc/self/mem").expect("mem");
    let mut hits = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(perms)) = (fields.first(), fields.get(1)) else {
            continue;
        };
        if *perms != "rw-p" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut bytes = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut bytes, start).is_err() {
            continue;
        }
        hits += bytes.windows(16).filter(|w| digest(w) == target).count() as u64;
    }
    hits
}

/// The positive control of [`find_in_own_memory`]: it must find 16 bytes
/// this very task holds on its heap (if it could read nothing, it would
/// find nothing anywhere).
fn find_own_bytes(seed: u64) -> u64 {
    let bytes: Vec<u8> = (1..=64u64)
        .map(|i| (seed.wrapping_mul(i) >> 17) as u8)
        .collect();
    let target = digest(&bytes[48..]);
    std::hint::black_box(&bytes);
    find_in_own_memory(target)
}

/// Stores `generation` into this worker's own commit word, so that to the
/// parent its task looks committed, then sleeps for ever.
fn look_finished_and_sleep(generation: u64) -> u64 {
    ring()[0].store(generation, Ordering::Release);
    sleep_forever(())
}

fn sleep_forever(_: ()) -> u64 {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn byte_count(bytes: Vec<u8>) -> u64 {
    bytes.len() as u64
}

/// The ring mappings in this process, found by the memfd's name: address
/// ranges.
fn ring_ranges() -> Vec<(usize, usize)> {
    memfd_mappings("run-in-process-ring")
        .into_iter()
        .map(|(start, end, _)| (start, end))
        .collect()
}

/// This process's mappings of the crate's memfd `name`: their address
/// ranges and permissions (`rw-s`, `r--s`, ...).
fn memfd_mappings(name: &str) -> Vec<(usize, usize, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read maps");
    maps.lines()
        .filter(|l| l.contains(&format!("memfd:{name}")))
        .map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next().expect("address range");
            let perms = fields.next().expect("permissions").to_owned();
            let (start, end) = range.split_once('-').expect("start-end");
            let start = usize::from_str_radix(start, 16).expect("hex start");
            let end = usize::from_str_radix(end, 16).expect("hex end");
            (start, end, perms)
        })
        .collect()
}

/// How many fds this process holds on the crate's memfd `name`.
fn fds_on(name: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains(name))
        .count()
}

/// The ring mapping in this process: the worker's own slot (or the whole
/// ring, in a reused worker before its last task).
fn ring() -> &'static [AtomicU64] {
    let (start, end) = *ring_ranges()
        .first()
        .expect("the ring is mapped in every worker");
    // SAFETY: the range is a live MAP_SHARED mapping of this process that is
    // never unmapped while the worker runs, page-aligned (so aligned for
    // AtomicU64), and every bit pattern is a valid AtomicU64; other processes
    // writing it concurrently is what `&[AtomicU64]` permits (SAFETY.md S1).
    unsafe { std::slice::from_raw_parts(start as *const AtomicU64, (end - start) / 8) }
}

/// What this worker maps of the ring: the number of mappings, their bytes,
/// and the fds it holds on the ring's memfd.
fn ring_view(_: ()) -> (usize, usize, usize) {
    let ranges = ring_ranges();
    let bytes = ranges.iter().map(|(s, e)| e - s).sum();
    let fds = fds_on("run-in-process-ring");
    (ranges.len(), bytes, fds)
}

/// Bytes of one slot of a zygote with `slot_size(payload)`: header and
/// payload, rounded up to whole pages.
fn slot_bytes(payload: usize) -> usize {
    let page = rustix::param::page_size();
    (64 + payload).div_ceil(page) * page
}

/// Where the slot right before or right after this worker's own was mapped,
/// if that is in the ring (the own slot is not the first or the last).
fn neighbour() -> Option<usize> {
    let (start, end) = *ring_ranges().first()?;
    placeholder_next_to(start, end)
}

/// The start of a placeholder's stretch of `end - start` bytes right after
/// or right before the mapping `start..end`, if one is there.
fn placeholder_next_to(start: usize, end: usize) -> Option<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let len = end - start;
    maps.lines().find_map(|line| {
        let (s, e) = line.split_whitespace().next()?.split_once('-')?;
        let (s, e) = (
            usize::from_str_radix(s, 16).ok()?,
            usize::from_str_radix(e, 16).ok()?,
        );
        // The placeholder that replaced the mapping's other pages (the
        // ring's other slots, or other mailboxes' job cells).
        let placeholder = line.split_whitespace().nth(1) == Some("---p");
        if placeholder && s == end {
            Some(end)
        } else if placeholder && e == start {
            Some(start - len)
        } else {
            None
        }
    })
}

/// Writes a committed record, generation 1 and a guessed MAC, at the
/// address where a neighbouring slot was: this must kill the task with
/// SIGSEGV. Returns 0 if there is no neighbour (it never should), 1 if the
/// write went through.
fn write_where_a_neighbour_was(_: ()) -> u64 {
    let Some(at) = neighbour() else { return 0 };
    let words = at as *mut u64;
    for (i, value) in [1u64, 1, 1, 8, 0x4141_4141].into_iter().enumerate().rev() {
        let word = words.wrapping_add(i);
        // SAFETY: none: this is the attack. The address is where another
        // task's slot was mapped; it must now be inaccessible.
        unsafe { word.write_volatile(value) };
    }
    1
}

/// How a worker sees the job cells: the permissions of each mapping, the
/// errno of an `mprotect` that asks to write them (0 if it succeeded), and
/// how many fds it holds on their memfd.
fn job_cell_view(_: ()) -> (Vec<String>, i32, usize) {
    let mappings = memfd_mappings("run-in-process-jobs");
    let protect = mappings.first().map_or(0, |&(start, end, _)| {
        // SAFETY: the range is a whole mapping of this process, which Rust
        // code here reaches only through atomics (the crate's job cells);
        // the call asks only to add write access, which invalidates no
        // reference whether the kernel grants it (the failure this trial
        // detects) or refuses it.
        let r = unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                end - start,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        errno_of(r.into())
    });
    let fds = fds_on("run-in-process-jobs");
    (
        mappings.into_iter().map(|(_, _, p)| p).collect(),
        protect,
        fds,
    )
}

/// This worker's pid and the bytes of the job cells it maps.
fn job_cell_bytes(_: ()) -> (u32, usize) {
    let bytes = memfd_mappings("run-in-process-jobs")
        .iter()
        .map(|&(start, end, _)| end - start)
        .sum();
    (std::process::id(), bytes)
}

/// Reads the first word where another mailbox's job cell was mapped: must
/// fault. Returns `None` if there is no such place (it never should).
fn read_where_another_cell_was(_: ()) -> Option<u32> {
    let &(start, end, _) = memfd_mappings("run-in-process-jobs").first()?;
    let at = placeholder_next_to(start, end)?;
    // SAFETY: none: this is the attack. The address is where another
    // mailbox's cell was mapped; it must now be inaccessible.
    Some(unsafe { (at as *const u32).read_volatile() })
}

/// Writes the first word of the job cells: must fault.
fn write_job_cell(_: ()) -> u64 {
    let Some(&(start, _, _)) = memfd_mappings("run-in-process-jobs").first() else {
        return 0;
    };
    // SAFETY: none: this is the attack. The mapping is read-only.
    unsafe { (start as *mut u32).write_volatile(0x4141_4141) };
    1
}

fn errno_of(r: i64) -> i32 {
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

/// Is `mseal` (Linux 6.10) there? Probed on a page of our own.
fn has_mseal() -> bool {
    // SAFETY: a fresh private anonymous page of our own, sealed and leaked.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    // SAFETY: mseal only restricts later changes to our own page.
    page != libc::MAP_FAILED && unsafe { libc::syscall(462, page, 4096usize, 0usize) } == 0
}

/// Tries to get a neighbouring slot back from the own slot: `mprotect` the
/// placeholder where it was, and grow the own slot's mapping with `mremap`
/// over the memfd's next pages. Returns both errnos (0: it worked) and
/// whether `mseal` is there.
fn undo_isolation(_: ()) -> (i32, i32, bool) {
    let (start, end) = ring_ranges()[0];
    let protect = match neighbour() {
        // SAFETY: changes the protection of a placeholder of ours (or fails).
        Some(at) => errno_of(unsafe {
            libc::mprotect(at as *mut _, 4096, libc::PROT_READ | libc::PROT_WRITE)
        } as i64),
        None => -1,
    };
    // SAFETY: moves or grows a mapping of ours (or fails); never touched after.
    let grown = unsafe {
        libc::mremap(
            start as *mut _,
            end - start,
            2 * (end - start),
            libc::MREMAP_MAYMOVE,
        )
    };
    let remap = if grown == libc::MAP_FAILED {
        errno_of(-1)
    } else {
        0
    };
    (protect, remap, has_mseal())
}

/// The errnos of opening the zygote's (this worker's parent's) memory for
/// writing and of `process_vm_writev` into it (0: it worked).
fn reach_the_zygote(_: ()) -> (i32, i32) {
    let zygote = std::os::unix::process::parent_id();
    let open = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{zygote}/mem"))
    {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    };
    let byte = [0u8; 1];
    let local = libc::iovec {
        iov_base: byte.as_ptr() as *mut _,
        iov_len: 1,
    };
    // Address 0 is never mapped: without the sandbox this fails with EFAULT
    // after the permission check, writing nothing.
    let remote = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 1,
    };
    // SAFETY: reads one byte of ours; the remote address is never mapped.
    let r = unsafe { libc::process_vm_writev(zygote as i32, &local, 1, &remote, 1, 0) };
    (open, errno_of(r as i64))
}

/// A small xorshift generator: random enough to scribble, no dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes random words over the whole ring for `millis`, from a thread that
/// keeps going until the process exits, then returns `seed`.
fn scribble(args: (u64, u64)) -> u64 {
    let (seed, millis) = args;
    let words = ring();
    std::thread::spawn(move || {
        let mut noise = Noise(seed | 1);
        loop {
            for w in words {
                w.store(noise.next(), Ordering::Relaxed);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(millis));
    seed
}

/// Forges committed records with huge lengths for the generations likely to
/// come next, in every slot it maps, until the process exits.
fn forge(millis: u64) -> u64 {
    let words = ring();
    let slot_words = slot_bytes(64 * 1024) / 8;
    std::thread::spawn(move || {
        let mut noise = Noise(0x9e37_79b9);
        loop {
            // Learn recent generations from the commit words.
            let newest = words
                .chunks(slot_words)
                .map(|s| s[0].load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            for (i, slot) in words.chunks(slot_words).enumerate() {
                let generation = newest + 1 + (i as u64 % 8);
                let len = if noise.next() % 2 == 0 {
                    u64::MAX
                } else {
                    1 << 40
                };
                slot[1].store(generation, Ordering::Relaxed);
                slot[2].store(1, Ordering::Relaxed); // kind: value
                slot[3].store(len, Ordering::Relaxed);
                slot[4].store(noise.next(), Ordering::Relaxed); // a guessed MAC
                slot[0].store(generation, Ordering::Release);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(millis));
    0
}

/// Tries to truncate and to grow the ring through /proc/self/map_files,
/// then to write it with `pwrite` and through a new writable mapping.
/// Returns the errnos, or None if the file cannot be opened here.
fn resize_ring(_: ()) -> Option<(i32, i32, i32, i32)> {
    use std::os::fd::AsRawFd;
    let (start, end) = *ring_ranges().first()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/map_files/{start:x}-{end:x}"))
        .ok()?;
    let fd = file.as_raw_fd();
    // SAFETY: ftruncate on an fd we own has no memory-safety preconditions.
    let shrink = errno_of(unsafe { libc::ftruncate(fd, 0) } as i64);
    // SAFETY: as above.
    let grow = errno_of(unsafe { libc::ftruncate(fd, 1 << 40) } as i64);
    // SAFETY: writes one byte of ours to the file (or fails).
    let write = errno_of(unsafe { libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0) } as i64);
    // SAFETY: a new mapping of our own (or a failure); unmapped untouched.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    let map = if mapped == libc::MAP_FAILED {
        errno_of(-1)
    } else {
        // SAFETY: the mapping just made, never used.
        unsafe { libc::munmap(mapped, 4096) };
        0
    };
    Some((shrink, grow, write, map))
}

/// The victim's result: a value the parent can check completely.
fn victim(n: u64) -> Vec<u64> {
    (0..500)
        .map(|i| n.wrapping_mul(1_000_003).wrapping_add(i))
        .collect()
}

fn spin(_: ()) -> u64 {
    loop {
        std::hint::spin_loop();
    }
}

/// A result that fills most of a 64 KiB slot, so a kill is likely to land in
/// the middle of writing it.
fn fill_slot(n: u64) -> Vec<u64> {
    vec![n; 7000]
}

/// A result that claims a sequence of 2^62 zero-sized elements and holds none:
/// its `Serialize` lies, its `Deserialize` is `Vec<()>`'s, whose elements
/// consume no input, so only the decoder's element budget can stop the parent.
struct Units(Vec<()>);

impl serde::Serialize for Units {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        s.serialize_seq(Some(1 << 62))?.end()
    }
}

impl<'de> serde::Deserialize<'de> for Units {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Units, D::Error> {
        Vec::<()>::deserialize(d).map(Units)
    }
}

fn units(_: ()) -> Units {
    Units(Vec::new())
}

// ---------------------------------------------------------------------------
// Trials.

/// A victim's outcome must be the right value or a clean error.
fn check_victim(n: u64, r: Result<Vec<u64>, Error>) -> Result<bool, String> {
    match r {
        Ok(v) if v == victim(n) => Ok(true),
        Ok(_) => Err(format!("task {n} got a WRONG value")),
        Err(e) if e.kind() == ErrorKind::Codec => Ok(false),
        Err(e) => Err(format!("task {n}: unexpected error {e}")),
    }
}

/// Runs 60 victims while the attackers (already running) do their worst.
async fn victims_while_attacked(z: &Zygote) -> Result<(usize, usize), String> {
    let mut set = tokio::task::JoinSet::new();
    for n in 0..60u64 {
        let z = z.clone();
        set.spawn(async move { (n, z.run(victim, n).await) });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(joined) = set.join_next().await {
        let (n, r) = joined.map_err(|e| e.to_string())?;
        if check_victim(n, r)? {
            ok += 1
        } else {
            failed += 1
        }
    }
    Ok((ok, failed))
}

/// An attacker's own record may be attacked too: its value or a clean error.
fn check_attacker(r: Result<u64, Error>, expected: u64) -> TestResult {
    match r {
        Ok(v) => ensure(v == expected, "an attacker got a wrong value"),
        Err(e) => ensure(e.kind() == ErrorKind::Codec, format!("attacker: {e}")),
    }
}

/// Once every attacker is gone, tasks must succeed again. An attacker's
/// `result` returns when its record is committed, while its scribbling thread
/// still runs until the process exits; so wait for every worker to be reaped
/// first, or a victim here could still be hit (a clean failure, but not the
/// one this checks).
async fn still_serving(z: &Zygote) -> TestResult {
    z.wait_idle().await;
    for n in 0..20 {
        ensure(
            z.run(victim, n).await? == victim(n),
            "the zygote keeps serving",
        )?;
    }
    Ok(())
}

async fn scribbling_all_it_maps_leaves_other_tasks_their_values(z: Zygote) -> TestResult {
    // `open` returns once each attacker's worker exists, so the victims below
    // run while the attackers scribble on everything of the ring they map:
    // their own slots.
    let mut attackers = Vec::new();
    for seed in 1..=2u64 {
        attackers.push((seed, z.open(scribble, (seed, 300)).await?));
    }
    let (ok, failed) = victims_while_attacked(&z).await?;
    for (seed, p) in attackers {
        check_attacker(p.result().await, seed)?;
    }
    ensure(
        failed == 0,
        format!("{failed} victims lost their values to a scribbler"),
    )?;
    eprintln!("    victims: {ok} right");
    still_serving(&z).await
}

async fn forged_records_with_huge_lengths_hit_only_the_forger(z: Zygote) -> TestResult {
    let forger = z.open(forge, 300).await?;
    let (ok, failed) = victims_while_attacked(&z).await?;
    check_attacker(forger.result().await, 0)?;
    ensure(
        failed == 0,
        format!("{failed} victims lost their values to a forger"),
    )?;
    eprintln!("    victims: {ok} right");
    still_serving(&z).await
}

fn slow_victim(n: u64) -> Vec<u64> {
    std::thread::sleep(Duration::from_millis(100));
    victim(n)
}

/// Every other slot is taken by a victim still running when the attacker
/// writes a forged record where a neighbouring slot was mapped: the write
/// must fault, and every victim must get its true value.
async fn writing_where_another_slot_was_kills_the_writer(z: Zygote) -> TestResult {
    let mut victims = Vec::new();
    for n in 0..7u64 {
        victims.push((n, z.open(slow_victim, n).await?));
    }
    let attack = z.run(write_where_a_neighbour_was, ()).await;
    match attack {
        Err(e) if e.signal() == Some(libc::SIGSEGV) => {}
        other => return Err(format!("the attacker was not stopped by SIGSEGV: {other:?}").into()),
    }
    for (n, p) in victims {
        ensure(
            check_victim(n, p.result().await)?,
            format!("victim {n} lost its value"),
        )?;
    }
    still_serving(&z).await
}

async fn isolation_cannot_be_undone_from_the_own_slot(z: Zygote) -> TestResult {
    let (protect, remap, sealed) = z.run(undo_isolation, ()).await?;
    if sealed {
        ensure(
            protect == libc::EPERM && remap == libc::EPERM,
            format!("mprotect errno {protect}, mremap errno {remap} (want EPERM from mseal)"),
        )?;
    } else {
        // Without mseal, the mprotect only makes a private placeholder
        // writable; a grown mapping would reach the next slot (README,
        // "Slot isolation").
        eprintln!("    no mseal here: mprotect errno {protect}, mremap errno {remap}");
    }
    still_serving(&z).await
}

/// A worker maps one slot of the ring, exactly one slot long, and holds no
/// fd of the ring's memfd, on either path (parked or forked on demand).
async fn a_worker_maps_only_its_own_slot(z: Zygote) -> TestResult {
    for task in 0..3 {
        let (mappings, bytes, fds) = z.run(ring_view, ()).await?;
        ensure(
            mappings == 1,
            format!("task {task}: {mappings} ring mappings"),
        )?;
        // Both zygotes that run this trial have the default 64 KiB slots
        // or `slot_size(64 * 1024)`.
        ensure(
            bytes == slot_bytes(64 * 1024),
            format!("task {task}: {bytes} bytes of the ring mapped, want one slot"),
        )?;
        ensure(fds == 0, format!("task {task}: {fds} fds on the ring"))?;
    }
    Ok(())
}

/// Reuse mode: a worker serves each task in that task's slot, so it keeps
/// the whole ring until its last task, which runs with only its own slot.
async fn a_reused_worker_keeps_the_ring_until_its_last_task(z: Zygote) -> TestResult {
    let (mappings, bytes, fds) = z.run(ring_view, ()).await?;
    ensure(
        mappings == 1 && bytes == 2 * slot_bytes(64 * 1024) && fds == 0,
        format!("a reused worker maps {mappings} ranges, {bytes} bytes, {fds} fds"),
    )?;
    // A `Process` is its worker's last task.
    let last = z.open(ring_view, ()).await?.result().await?;
    ensure(
        last == (1, slot_bytes(64 * 1024), 0),
        format!("a last task sees {last:?} of the ring"),
    )
}

/// Reuse mode: the parent posts a reused worker's jobs in shared memory
/// (`job_cell`), which workers map read-only and cannot make writable, so
/// that no task can forge a job for itself or another worker.
async fn a_reused_worker_can_read_but_never_write_its_job_cell(z: Zygote) -> TestResult {
    // Twice: the second task comes through the cell, to a reused worker.
    for task in 0..2 {
        let (perms, protect, fds) = z.run(job_cell_view, ()).await?;
        ensure(
            perms == ["r--s"],
            format!("task {task}: the job cells are mapped {perms:?}, want one read-only mapping"),
        )?;
        ensure(
            protect == libc::EACCES,
            format!("task {task}: mprotect to writable: errno {protect}, want EACCES"),
        )?;
        ensure(fds == 0, format!("task {task}: {fds} fds on the job cells"))?;
    }
    match z.run(write_job_cell, ()).await {
        Err(e) if e.signal() == Some(libc::SIGSEGV) => {}
        other => return Err(format!("writing the job cell did not fault: {other:?}").into()),
    }
    still_serving(&z).await
}

/// A reused worker keeps only its own mailbox's job cell: its tasks cannot
/// read the jobs, arguments included, that the parent posts to other
/// workers.
async fn a_reused_worker_maps_only_its_own_job_cell(z: Zygote) -> TestResult {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })?;
    let cell = page.max(4096);
    // The second task comes through the cell, to the same reused worker:
    // had it kept another mailbox's cell, it would have found no cell of
    // its own and served one task only.
    let mut pids = Vec::new();
    for task in 0..2 {
        let (pid, bytes) = z.run(job_cell_bytes, ()).await?;
        ensure(
            bytes == cell,
            format!(
                "task {task}: the worker maps {bytes} bytes of job cells, want one cell of {cell}"
            ),
        )?;
        pids.push(pid);
    }
    ensure(
        pids[0] == pids[1],
        format!("two tasks in a row ran in workers {pids:?}: the second was not reused"),
    )?;
    match z.run(read_where_another_cell_was, ()).await {
        Err(e) if e.signal() == Some(libc::SIGSEGV) => {}
        other => {
            return Err(format!("reading another mailbox's cell did not fault: {other:?}").into());
        }
    }
    still_serving(&z).await
}

/// In reuse mode, a worker forked on demand for one task reads no job cell,
/// and maps none: with the zygote's one mailbox held by a reused worker, a
/// task that asks for a fresh process gets one forked for it alone.
async fn a_worker_forked_for_one_task_maps_no_job_cell(z: Zygote) -> TestResult {
    // The mailbox's worker serves a task, then waits there, reused.
    let (reused, _) = z.run(job_cell_bytes, ()).await?;
    for task in 0..2 {
        let (pid, bytes) = z.task(job_cell_bytes, ()).fresh().run().await?;
        ensure(
            pid != reused,
            format!("fresh task {task} ran in the reused worker"),
        )?;
        ensure(
            bytes == 0,
            format!("fresh task {task}: a worker forked for it maps {bytes} bytes of job cells"),
        )?;
    }
    // The reused worker held the mailbox all along, so the fresh tasks
    // were forked on demand, not given a parked worker.
    let (after, _) = z.run(job_cell_bytes, ()).await?;
    ensure(
        after == reused,
        format!("the next task ran in worker {after}, not in the reused {reused}"),
    )?;
    still_serving(&z).await
}

/// Without reuse nothing reads the job cells, so no worker maps them (a
/// mapping fewer for each fork and exit).
async fn a_fresh_worker_maps_no_job_cells(z: Zygote) -> TestResult {
    let (perms, _, fds) = z.run(job_cell_view, ()).await?;
    ensure(
        perms.is_empty() && fds == 0,
        format!("a fresh worker maps the job cells {perms:?}, {fds} fds"),
    )
}

/// The zygote maps the whole ring; the sandbox must keep a task from
/// writing its memory (seccomp denies `process_vm_writev` and `ptrace`,
/// Landlock any ptrace access, and so `/proc/<pid>/mem`, of a process
/// outside the task's domain).
async fn a_sandboxed_task_cannot_reach_the_zygotes_memory(z: Zygote) -> TestResult {
    let (open, write) = z
        .task(reach_the_zygote, ())
        .sandbox(run_in_process::Sandbox::new())
        .run()
        .await?;
    ensure(
        (open == libc::EACCES || open == libc::EPERM) && write == libc::EPERM,
        format!("sandboxed: opening the zygote's memory: errno {open}, process_vm_writev: {write}"),
    )?;
    let (open, write) = z.run(reach_the_zygote, ()).await?;
    // Outside the guarantee (README, "Slot isolation"): as the same user,
    // an unsandboxed task may be able to.
    eprintln!("    unsandboxed: open errno {open}, process_vm_writev errno {write}");
    Ok(())
}

async fn zero_sized_elements_cannot_stall_the_parent(z: Zygote) -> TestResult {
    // Decoding happens inside the parent's poll, where no tokio timeout can
    // interrupt it: run it on a thread of its own, so that a regression fails
    // this trial after HANG instead of stalling the whole test binary.
    let (tx, rx) = std::sync::mpsc::channel();
    let zygote = z.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = tx.send(rt.block_on(zygote.run(units, ())).map(|u| u.0.len()));
    });
    let outcome = tokio::task::spawn_blocking(move || rx.recv_timeout(common::HANG))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the parent is still producing zero-sized elements")?;
    match outcome {
        Err(e) if e.kind() == ErrorKind::Codec && e.to_string().contains("elements") => {}
        other => return Err(format!("expected a codec error, got {other:?}").into()),
    }
    still_serving(&z).await
}

async fn ring_file_cannot_be_resized_or_written_again(z: Zygote) -> TestResult {
    match z.run(resize_ring, ()).await? {
        Some((shrink, grow, write, map)) => ensure(
            [shrink, grow, write, map] == [libc::EPERM; 4],
            format!(
                "errnos: ftruncate shrink {shrink}, grow {grow}, pwrite {write}, \
                 writable mmap {map} (want EPERM from the seals)"
            ),
        )?,
        // Without CAP_SYS_ADMIN, map_files cannot be opened and no other path
        // to the memfd exists in a worker (its fd is closed): also safe.
        None => {
            eprintln!("    /proc/self/map_files not openable here; the seals are not reachable")
        }
    }
    still_serving(&z).await
}

async fn spinning_task_is_stopped_and_zygote_keeps_serving(z: Zygote) -> TestResult {
    let e = z
        .task(spin, ())
        .timeout(Duration::from_millis(100))
        .run()
        .await
        .unwrap_err();
    ensure(e.kind() == ErrorKind::TimedOut, format!("{e}"))?;
    still_serving(&z).await
}

async fn worker_killed_mid_write_never_delivers_a_torn_or_stale_record(z: Zygote) -> TestResult {
    // One slot: every task reuses the slot the previous one wrote, so a stale
    // record would be there to be (wrongly) delivered.
    let mut noise = Noise(0x1234_5678);
    let (mut values, mut killed) = (0, 0);
    for n in 1..=150u64 {
        let p = z.open(fill_slot, n).await?;
        // Kill at a random point from "at once" to "well after it finished".
        let delay = noise.next() % 1500;
        tokio::time::sleep(Duration::from_micros(delay)).await;
        p.kill()?;
        match p.result().await {
            Ok(v) => {
                ensure(
                    v.len() == 7000 && v.iter().all(|&x| x == n),
                    format!("task {n} got a wrong value"),
                )?;
                values += 1;
            }
            Err(e) => {
                ensure(e.signal() == Some(libc::SIGKILL), format!("task {n}: {e}"))?;
                killed += 1;
            }
        }
    }
    eprintln!("    {values} delivered whole, {killed} killed before committing");
    ensure(values + killed == 150, "every task accounted for")
}

/// A task's argument passes through the zygote, whose memory every later
/// worker inherits; the zygote must leave no copy of it there (SAFETY.md S3).
/// Both of its paths: a small argument, handed over on its stack, and a
/// larger one, in its request buffer.
async fn no_worker_inherits_an_earlier_argument(z: Zygote) -> TestResult {
    use std::io::Read;
    let seed = 0x9e37_79b9_7f4a_7c15;
    let found = z.run(find_own_bytes, seed).await?;
    ensure(
        found >= 1,
        "the search cannot even find the task's own bytes",
    )?;
    for len in [64usize, 4096] {
        let mut marker = vec![0u8; len];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut marker)?;
        // Its last 16 bytes: the searching task's own argument, copied to
        // the same place after it, is shorter than the marker.
        let target = digest(&marker[len - 16..]);
        ensure(z.run(byte_count, marker).await? == len as u64, "byte_count")?;
        let hits = z.run(find_in_own_memory, target).await?;
        ensure(
            hits == 0,
            format!(
                "a later worker found an earlier {len}-byte argument in its memory {hits} times"
            ),
        )?;
    }
    Ok(())
}

/// A task can make itself look finished (its commit word holds its
/// generation), so dropping the task neither kills its worker nor hangs up;
/// the task's reaper then waits for an exit that never comes.
/// Dropping the last `Zygote` handle must still end that worker: the
/// zygote's shared state, whose drop shuts the zygote down, must not be
/// kept alive by the reaper.
fn dropping_the_last_handle_ends_a_worker_made_to_look_finished(z: Zygote) -> TestResult {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // The zygote's first task: generation 1.
        let victim = z.open(look_finished_and_sleep, 1).await?;
        // Readable once the worker has exited, whoever reaps it.
        let pid = rustix::process::Pid::from_raw(victim.pid() as i32).ok_or("no pid")?;
        let exited = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        let deadline = std::time::Instant::now() + common::HANG;
        while victim.state() != run_in_process::State::Finished {
            ensure(
                std::time::Instant::now() < deadline,
                "the victim does not look finished",
            )?;
            // Polling the state; what it waits for is the worker's store.
            tokio::task::yield_now().await;
        }
        drop(victim);
        drop(z);
        // Blocking is fine here: nothing on this runtime has to run for the
        // zygote's shutdown to end the worker.
        let mut fds = [rustix::event::PollFd::new(
            &exited,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::time::Timespec {
            tv_sec: common::HANG.as_secs() as i64,
            tv_nsec: 0,
        };
        let ready = rustix::event::poll(&mut fds, Some(&timeout))?;
        ensure(ready == 1, "the worker outlived its zygote's last handle")
    })
}
