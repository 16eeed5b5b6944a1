//! Shared memory: the only place a mapped pointer becomes a Rust type.
//!
//! Two kinds of memory cross process boundaries here:
//!
//! * the **ring**: one `memfd`, sized once, sealed against shrinking and
//!   growing, mapped `MAP_SHARED` by the parent before it forks the zygote so
//!   that the zygote and every worker inherit the same pages. It is exposed
//!   only as `&[AtomicU64]` (SAFETY.md S1): every access is an atomic load or
//!   store, so a worker scribbling on it concurrently is never a data race on
//!   our side, and nobody ever holds a `&[u8]` over it.
//! * **sealed payloads**: a `memfd` that its writer filled and then sealed
//!   against writes, growth and shrinking. Once the reader has checked the
//!   seals, the bytes can no longer change, so mapping them read-only as
//!   `&[u8]` is sound (SAFETY.md S2). Large arguments and results use this
//!   path; `payload` fills and seals them.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use memmap2::{Mmap, MmapOptions, MmapRaw};
use rustix::fs::SealFlags;

use crate::epoch::ForkLocal;
use crate::sys::{self, SysError, SysResult};

/// A `MAP_SHARED` mapping of a sealed memfd, viewed as 64-bit atomic words.
///
/// Used only in the epoch (`crate::epoch`) it was made or adopted in. The
/// parent keeps each ring out of later forks (`MADV_DONTFORK`), but every
/// later fork still inherits the parent's `SharedWords` value wherever user
/// code can reach it (a `Process` in a static, say): there it must neither
/// read the range, which may be unmapped or mapped to something else, nor
/// unmap it (`ForkLocal` forgets it there). A zygote and its workers adopt
/// their own ring.
pub(crate) struct SharedWords {
    map: ForkLocal<MmapRaw>,
    words: usize,
    /// The words still mapped to the memfd here: all of them, unless a
    /// worker gave up the rest ([`SharedWords::keep_only`]).
    kept: Kept,
}

/// The words of a mapping still mapped to its memfd in this process,
/// `start..end`: all of them, until a worker gives up the rest
/// ([`give_up_all_but`]).
struct Kept {
    start: AtomicUsize,
    end: AtomicUsize,
}

impl Kept {
    fn all(words: usize) -> Kept {
        Kept {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(words),
        }
    }

    /// Are words `start..end` all still mapped here?
    fn covers(&self, start: usize, end: usize) -> bool {
        self.start.load(Ordering::Relaxed) <= start && end <= self.end.load(Ordering::Relaxed)
    }
}

/// A new memfd of `len` bytes (`None` or 0: refused), sealed against
/// shrinking and growing: a worker must not be able to shrink a shared file
/// under the parent's mapping (the parent would take SIGBUS on its next
/// access) nor grow it.
fn sized_memfd(name: &str, len: Option<usize>) -> SysResult<OwnedFd> {
    let len = len.filter(|&l| l > 0).ok_or_else(|| {
        SysError::new(
            "memfd_create",
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad size of {name}"),
            ),
        )
    })?;
    let fd = sys::memfd_create(name)?;
    sys::ftruncate(fd.as_fd(), len as u64)?;
    sys::add_seals(fd.as_fd(), SealFlags::SHRINK | SealFlags::GROW)?;
    Ok(fd)
}

impl SharedWords {
    /// Creates a memfd of `words * 8` bytes, seals its size, and maps it shared.
    ///
    /// Returns the mapping and the memfd; the caller may close the memfd once
    /// every process that needs the mapping has it (mappings outlive the fd).
    pub(crate) fn create(name: &str, words: usize) -> SysResult<(SharedWords, OwnedFd)> {
        let file = File::from(sized_memfd(name, words.checked_mul(8))?);
        let words = SharedWords::open(file.as_fd(), words)?;
        Ok((words, file.into()))
    }

    /// Maps the memfd `create` made, of `words` words, in another process
    /// that received it: a zygote forked by the template (`crate::template`).
    pub(crate) fn open(fd: BorrowedFd<'_>, words: usize) -> SysResult<SharedWords> {
        let map = MmapOptions::new()
            .len(words * 8)
            .map_raw(&fd)
            .map_err(|e| SysError::new("mmap", e))?;
        Ok(SharedWords {
            map: ForkLocal::new(map),
            words,
            kept: Kept::all(words),
        })
    }

    /// Seals the memfd against writes through any mapping, `write(2)` or
    /// hole made from now on, and its seals against change: for the process
    /// that made the last writable mapping of it (the parent for a zygote it
    /// forks, which inherits the mapping; a respawned zygote for its own),
    /// so that no process that gets hold of the file again, through
    /// /proc/<pid>/map_files as root, can write it (SAFETY.md S4). Failing
    /// the write seal (a kernel before 5.1) leaves that door open, not the
    /// ring broken.
    pub(crate) fn seal_writes(fd: BorrowedFd<'_>) -> SysResult<()> {
        let _ = sys::add_seals(fd, SealFlags::FUTURE_WRITE);
        sys::add_seals(fd, SealFlags::SEAL)
    }

    /// Takes this mapping, inherited across a fork, as this process's own:
    /// for a zygote and each of its workers, right after the fork, and only
    /// for their own ring, which the parent keeps out of forks only after
    /// the zygote's.
    pub(crate) fn adopt(&self) {
        self.map.adopt();
    }

    /// Is this the mapping of this process's epoch (made or adopted here)?
    pub(crate) fn is_own(&self) -> bool {
        self.map.is_own()
    }

    /// Keeps this mapping out of every later fork of this process
    /// (`MADV_DONTFORK`): for the parent's view of a zygote's ring once that
    /// zygote exists, so that a zygote started later, and every worker of
    /// it, does not map this one's ring.
    pub(crate) fn keep_from_forks(&self) -> SysResult<()> {
        self.map
            .advise(memmap2::Advice::DontFork)
            .map_err(|e| SysError::new("madvise", e))
    }

    /// The mapping as atomic words: [`SharedWords::range`] over all of them,
    /// or empty if this process gave up some of them.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        self.range(0, self.words).unwrap_or(&[])
    }

    /// Words `start..start + len` of the mapping. All cross-process access
    /// goes through this. `None` if the range is out of bounds, or not all
    /// mapped to the memfd in this process ([`SharedWords::keep_only`]), or
    /// this is a process of another epoch (see `crate::epoch`).
    pub(crate) fn range(&self, start: usize, len: usize) -> Option<&[AtomicU64]> {
        let end = start.checked_add(len)?;
        if !self.is_own() || end > self.words || !self.kept.covers(start, end) {
            return None;
        }
        let ptr = self.map.as_ptr().cast::<AtomicU64>().wrapping_add(start);
        debug_assert!(ptr.is_aligned() && self.map.len() == self.words * 8);
        // SAFETY: SAFETY.md S1, S4. The range lies within the mapping of
        // exactly `words * 8` bytes owned by `self` and live in this
        // process: it was made in this epoch or adopted by this zygote
        // (`crate::epoch`), so it is valid for the returned lifetime, and
        // within the kept words, the ones `keep_only` left mapped
        // to the memfd (all of them in the parent and the zygote, which
        // never call it); mmap returns page-aligned memory, which satisfies
        // AtomicU64's alignment; AtomicU64 has the same size as u64 and
        // every bit pattern is a valid value; the memfd's size is sealed, so
        // the pages cannot disappear under us (no SIGBUS). Other processes
        // may write these words at any time, which `&[AtomicU64]` permits:
        // we only ever access them through atomic operations.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// Gives up, in this process, every word of the mapping but
    /// `start..start + len`: the rest is replaced by inaccessible anonymous
    /// memory (`mmap(MAP_FIXED, PROT_NONE)`), so this process no longer maps
    /// those pages of the memfd at all, and nothing it does to its own
    /// address space (`mprotect`, writes) can reach them again. Then, where
    /// the kernel has it (Linux 6.10), the whole range is sealed with
    /// `mseal`, so that the kept part cannot be grown with `mremap` over
    /// the memfd's next pages, nor the file remapped at another offset
    /// (`remap_file_pages`). A worker's slot isolation (SAFETY.md S4).
    ///
    /// Does nothing in a process of another epoch. Fails if the kept range
    /// is out of bounds or does not start and end on page boundaries (or at
    /// the end of the mapping), or if the kernel refused the replacement;
    /// the caller must then not run untrusted code.
    ///
    /// # Safety
    ///
    /// No slice handed out by [`SharedWords::range`] or
    /// [`SharedWords::words`] outside the kept range may be live in this
    /// process, now or later: the memory behind it is gone. (Later calls
    /// refuse such ranges.) Meant for a worker, before its task's code runs.
    pub(crate) unsafe fn keep_only(&self, start: usize, len: usize) -> SysResult<()> {
        if !self.is_own() {
            return Ok(());
        }
        // SAFETY: SAFETY.md S4. The mapping is this process's (checked just
        // above), `words * 8` bytes long, and `kept` is its own; the caller
        // promises that no slice of it outside the kept words is live.
        unsafe {
            give_up_all_but(
                self.map.as_mut_ptr(),
                self.words * 8,
                8,
                &self.kept,
                start,
                len,
            )
        }
    }
}

/// The body of both `keep_only`s: of the mapping of `all` bytes at `base`,
/// in words of `word` bytes, keeps words `start..start + len` mapped to the
/// memfd and replaces every other page with inaccessible anonymous memory
/// (`mmap(MAP_FIXED, PROT_NONE)`), then `mseal`s the whole range where the
/// kernel has it. `kept` is narrowed first, so the mapping's `range` refuses
/// the words that go from then on. Fails, before changing anything, if the
/// kept words are out of bounds or do not start and end on page boundaries
/// (or at the end of the mapping); fails if the kernel refuses the
/// replacement, after which the caller must not run untrusted code.
///
/// # Safety
///
/// `base..base + all` is a whole mapping that the caller owns and that is
/// live in this process, `kept` is that mapping's, and no reference into
/// the words outside the kept ones is live, now or later.
unsafe fn give_up_all_but(
    base: *mut u8,
    all: usize,
    word: usize,
    kept: &Kept,
    start: usize,
    len: usize,
) -> SysResult<()> {
    let invalid = |what| {
        SysError::new(
            "mmap",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
        )
    };
    let page = rustix::param::page_size();
    let end = start
        .checked_add(len)
        .filter(|&end| end.checked_mul(word).is_some_and(|bytes| bytes <= all))
        .ok_or_else(|| invalid("kept range out of bounds"))?;
    let (start_byte, end_byte) = (start * word, end * word);
    if start_byte % page != 0 || (end_byte % page != 0 && end_byte != all) {
        return Err(invalid("kept range not page-aligned"));
    }
    // Narrowed first: from here on `range` refuses the words that go.
    kept.start.store(start, Ordering::Relaxed);
    kept.end.store(end, Ordering::Relaxed);
    let round_up = |n: usize| n.div_ceil(page) * page;
    for (from, to) in [(0, start_byte), (round_up(end_byte), round_up(all))] {
        if from >= to {
            continue;
        }
        let at = base.wrapping_add(from).cast::<std::ffi::c_void>();
        // SAFETY: SAFETY.md S4, S6. `at..at + (to - from)` lies within the
        // mapping, which the caller owns, on page boundaries (checked
        // above; the mapping's own length is rounded up to a page by the
        // kernel). MAP_FIXED replaces exactly those pages, which belong to
        // nothing but this mapping, and the caller promises that no
        // reference into them is live; the mapping's `range` no longer
        // hands them out (`kept`). When the owner is dropped, memmap2
        // unmaps the whole original range, which is then the kept part and
        // these placeholders: still only memory the owner owns.
        unsafe {
            rustix::mm::mmap_anonymous(
                at,
                to - from,
                rustix::mm::ProtFlags::empty(),
                rustix::mm::MapFlags::PRIVATE
                    | rustix::mm::MapFlags::FIXED
                    | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(|e| SysError::new("mmap", e))?;
    }
    mseal(base.cast(), round_up(all));
    Ok(())
}

/// `mseal(addr, len, 0)` (Linux 6.10), best effort: the kept slot (or job
/// cell) can then no longer be grown with `mremap` (over the memfd's next
/// pages, other tasks' slots or other workers' cells), nor the range
/// unmapped, remapped or its protection changed. `ENOSYS` on older kernels, where that one hole stays open
/// (README, "Slot isolation"). The number is 462 on every architecture the
/// crate builds seccomp filters for (they share the generic syscall table
/// for new calls).
fn mseal(addr: *mut std::ffi::c_void, len: usize) {
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    {
        const SYS_MSEAL: libc::c_long = 462;
        // SAFETY: SAFETY.md S4, S6. `mseal` changes no memory and unmaps
        // nothing: it only makes later `munmap`, `mremap`, `mprotect` and
        // `MAP_FIXED` calls over the range fail with EPERM. The range is one
        // mapping's; were it dropped later (a worker never drops its ring or
        // its job cells, which belong to the zygote's frame), memmap2's `munmap` would
        // fail and the pages would stay mapped until exit: a leak, not an
        // unmapping of anybody else's memory.
        let _ = unsafe { libc::syscall(SYS_MSEAL, addr, len, 0usize) };
    }
    #[cfg(not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )))]
    let _ = (addr, len);
}

// `SharedWords` is Send and Sync because `MmapRaw` is, and it only hands out
// atomics; no manual impl is needed.

/// A memfd of 32-bit atomic words that only the process that made it can
/// write: the job cells of reuse mode (`crate::job_cell`), which the
/// parent writes and workers only read.
///
/// The parent maps the file writable, keeps that mapping out of every fork
/// (`MADV_DONTFORK`), then seals the file against writes (`F_SEAL_FUTURE_WRITE`)
/// before any other process exists that could map it: every other mapping,
/// the zygote's and through it every worker's, is read-only, and the seal
/// keeps it so (the kernel refuses `PROT_WRITE` on a new shared mapping and
/// clears `VM_MAYWRITE` on a read-only one, so `mprotect` cannot upgrade it).
/// A worker, whatever its code does, can read its job cell but never write
/// it, nor anybody else's; and once it has given up the other cells
/// ([`PostedWords::keep_only`]), it cannot read theirs either (SAFETY.md S6).
pub(crate) struct PostedWords {
    map: ForkLocal<MmapRaw>,
    words: usize,
    /// The parent's mapping: the only writable one.
    writable: bool,
    /// The words still mapped to the memfd here: all of them, unless a
    /// reused worker gave up the other mailboxes' ([`PostedWords::keep_only`]).
    kept: Kept,
}

impl PostedWords {
    /// Creates a memfd of `words * 4` bytes, maps it writable here and only
    /// here, and seals it: its size, and any write but through this mapping.
    pub(crate) fn create(name: &str, words: usize) -> SysResult<(PostedWords, OwnedFd)> {
        let fd = sized_memfd(name, words.checked_mul(4))?;
        let map = MmapOptions::new()
            .len(words * 4)
            .map_raw(&fd)
            .map_err(|e| SysError::new("mmap", e))?;
        // No fork of ours (a zygote, a worker, a fork of the user's) gets
        // this writable mapping: they map the file again, read-only.
        map.advise(memmap2::Advice::DontFork)
            .map_err(|e| SysError::new("madvise", e))?;
        // Unlike the ring's write seal (`SharedWords::seal_writes`), not best
        // effort: a kernel without it (before 5.1) has no pidfds either.
        sys::add_seals(fd.as_fd(), SealFlags::FUTURE_WRITE | SealFlags::SEAL)?;
        let words = PostedWords {
            map: ForkLocal::new(map),
            words,
            writable: true,
            kept: Kept::all(words),
        };
        Ok((words, fd))
    }

    /// Maps the memfd `create` made, of `words` words, read-only: for a
    /// zygote, whose workers inherit the mapping.
    pub(crate) fn open(fd: BorrowedFd<'_>, words: usize) -> SysResult<PostedWords> {
        let map = MmapOptions::new()
            .len(words * 4)
            .map_raw_read_only(&fd)
            .map_err(|e| SysError::new("mmap", e))?;
        Ok(PostedWords {
            map: ForkLocal::new(map),
            words,
            writable: false,
            kept: Kept::all(words),
        })
    }

    /// Takes this mapping, inherited across a fork, as this process's own:
    /// for a worker, the zygote's read-only mapping.
    pub(crate) fn adopt(&self) {
        self.map.adopt();
    }

    /// Is this the parent's writable mapping? Only then may words of
    /// [`range`](PostedWords::range) be stored to.
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// Gives up, in this process, every word of the mapping but
    /// `start..start + len`, as [`SharedWords::keep_only`] does for the ring:
    /// for a reused worker, whose tasks then cannot read the jobs of other
    /// mailboxes' workers (SAFETY.md S6). Does nothing in a process of
    /// another epoch, or in the parent's writable mapping, which is never
    /// given up. Fails if the kept range is out of bounds or not on page
    /// boundaries, or if the kernel refused the replacement.
    ///
    /// # Safety
    ///
    /// No slice handed out by [`PostedWords::range`] outside the kept range
    /// may be live in this process, now or later.
    pub(crate) unsafe fn keep_only(&self, start: usize, len: usize) -> SysResult<()> {
        if !self.map.is_own() || self.writable {
            return Ok(());
        }
        // SAFETY: SAFETY.md S6. The mapping is this process's (checked just
        // above), `words * 4` bytes long, and `kept` is its own; the caller
        // promises that no slice of it outside the kept words is live.
        unsafe {
            give_up_all_but(
                self.map.as_mut_ptr(),
                self.words * 4,
                4,
                &self.kept,
                start,
                len,
            )
        }
    }

    /// Words `start..start + len` of the mapping, or `None` if out of bounds,
    /// given up ([`PostedWords::keep_only`]) or in a process of another
    /// epoch (see `crate::epoch`). In a mapping that is not
    /// [`writable`](PostedWords::writable), only `Relaxed` loads are allowed
    /// on them (see SAFETY.md S6).
    pub(crate) fn range(&self, start: usize, len: usize) -> Option<&[AtomicU32]> {
        let end = start.checked_add(len)?;
        if !self.map.is_own() || end > self.words || !self.kept.covers(start, end) {
            return None;
        }
        let ptr = self.map.as_ptr().cast::<AtomicU32>().wrapping_add(start);
        debug_assert!(ptr.is_aligned() && self.map.len() == self.words * 4);
        // SAFETY: SAFETY.md S6. The range lies within the mapping of exactly
        // `words * 4` bytes owned by `self` and live in this process (made
        // in this epoch, or adopted by this worker), and within the words
        // `keep_only` left mapped to the memfd, so it is valid for the
        // returned lifetime; mmap returns page-aligned memory, which
        // satisfies AtomicU32's alignment; every bit pattern is a valid
        // u32; the size is sealed, so the pages cannot go away (no SIGBUS).
        // The parent's process is the only writer, through atomic stores;
        // a read-only mapping is only ever loaded from, with `Relaxed`
        // loads, which std guarantees never write (its "atomic accesses to
        // read-only memory"), and `job_cell` stores only when `writable`.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

/// Seals a memfd read-only (write, grow, shrink and further sealing all
/// forbidden), so its reader can map it as plain bytes. Fill it with
/// `write(2)` first, not through a mapping: F_SEAL_WRITE is refused while a
/// writable shared mapping of the file exists.
pub(crate) fn seal(fd: BorrowedFd<'_>) -> SysResult<()> {
    sys::add_seals(
        fd,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
}

/// A new memfd holding a copy of `bytes`, sealed read-only, as a writer
/// leaves a payload (without padding). For tests and the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn sealed_copy(bytes: &[u8]) -> SysResult<OwnedFd> {
    use std::io::Write;
    let fd = sys::memfd_create("sealed-copy")?;
    let mut file = File::from(fd);
    file.write_all(bytes)
        .map_err(|e| SysError::new("write", e))?;
    let fd = OwnedFd::from(file);
    seal(fd.as_fd())?;
    Ok(fd)
}

/// Most padding a sealed payload may start with. Its writer pads so that a
/// large byte string lands at a file offset with the same offset within 4 KiB
/// as its source, which makes the kernel's copy up to twice as fast (see
/// `payload`); the payload is then the last `len` bytes of the memfd.
pub(crate) const PAD_MAX: u64 = 4095;

/// A read-only mapping of a whole sealed memfd, and the memfd itself.
///
/// The memfd is kept so that bytes in the mapping can be forwarded to another
/// process as they are, by sending the fd, instead of being copied into a new
/// memfd (`payload`). It sits in a [`ForkLocal`]: a [`Blob`](crate::Blob) in
/// a static is inherited by a later fork, whose zygote or worker reuses the
/// fd number (SAFETY.md F3), so there the fd is neither used nor closed.
pub(crate) struct SealedMap {
    map: Mmap,
    fd: ForkLocal<OwnedFd>,
}

impl SealedMap {
    /// The memfd, if it belongs to this process: not in a fork that
    /// inherited the mapping, where the number may be another fd.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.is_own().then(|| self.fd.as_fd())
    }
}

impl std::ops::Deref for SealedMap {
    type Target = [u8];

    /// The whole memfd, padding included.
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

/// The payload bytes of a memfd whose seals guarantee they can no longer
/// change.
///
/// The mapping is shared so that a [`Blob`](crate::Blob) decoded from it can
/// keep it alive after the payload itself is released.
pub(crate) enum SealedBytes {
    Empty,
    /// The payload is `map[start..]`.
    Mapped {
        map: Arc<SealedMap>,
        start: usize,
    },
}

impl SealedBytes {
    /// Checks that `fd` is a memfd sealed against writing, growing and
    /// shrinking, holding a payload of `len` bytes (no more than `limit`)
    /// after at most [`PAD_MAX`] bytes of padding, and maps it read-only.
    /// The mapping keeps a duplicate of `fd`.
    ///
    /// Fails (without mapping) if any seal is missing: the writer is untrusted
    /// and could otherwise change or truncate the bytes while we decode them.
    pub(crate) fn open(fd: BorrowedFd<'_>, len: u64, limit: u64) -> Result<SealedBytes, SealError> {
        let need = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW;
        let seals = sys::get_seals(fd).map_err(SealError::Sys)?;
        if !seals.contains(need) {
            return Err(SealError::NotSealed);
        }
        if len > limit {
            return Err(SealError::TooLarge(len));
        }
        let size = rustix::fs::fstat(fd)
            .map_err(|e| SealError::Sys(SysError::new("fstat", e)))?
            .st_size as u64;
        if size < len || size - len > PAD_MAX {
            return Err(SealError::Length { size, len });
        }
        if size == 0 {
            return Ok(SealedBytes::Empty);
        }
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|e| SealError::Sys(SysError::new("dup", e)))?,
        );
        // SAFETY: SAFETY.md S2. `Mmap::map` is unsafe because the file could
        // be modified or truncated while mapped, which would change or unmap
        // bytes behind a `&[u8]`. We checked above that the memfd carries
        // F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW; seals can never be
        // removed (memfd_create(2)), so for the lifetime of this mapping the
        // contents are immutable and the size is fixed at `size`.
        let map = unsafe { MmapOptions::new().len(size as usize).map(&file) }
            .map_err(|e| SealError::Sys(SysError::new("mmap", e)))?;
        Ok(SealedBytes::Mapped {
            map: Arc::new(SealedMap {
                map,
                fd: ForkLocal::new(file.into()),
            }),
            start: (size - len) as usize,
        })
    }

    /// The payload, without the padding.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            SealedBytes::Empty => &[],
            SealedBytes::Mapped { map, start } => &map[*start..],
        }
    }

    /// The whole mapping, padding included, unless it is empty.
    pub(crate) fn mapping(&self) -> Option<&Arc<SealedMap>> {
        match self {
            SealedBytes::Empty => None,
            SealedBytes::Mapped { map, .. } => Some(map),
        }
    }
}

/// Why a sealed payload was refused.
#[derive(Debug)]
pub(crate) enum SealError {
    NotSealed,
    TooLarge(u64),
    /// The memfd's size does not fit a payload of `len` bytes.
    Length {
        size: u64,
        len: u64,
    },
    Sys(SysError),
}

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SealError::NotSealed => f.write_str("payload memfd is not sealed read-only"),
            SealError::TooLarge(n) => write!(f, "payload of {n} bytes exceeds the size limit"),
            SealError::Length { size, len } => write!(
                f,
                "a memfd of {size} bytes does not hold a {len}-byte payload after at most {PAD_MAX} bytes of padding"
            ),
            SealError::Sys(e) => write!(f, "{} failed: {}", e.call, e.source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed memfd of `size` bytes.
    fn sealed(size: usize) -> OwnedFd {
        sealed_copy(&vec![7u8; size]).unwrap()
    }

    #[test]
    fn a_payload_is_the_tail_after_at_most_pad_max_bytes() {
        let fd = sealed(5000);
        for len in [5000u64, 5000 - PAD_MAX] {
            let bytes = SealedBytes::open(fd.as_fd(), len, u64::MAX).unwrap();
            assert_eq!(bytes.bytes().len() as u64, len);
            assert_eq!(bytes.mapping().map(|m| m.len()), Some(5000));
        }
        for len in [5001u64, 5000 - PAD_MAX - 1, 0] {
            match SealedBytes::open(fd.as_fd(), len, u64::MAX) {
                Err(SealError::Length { size: 5000, len: l }) if l == len => {}
                Err(e) => panic!("len {len}: {e}"),
                Ok(_) => panic!("len {len} accepted"),
            }
        }
        assert!(matches!(
            SealedBytes::open(fd.as_fd(), 5000, 4999),
            Err(SealError::TooLarge(5000))
        ));
        assert!(
            SealedBytes::open(sealed(0).as_fd(), 0, 0)
                .unwrap()
                .bytes()
                .is_empty()
        );
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let fd = sys::memfd_create("shm-test").unwrap();
        assert!(matches!(
            SealedBytes::open(fd.as_fd(), 0, u64::MAX),
            Err(SealError::NotSealed)
        ));
    }
}
