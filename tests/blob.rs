//! `Blob`s that cross process boundaries: a mapped one passed on to the next
//! task travels in the same sealed memfd, and slices of one share its
//! mapping. A `harness = false` target, for the reasons given in
//! `tests/fork.rs`: the zygote starts while the process has one thread, and
//! every trial runs on the main thread and ends with the `/proc` checks.
//!
//! Which memfd holds a `Blob`'s bytes is read from `/proc/self/maps`, in the
//! parent and in the worker: a memfd keeps the name it was created with, and
//! its inode identifies the file, whichever process maps it.

mod common;

use std::sync::Mutex;

use common::{TestResult, checked, ensure};
use libtest_mimic::Trial;
use run_in_process::{Blob, Zygote};

/// A mapped result that the parent holds when it starts `later` (see
/// `a_blob_a_worker_inherited_is_copied_not_forwarded`).
static HELD: Mutex<Option<Blob>> = Mutex::new(None);

fn main() {
    let zygote = Zygote::builder()
        .max_in_flight(4)
        .start()
        .expect("start the zygote");
    // A current-thread runtime starts no thread, so once it is gone the
    // process may start another zygote, which inherits `HELD`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let held = rt
        .block_on(zygote.run(make_blob, 4 << 20))
        .expect("a large result");
    assert!(held.is_mapped(), "a 4 MiB result is mapped");
    *HELD.lock().expect("lock") = Some(held);
    rt.block_on(zygote.wait_idle());
    drop(rt);
    let later = Zygote::start().expect("start the zygote that inherits HELD");
    let args = common::harness_args();
    let mut trials = Vec::new();
    macro_rules! trial {
        ($name:ident) => {{
            let z = zygote.clone();
            trials.push(Trial::test(stringify!($name), move || checked(&z, $name)));
        }};
    }
    trial!(a_blob_result_passed_on_as_an_argument_is_forwarded_in_its_memfd);
    trial!(an_argument_returned_as_the_result_comes_back_in_its_memfd);
    trial!(a_slice_or_a_blob_followed_by_more_is_copied_and_still_mapped);
    trial!(slices_of_a_mapped_result_share_its_mapping);
    trials.push(Trial::test(
        "a_blob_a_worker_inherited_is_copied_not_forwarded",
        move || checked(&later, a_blob_a_worker_inherited_is_copied_not_forwarded),
    ));
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------------------
// Task functions (they run in workers).

/// Bytes `0, 1, ..., 250, 0, ...` of length `len`, tagged by `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn make_blob(len: usize) -> Blob {
    Blob::from(pattern(len, 3))
}

fn identity(blob: Blob) -> Blob {
    blob
}

/// What the worker sees of its argument: mapped or not, in which memfd, and
/// a checksum of its bytes.
fn inspect(blob: Blob) -> (bool, Option<Memfd>, u64) {
    let sum = blob.iter().map(|&b| u64::from(b)).sum();
    (blob.is_mapped(), memfd_of(&blob), sum)
}

fn inspect_first((blob, _): (Blob, u8)) -> (bool, Option<Memfd>, u64) {
    inspect(blob)
}

/// Returns the parent's held `Blob`, which this worker inherited: mapped
/// here too, but its memfd's fd number is not this process's. The worker
/// first fills the low fd numbers with `/dev/null`, so that the number is
/// most likely in use here, by a file that is no sealed memfd.
fn return_held(_: ()) -> Blob {
    let nulls: Vec<std::fs::File> = (0..100)
        .map_while(|_| std::fs::File::open("/dev/null").ok())
        .collect();
    // The worker exits after the task; the files go with it.
    std::mem::forget(nulls);
    // A `Blob` alone, not in an `Option`: its memfd's tail is exactly its
    // encoding, so only the fd's epoch stops it from being forwarded.
    HELD.lock()
        .ok()
        .and_then(|held| held.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Helpers.

/// The memfd mapped at an address of this process: its name and inode.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Memfd {
    name: String,
    inode: u64,
}

/// The memfd whose mapping holds `bytes`, from `/proc/self/maps`.
fn memfd_of(bytes: &[u8]) -> Option<Memfd> {
    let address = bytes.as_ptr() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        // "start-end perms offset dev inode path"
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        if !(start..end).contains(&address) {
            return None;
        }
        let inode = fields.nth(3)?.parse().ok()?;
        let name = fields.next()?.strip_prefix("/memfd:")?;
        Some(Memfd {
            name: name.trim_end_matches(" (deleted)").to_owned(),
            inode,
        })
    })
}

fn sum(bytes: &[u8]) -> u64 {
    bytes.iter().map(|&b| u64::from(b)).sum()
}

/// A mapped 4 MiB result and the memfd it is in.
async fn mapped_result(z: &Zygote) -> Result<(Blob, Memfd), libtest_mimic::Failed> {
    let blob = z.run(make_blob, 4 << 20).await?;
    ensure(blob.is_mapped(), "a 4 MiB result is mapped")?;
    let memfd = memfd_of(&blob).ok_or("the result is in no memfd mapping")?;
    ensure(
        memfd.name == "run-in-process-result",
        format!("the result's memfd: {memfd:?}"),
    )?;
    Ok((blob, memfd))
}

// ---------------------------------------------------------------------------
// Trials.

/// The pipeline case: one task's `Blob` result is the next one's argument.
/// The worker maps the very memfd the first worker wrote.
async fn a_blob_result_passed_on_as_an_argument_is_forwarded_in_its_memfd(z: Zygote) -> TestResult {
    let (blob, memfd) = mapped_result(&z).await?;
    let (mapped, theirs, their_sum) = z.run(inspect, blob.clone()).await?;
    ensure(mapped, "the worker maps the argument")?;
    ensure(
        theirs.as_ref() == Some(&memfd),
        format!("the argument is in {theirs:?}, not the result's {memfd:?}"),
    )?;
    ensure(their_sum == sum(&blob), "the worker saw the same bytes")?;
    // The caller's Blob is untouched, and can be passed on again.
    let (_, again, _) = z.run(inspect, blob.clone()).await?;
    ensure(again == Some(memfd), "forwarded the second time too")?;
    // A task that never starts closes its duplicate (the trial checks fds).
    drop(z.task(inspect, blob));
    Ok(())
}

/// A worker that returns the `Blob` it was given sends its argument's memfd
/// back: the parent maps a memfd named for an argument.
async fn an_argument_returned_as_the_result_comes_back_in_its_memfd(z: Zygote) -> TestResult {
    let sent = make_blob(4 << 20);
    let back = z.run(identity, sent.clone()).await?;
    ensure(back.is_mapped(), "the result is mapped")?;
    ensure(back == sent, "the same bytes came back")?;
    let memfd = memfd_of(&back).ok_or("the result is in no memfd mapping")?;
    ensure(
        memfd.name == "run-in-process-arg",
        format!("the result came back in {memfd:?}, a copy"),
    )?;
    // And a result passed on and returned again stays in its memfd.
    let (result, memfd) = mapped_result(&z).await?;
    let back = z.run(identity, result.clone()).await?;
    ensure(
        memfd_of(&back) == Some(memfd),
        "the round trip kept the memfd",
    )?;
    ensure(back == result, "the same bytes came back")
}

/// Bytes that are not their memfd's tail, as their own encoding, are copied
/// into a new memfd; the worker still maps them.
async fn a_slice_or_a_blob_followed_by_more_is_copied_and_still_mapped(z: Zygote) -> TestResult {
    let (blob, memfd) = mapped_result(&z).await?;
    let part = blob.slice(4096..);
    let (mapped, theirs, their_sum) = z.run(inspect, part.clone()).await?;
    ensure(mapped, "the worker maps the copied slice")?;
    let theirs = theirs.ok_or("the slice is in no memfd")?;
    ensure(
        theirs.name == "run-in-process-arg" && theirs.inode != memfd.inode,
        format!("the slice travelled in {theirs:?}"),
    )?;
    ensure(their_sum == sum(&part), "the slice's bytes")?;
    let (mapped, theirs, their_sum) = z.run(inspect_first, (blob.clone(), 1)).await?;
    ensure(mapped, "the worker maps the copied Blob")?;
    ensure(
        theirs.is_some_and(|m| m.name == "run-in-process-arg"),
        "a Blob followed by more travels in a memfd of its own",
    )?;
    ensure(their_sum == sum(&blob), "the Blob's bytes")
}

/// A worker of a zygote started while the parent held a mapped `Blob` can
/// read that `Blob`, but must not send the fd its memfd had in the parent:
/// in the worker that number is closed or is another fd. Returned as a
/// result, the `Blob` is copied into a new memfd.
async fn a_blob_a_worker_inherited_is_copied_not_forwarded(z: Zygote) -> TestResult {
    let held = HELD.lock().expect("lock").clone().ok_or("nothing held")?;
    let theirs = memfd_of(&held).ok_or("the held Blob is in no memfd")?;
    let back = z.run(return_held, ()).await?;
    ensure(back == held, "the bytes came back")?;
    let memfd = memfd_of(&back).ok_or("the result is in no memfd")?;
    ensure(
        memfd.name == "run-in-process-result" && memfd.inode != theirs.inode,
        format!("the inherited Blob came back in {memfd:?}, not a new result memfd"),
    )
}

/// `slice` copies nothing: a slice of a mapped result points into the same
/// mapping, and keeps it alive after the original is dropped.
async fn slices_of_a_mapped_result_share_its_mapping(z: Zygote) -> TestResult {
    let (blob, memfd) = mapped_result(&z).await?;
    let expected = pattern(4 << 20, 3);
    let part = blob.slice(1000..=5000);
    ensure(part.is_mapped(), "a slice of a mapped Blob is mapped")?;
    ensure(
        part.as_ptr() == blob[1000..].as_ptr(),
        "the slice points into the original",
    )?;
    ensure(
        blob.get(..(4 << 20) + 1).is_none(),
        "get refuses past the end",
    )?;
    drop(blob);
    ensure(
        memfd_of(&part) == Some(memfd),
        "the slice keeps the mapping",
    )?;
    ensure(part[..] == expected[1000..=5000], "the slice's bytes")
}
