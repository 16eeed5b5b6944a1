//! [`Blob`]: bytes that cross the process boundary without being copied into
//! the receiver's heap.
//!
//! A value too large for its ring slot travels in a sealed memfd, which the
//! receiver maps read-only (`shm::SealedBytes`). Decoding a `Vec<u8>` from
//! that mapping copies every byte into fresh heap pages, and on this class of
//! machine the page faults of a fresh 64 MiB buffer cost more than the copy
//! itself. A `Blob` decoded from the mapping points into it instead and keeps
//! it alive.
//!
//! How a `Blob`'s deserializer finds the mapping: while a sealed payload is
//! decoded, [`decoding_from`] makes its mapping this thread's *source*. The
//! codec hands a byte string to the visitor as a slice borrowed from its input;
//! if that slice lies inside the source mapping, the `Blob` keeps the mapping
//! and the slice's range, and otherwise it copies. The check compares
//! addresses against a mapping the `Blob` itself keeps alive, so a stale or
//! unrelated source can only cause a copy, never a dangling reference.
//!
//! The mapping is of a memfd sealed against writing, growing and shrinking
//! (checked in `SealedBytes::open`), so the bytes a `Blob` shows can never
//! change and the pages can never go away under it (SAFETY.md S2). This module
//! has no `unsafe` code.
//!
//! The way back out works the same way round: while `payload` encodes a
//! value, [`offering`] lets a mapped `Blob` that serializes its bytes put its
//! mapping (and memfd) on offer, and the payload writer, handed those very
//! bytes by the codec, may forward the memfd instead of copying them
//! ([`offered`] matches them by address and length).

use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::{Bound, Deref, Range, RangeBounds};
use std::sync::Arc;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};

use crate::shm::{SealedBytes, SealedMap};

/// Byte strings shorter than this are copied even out of a mapping: a page's
/// worth is cheap to copy.
const MAP_AT_LEAST: usize = 4096;

/// A mapped `Blob` keeps the whole mapping alive, and the worker chose what
/// else is in it. So a byte string maps only if it is at least this fraction
/// of the mapping: no `Blob` pins more than `PIN_FACTOR` times its own size.
const PIN_FACTOR: usize = 8;

thread_local! {
    /// The mapping being decoded on this thread, if it is a sealed payload.
    static SOURCE: RefCell<Option<Arc<SealedMap>>> = const { RefCell::new(None) };
    /// Whether `payload` is encoding a value on this thread, so that a mapped
    /// `Blob` may offer its memfd to be forwarded ([`offering`]).
    static OFFERING: Cell<bool> = const { Cell::new(false) };
    /// The mapped `Blob` being serialized right now, while `OFFERING`.
    static OFFER: RefCell<Option<Forwardable>> = const { RefCell::new(None) };
}

/// Registers this thread's destructors of the thread-locals above, so that
/// every process forked from it later finds them registered.
///
/// The zygote calls it once, before it forks any worker. Otherwise each
/// worker's first `offering` would register `OFFER`'s destructor with glibc
/// (`__cxa_thread_atexit_impl`), whose lazily bound call into the dynamic
/// loader looked a symbol up in every loaded library: about a dozen page
/// faults and a `calloc` on every task's path, after its result was ready.
/// No destructor runs in either process: both leave through `_exit`.
pub(crate) fn register_thread_locals() {
    let _ = SOURCE.try_with(|_| ());
    let _ = OFFER.try_with(|_| ());
}

/// Runs `decode` with `bytes`' mapping as this thread's source, so that a
/// [`Blob`] decoded from it borrows the mapping instead of copying.
pub(crate) fn decoding_from<T>(bytes: &SealedBytes, decode: impl FnOnce() -> T) -> T {
    let Some(map) = bytes.mapping() else {
        return decode();
    };
    /// Puts the previous source back, even if `decode` unwinds.
    struct Restore(Option<Arc<SealedMap>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            let _ = SOURCE.try_with(|s| *s.borrow_mut() = previous);
        }
    }
    // During thread teardown there is no source to set, and a Blob copies.
    let Ok(previous) = SOURCE.try_with(|s| s.replace(Some(Arc::clone(map)))) else {
        return decode();
    };
    let _restore = Restore(previous);
    decode()
}

/// Bytes of a mapped [`Blob`] that the payload writer may forward to another
/// process by sending the memfd they are in, instead of copying them.
#[derive(Clone)]
pub(crate) struct Forwardable {
    pub(crate) map: Arc<SealedMap>,
    /// Within `map` (a mapped `Blob`'s range).
    pub(crate) range: Range<usize>,
}

impl Forwardable {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// Runs `encode` (the payload writer's encoding of one value) with mapped
/// `Blob`s offering their memfds: while one serializes its bytes,
/// [`offered`] returns it.
pub(crate) fn offering<T>(encode: impl FnOnce() -> T) -> T {
    /// Puts the previous state back, even if `encode` unwinds, and drops any
    /// offer so that it pins no mapping after the encoding.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = OFFERING.try_with(|o| o.set(self.0));
            let _ = OFFER.try_with(|o| o.borrow_mut().take());
        }
    }
    let Ok(previous) = OFFERING.try_with(|o| o.replace(true)) else {
        return encode();
    };
    let _restore = Restore(previous);
    encode()
}

/// The mapped `Blob` being serialized, if `bytes` are exactly its bytes (the
/// same address and length, so the same memory: the offer keeps it mapped).
pub(crate) fn offered(bytes: &[u8]) -> Option<Forwardable> {
    OFFER
        .try_with(|o| {
            let offer = o.borrow();
            let offer = offer.as_ref()?;
            let same = offer.bytes().as_ptr() == bytes.as_ptr() && offer.range.len() == bytes.len();
            same.then(|| offer.clone())
        })
        .ok()
        .flatten()
}

/// An immutable byte string that a worker can return (or take) without it
/// being copied into the receiving process's heap.
///
/// `Blob` serializes as a serde byte string, like `serde_bytes::ByteBuf`, and
/// is the type to use for large binary results. A result too large for its
/// ring slot (see [`Builder::slot_size`](crate::Builder::slot_size)) travels
/// in a sealed memfd that the parent maps read-only; a `Blob` in it points
/// into that mapping instead of copying its bytes into a fresh buffer, whose
/// page faults cost more than the copy on many machines. The same holds for a
/// large argument, in the worker.
///
/// A byte string is *mapped* this way when it is at least a page (4 KiB) and
/// at least an eighth of the whole encoded value; otherwise it is copied. A
/// mapped `Blob` keeps the whole mapping alive until it and every clone and
/// slice of it are dropped, so the eighth bounds what a small `Blob` can pin to eight
/// times its size, whatever else the worker put in the value. The pages count
/// as shared memory (`RssShmem` in `/proc/self/status`, once touched), not
/// heap; each retained result is one memory mapping (see
/// `vm.max_map_count`) and one open file descriptor, the memfd, kept to
/// forward the bytes without a copy (see `RLIMIT_NOFILE`); and the last drop
/// pays the `munmap` and the freeing of the pages (about 15 ms for 64 MiB on
/// a small VM). The memfd is sealed,
/// so nobody, including the worker that wrote it, can change or truncate the
/// bytes while they are visible. [`Blob::into_vec`] copies them out when an
/// owned `Vec` is wanted.
///
/// Otherwise a `Blob` is an ordinary buffer: made from a `Vec`, decoded from
/// a small result or with another serde format, it holds its bytes on the
/// heap.
///
/// Cloning a `Blob` and taking a [`slice`](Blob::slice) of it never copy the
/// bytes: like [`bytes::Bytes`](https://docs.rs/bytes), a `Blob` is a shared
/// handle to immutable memory, and a clone or a slice keeps all of its
/// original's memory alive (the whole mapping, or the whole `Vec`).
///
/// A mapped `Blob` passed on as the argument of another task, or returned by
/// a worker that received it, is forwarded rather than copied when it is the
/// last thing in the value and the bytes before it are the same as where it
/// came from: a `Blob` that was the whole result (or the whole argument), or
/// the end of a tuple whose other fields are passed on unchanged. Its sealed
/// memfd is then sent to the next process as it is. Anything else is copied
/// into a new memfd, as a `Vec` would be.
///
/// With the `bytes` feature, a `Blob` converts to and from
/// [`bytes::Bytes`](https://docs.rs/bytes) without copying, either way; a
/// mapped `Blob` turned into `Bytes` keeps its mapping alive, and a `Blob`
/// made from `Bytes` is not mapped, so it is copied when sent to a worker.
///
/// ```no_run
/// use run_in_process::{Blob, Zygote};
///
/// fn render(pages: u32) -> Blob {
///     Blob::from(vec![0u8; pages as usize * 4096])
/// }
///
/// fn checksum(image: Blob) -> u64 {
///     image.iter().map(|&b| u64::from(b)).sum()
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let zygote = Zygote::start()?;
/// tokio::runtime::Runtime::new()?.block_on(async {
///     let image: Blob = zygote.run(render, 16_384).await?;
///     assert_eq!(image.len(), 64 << 20);
///     assert!(image.is_mapped()); // 64 MiB, and no copy in this process
///     let header = image.slice(..4096); // no copy either
///     assert!(header.is_mapped());
///     // The worker gets the same sealed memfd: no copy on the way.
///     assert_eq!(zygote.run(checksum, image).await?, 0);
///     Ok(())
/// })
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Blob(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static [u8]),
    /// `range` lies within `buf` (checked when it was made).
    Heap {
        buf: Arc<Vec<u8>>,
        range: Range<usize>,
    },
    /// `range` lies within `map` (checked when it was made).
    Mapped {
        map: Arc<SealedMap>,
        range: Range<usize>,
    },
    #[cfg(feature = "bytes")]
    Bytes(bytes::Bytes),
}

impl Default for Repr {
    fn default() -> Repr {
        Repr::Static(&[])
    }
}

impl Blob {
    /// An empty `Blob`.
    pub const fn new() -> Blob {
        Blob(Repr::Static(&[]))
    }

    /// A `Blob` of bytes that live for the whole program, without copying
    /// them; serializing it (in a worker, say) reads them in place.
    pub const fn from_static(bytes: &'static [u8]) -> Blob {
        Blob(Repr::Static(bytes))
    }

    /// Whether the bytes live in a sealed mapping shared with the process
    /// that sent them, rather than in this process's memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// The bytes as a `Vec`: free for a `Blob` made from a `Vec` that has
    /// not been cloned or sliced, a copy otherwise.
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Heap { buf, range } if range == (0..buf.len()) => {
                Arc::try_unwrap(buf).unwrap_or_else(|buf| buf[..].to_vec())
            }
            _ => self.to_vec(),
        }
    }

    /// A `Blob` of the bytes in `range`, sharing this one's memory: O(1),
    /// without copying, like `bytes::Bytes::slice`. A slice of a mapped
    /// `Blob` is mapped, and keeps the whole mapping alive; an empty slice
    /// is [`Blob::new`] and keeps nothing alive.
    ///
    /// ```
    /// use run_in_process::Blob;
    ///
    /// let blob = Blob::from(b"hello world".to_vec());
    /// assert_eq!(blob.slice(6..), b"world"[..]);
    /// assert_eq!(blob.slice(..=4), b"hello"[..]);
    /// ```
    ///
    /// # Panics
    ///
    /// Requires that the start is no greater than the end and the end is no
    /// greater than the length, otherwise slicing panics, as
    /// `bytes::Bytes::slice` and slice indexing do. [`Blob::get`] returns
    /// `None` instead.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Blob {
        let len = self.len();
        match bounds(&range, len) {
            Ok(range) => self.sub(range),
            Err(Bounds::Reversed(start, end)) => {
                panic!("range start must not be greater than end: {start} <= {end}")
            }
            Err(Bounds::PastEnd(end)) => panic!("range end out of bounds: {end} <= {len}"),
        }
    }

    /// As [`slice`](Blob::slice), but `None` where `slice` would panic.
    ///
    /// ```
    /// use run_in_process::Blob;
    ///
    /// let blob = Blob::from_static(b"abc");
    /// assert_eq!(blob.get(1..).as_deref(), Some(&b"bc"[..]));
    /// assert!(blob.get(2..5).is_none());
    /// ```
    pub fn get(&self, range: impl RangeBounds<usize>) -> Option<Blob> {
        bounds(&range, self.len()).ok().map(|r| self.sub(r))
    }

    /// The bytes in `range`, which lies within `0..self.len()`.
    fn sub(&self, range: Range<usize>) -> Blob {
        debug_assert!(range.start <= range.end && range.end <= self.len());
        if range.is_empty() {
            return Blob::new();
        }
        // `range` is relative to this Blob's bytes; `within` is where those
        // are in the memory the Blob holds.
        let inner = |within: &Range<usize>| within.start + range.start..within.start + range.end;
        Blob(match &self.0 {
            Repr::Static(s) => Repr::Static(&s[range]),
            Repr::Heap { buf, range: within } => Repr::Heap {
                buf: Arc::clone(buf),
                range: inner(within),
            },
            Repr::Mapped { map, range: within } => Repr::Mapped {
                map: Arc::clone(map),
                range: inner(within),
            },
            #[cfg(feature = "bytes")]
            Repr::Bytes(b) => Repr::Bytes(b.slice(range)),
        })
    }

    /// A `Blob` of `bytes`, which lie inside this thread's source mapping if
    /// they were borrowed from it; copied otherwise, or if too small to be
    /// worth pinning the mapping for.
    fn borrowing(bytes: &[u8]) -> Blob {
        let mapped = SOURCE.try_with(|s| {
            let source = s.borrow();
            let map = source.as_ref()?;
            if bytes.len() < MAP_AT_LEAST || bytes.len() < map.len() / PIN_FACTOR {
                return None;
            }
            let range = range_within(map, bytes)?;
            Some(Repr::Mapped {
                map: Arc::clone(map),
                range,
            })
        });
        match mapped {
            Ok(Some(repr)) => Blob(repr),
            _ => Blob::from(bytes),
        }
    }
}

/// Why a range is not within a `Blob`.
#[derive(Debug, PartialEq)]
enum Bounds {
    /// The start (given) is past the end (given).
    Reversed(usize, usize),
    /// The end (given) is past the length, or is `usize::MAX + 1`.
    PastEnd(usize),
}

/// `range` as a half-open range within `0..len`.
fn bounds(range: &impl RangeBounds<usize>, len: usize) -> Result<Range<usize>, Bounds> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        // `..` can only start past `usize::MAX` by being empty at its end.
        Bound::Excluded(&s) => s.checked_add(1).ok_or(Bounds::PastEnd(s))?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1).ok_or(Bounds::PastEnd(e))?,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    if start > end {
        Err(Bounds::Reversed(start, end))
    } else if end > len {
        Err(Bounds::PastEnd(end))
    } else {
        Ok(start..end)
    }
}

// A `Blob` moves and is shared across threads (checked when compiling).
const _: fn() = || {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Blob>();
};

/// Where `bytes` sits inside `map`, if it does; plain address arithmetic.
fn range_within(map: &[u8], bytes: &[u8]) -> Option<Range<usize>> {
    let start = (bytes.as_ptr() as usize).checked_sub(map.as_ptr() as usize)?;
    let end = start.checked_add(bytes.len())?;
    (end <= map.len()).then_some(start..end)
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Heap { buf, range } => &buf[range.clone()],
            Repr::Mapped { map, range } => &map[range.clone()],
            #[cfg(feature = "bytes")]
            Repr::Bytes(b) => b,
        }
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Borrow<[u8]> for Blob {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for Blob {
    /// Takes the `Vec` without copying its bytes.
    fn from(bytes: Vec<u8>) -> Blob {
        Blob(Repr::Heap {
            range: 0..bytes.len(),
            buf: Arc::new(bytes),
        })
    }
}

impl From<&[u8]> for Blob {
    /// Copies the bytes.
    fn from(bytes: &[u8]) -> Blob {
        Blob::from(bytes.to_vec())
    }
}

impl From<String> for Blob {
    /// Takes the `String`'s buffer without copying it.
    fn from(text: String) -> Blob {
        Blob::from(text.into_bytes())
    }
}

impl From<Blob> for Vec<u8> {
    /// See [`Blob::into_vec`].
    fn from(blob: Blob) -> Vec<u8> {
        blob.into_vec()
    }
}

#[cfg(feature = "bytes")]
impl From<bytes::Bytes> for Blob {
    /// Keeps the `Bytes` without copying; the `Blob` is not mapped.
    fn from(bytes: bytes::Bytes) -> Blob {
        Blob(Repr::Bytes(bytes))
    }
}

#[cfg(feature = "bytes")]
impl From<Blob> for bytes::Bytes {
    /// Never copies: a `Vec` that the `Blob` alone holds becomes the `Bytes`'
    /// buffer, and anything else (a mapping, say) is kept alive by the
    /// `Bytes`.
    fn from(blob: Blob) -> bytes::Bytes {
        match blob.0 {
            Repr::Static(s) => bytes::Bytes::from_static(s),
            Repr::Bytes(b) => b,
            Repr::Heap { buf, range } if range == (0..buf.len()) => match Arc::try_unwrap(buf) {
                Ok(vec) => bytes::Bytes::from(vec),
                Err(buf) => bytes::Bytes::from_owner(Blob(Repr::Heap { buf, range })),
            },
            repr => bytes::Bytes::from_owner(Blob(repr)),
        }
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the bytes: a Blob is usually large.
        f.debug_struct("Blob")
            .field("len", &self.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Blob) -> bool {
        **self == **other
    }
}

impl Eq for Blob {}

impl PartialEq<[u8]> for Blob {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialEq<Vec<u8>> for Blob {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

impl PartialEq<&[u8]> for Blob {
    fn eq(&self, other: &&[u8]) -> bool {
        **self == **other
    }
}

impl PartialEq<Blob> for [u8] {
    fn eq(&self, other: &Blob) -> bool {
        *self == **other
    }
}

impl PartialEq<Blob> for Vec<u8> {
    fn eq(&self, other: &Blob) -> bool {
        self[..] == **other
    }
}

impl PartialOrd for Blob {
    fn partial_cmp(&self, other: &Blob) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Blob {
    fn cmp(&self, other: &Blob) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl Hash for Blob {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Repr::Mapped { map, range } = &self.0 {
            if OFFERING.try_with(Cell::get).unwrap_or(false) {
                return offer_while(map, range, || serializer.serialize_bytes(self));
            }
        }
        serializer.serialize_bytes(self)
    }
}

/// Runs `serialize` with `map[range]` as this thread's offer (see
/// [`offering`]), and withdraws it afterwards, even on unwinding, so that
/// nothing serialized later can be mistaken for it.
fn offer_while<T>(map: &Arc<SealedMap>, range: &Range<usize>, serialize: impl FnOnce() -> T) -> T {
    struct Withdraw;
    impl Drop for Withdraw {
        fn drop(&mut self) {
            let _ = OFFER.try_with(|o| o.borrow_mut().take());
        }
    }
    let offer = Forwardable {
        map: Arc::clone(map),
        range: range.clone(),
    };
    if OFFER.try_with(|o| *o.borrow_mut() = Some(offer)).is_err() {
        return serialize();
    }
    let _withdraw = Withdraw;
    serialize()
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Blob, D::Error> {
        deserializer.deserialize_bytes(BlobVisitor)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        Ok(Blob::borrowing(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob, E> {
        Ok(Blob::from(v.as_bytes()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Blob, E> {
        Ok(Blob::from(v.into_bytes()))
    }

    /// Formats without byte strings (JSON, say) send a sequence of numbers.
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Blob, S::Error> {
        // The length is the input's claim: trust it only as far as a page.
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAP_AT_LEAST));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(Blob::from(bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as ValueError, SeqDeserializer};

    use super::*;
    use crate::{codec, shm};

    /// A sealed memfd holding `bytes`, opened as the parent opens a result.
    fn sealed(bytes: &[u8]) -> SealedBytes {
        let fd = shm::sealed_copy(bytes).expect("sealed memfd");
        SealedBytes::open(fd.as_fd(), bytes.len() as u64, u64::MAX).expect("open")
    }

    fn encoded<T: Serialize>(value: &T) -> Vec<u8> {
        codec::encode(value).expect("encode")
    }

    #[test]
    fn a_large_blob_decoded_from_a_sealed_payload_points_into_it() {
        let body: Vec<u8> = (0..3 * MAP_AT_LEAST).map(|i| i as u8).collect();
        let value = (7u32, Blob::from(body.clone()), String::from("tail"));
        let payload = sealed(&encoded(&value));
        let (n, blob, tail): (u32, Blob, String) =
            decoding_from(&payload, || codec::decode(payload.bytes(), usize::MAX)).expect("decode");
        assert_eq!((n, tail.as_str()), (7, "tail"));
        assert!(blob.is_mapped(), "{blob:?}");
        assert_eq!(blob, body);
        // The blob keeps the mapping alive on its own.
        drop(payload);
        assert_eq!(blob.clone().into_vec(), body);
    }

    #[test]
    fn small_blobs_and_other_inputs_are_copied() {
        let small = Blob::from(vec![1u8; MAP_AT_LEAST - 1]);
        let large = Blob::from(vec![2u8; MAP_AT_LEAST]);
        let payload = sealed(&encoded(&(small.clone(), large.clone())));
        // Without a source, even a large blob decodes into the heap.
        let plain: (Blob, Blob) = codec::decode(payload.bytes(), usize::MAX).expect("decode");
        assert!(!plain.0.is_mapped() && !plain.1.is_mapped());
        // With an unrelated source, too: the bytes are not inside it.
        let other = sealed(&[0u8; 2 * MAP_AT_LEAST]);
        let elsewhere: (Blob, Blob) =
            decoding_from(&other, || codec::decode(payload.bytes(), usize::MAX)).expect("decode");
        assert!(!elsewhere.1.is_mapped());
        let mapped: (Blob, Blob) =
            decoding_from(&payload, || codec::decode(payload.bytes(), usize::MAX)).expect("decode");
        assert!(!mapped.0.is_mapped() && mapped.1.is_mapped());
        assert_eq!((&mapped.0, &mapped.1), (&small, &large));
        assert_eq!(plain, mapped);
    }

    #[test]
    fn every_large_blob_in_a_payload_maps_not_only_the_first() {
        // Borrowing needs no alignment: whatever offsets the length prefixes
        // leave the later blobs at, each points into the mapping.
        let blobs: Vec<Blob> = (0..4)
            .map(|k| Blob::from(vec![k as u8; 3 * MAP_AT_LEAST + k * 7]))
            .collect();
        let payload = sealed(&encoded(&(1u8, blobs.clone(), String::from("x"))));
        let (_, decoded, _): (u8, Vec<Blob>, String) =
            decoding_from(&payload, || codec::decode(payload.bytes(), usize::MAX)).expect("decode");
        let map = payload.mapping().expect("mapped");
        for (got, sent) in decoded.iter().zip(&blobs) {
            assert!(got.is_mapped(), "{got:?}");
            assert!(
                range_within(map, got).is_some(),
                "{got:?} is outside the mapping"
            );
            assert_eq!(got, sent);
        }
    }

    #[test]
    fn a_blob_maps_only_if_it_is_an_eighth_of_the_payload() {
        // What else is in the payload is the worker's choice; a blob that
        // would pin more than eight times its own size is copied.
        for (blob_len, other_len, maps) in [(8192, 3 * 8192, true), (8192, 15 * 8192, false)] {
            let value = (Blob::from(vec![4u8; blob_len]), vec![5u8; other_len]);
            let payload = sealed(&encoded(&value));
            let (blob, other): (Blob, Vec<u8>) =
                decoding_from(&payload, || codec::decode(payload.bytes(), usize::MAX))
                    .expect("decode");
            assert_eq!(
                blob.is_mapped(),
                maps,
                "{blob_len} of {}",
                payload.bytes().len()
            );
            assert_eq!((blob, other), (value.0, value.1));
        }
    }

    #[test]
    fn the_source_is_restored_after_decoding_even_on_a_panic() {
        let outer = sealed(&encoded(&Blob::from(vec![3u8; MAP_AT_LEAST])));
        let inner = sealed(&[0u8; 8]);
        decoding_from(&outer, || {
            let caught = std::panic::catch_unwind(|| decoding_from(&inner, || panic!("in decode")));
            assert!(caught.is_err());
            let blob: Blob = codec::decode(outer.bytes(), usize::MAX).expect("decode");
            assert!(blob.is_mapped(), "the outer source is back");
        });
        assert!(SOURCE.with(|s| s.borrow().is_none()));
    }

    /// A mapped `Blob` of `len` patterned bytes, decoded as a result would be.
    fn mapped(len: usize) -> Blob {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let payload = sealed(&encoded(&Blob::from(body)));
        let blob: Blob =
            decoding_from(&payload, || codec::decode(payload.bytes(), usize::MAX)).expect("decode");
        assert!(blob.is_mapped());
        blob
    }

    #[test]
    fn slices_and_clones_share_the_memory_of_every_kind_of_blob() {
        static BYTES: [u8; 3 * MAP_AT_LEAST] = [9; 3 * MAP_AT_LEAST];
        let heap = Blob::from((0..3 * MAP_AT_LEAST).map(|i| i as u8).collect::<Vec<u8>>());
        for blob in [Blob::from_static(&BYTES), heap, mapped(3 * MAP_AT_LEAST)] {
            let base = blob.as_ptr();
            assert_eq!(blob.clone().as_ptr(), base, "{blob:?}: a clone copied");
            let part = blob.slice(100..MAP_AT_LEAST);
            assert_eq!(
                part.as_ptr(),
                base.wrapping_add(100),
                "{blob:?}: a slice copied"
            );
            assert_eq!(part, blob[100..MAP_AT_LEAST]);
            assert_eq!(part.is_mapped(), blob.is_mapped());
            // A slice of a slice is relative to it.
            let inner = part.slice(1..=2);
            assert_eq!(inner.as_ptr(), base.wrapping_add(101));
            assert_eq!(inner, blob[101..103]);
            assert_eq!(blob.slice(..), blob);
            assert_eq!(blob.slice(..).as_ptr(), base);
            // An empty slice holds nothing, not even a mapping.
            let empty = blob.slice(5..5);
            assert!(empty.is_empty() && !empty.is_mapped());
        }
    }

    #[test]
    #[expect(
        clippy::reversed_empty_ranges,
        reason = "reversed ranges are among the cases"
    )]
    fn ranges_resolve_like_slice_indexing() {
        let len = 10;
        assert_eq!(bounds(&(2..5), len), Ok(2..5));
        assert_eq!(bounds(&(2..=5), len), Ok(2..6));
        assert_eq!(bounds(&(..), len), Ok(0..10));
        assert_eq!(bounds(&(10..), len), Ok(10..10));
        assert_eq!(
            bounds(&(Bound::Excluded(1), Bound::Excluded(3)), len),
            Ok(2..3)
        );
        assert_eq!(bounds(&(5..4), len), Err(Bounds::Reversed(5, 4)));
        assert_eq!(bounds(&(..11), len), Err(Bounds::PastEnd(11)));
        assert_eq!(bounds(&(11..), len), Err(Bounds::Reversed(11, 10)));
        assert_eq!(
            bounds(&(..=usize::MAX), len),
            Err(Bounds::PastEnd(usize::MAX))
        );
        assert_eq!(
            bounds(&(Bound::Excluded(usize::MAX), Bound::Unbounded), len),
            Err(Bounds::PastEnd(usize::MAX))
        );
        let blob = Blob::from(vec![1u8; len]);
        assert!(blob.get(5..4).is_none() && blob.get(..11).is_none());
        assert_eq!(blob.get(8..).expect("in range"), vec![1u8; 2]);
    }

    #[test]
    #[should_panic(expected = "range end out of bounds: 11 <= 10")]
    fn a_slice_past_the_end_panics() {
        let _ = Blob::from(vec![0u8; 10]).slice(..11);
    }

    #[test]
    #[should_panic(expected = "range start must not be greater than end: 6 <= 5")]
    fn a_reversed_slice_panics() {
        #[expect(clippy::reversed_empty_ranges, reason = "the case under test")]
        let _ = Blob::from(vec![0u8; 10]).slice(6..5);
    }

    #[test]
    fn into_vec_takes_the_vec_only_if_nothing_shares_it() {
        let blob = Blob::from(vec![7u8; 100]);
        let base = blob.as_ptr();
        let taken = blob.into_vec();
        assert_eq!(taken.as_ptr(), base);
        let blob = Blob::from(taken);
        let clone = blob.clone();
        let copied = blob.into_vec();
        assert_ne!(copied.as_ptr(), clone.as_ptr());
        let part = clone.slice(1..).into_vec();
        assert_ne!(part.as_ptr(), clone[1..].as_ptr());
        assert_eq!(clone.into_vec(), copied);
    }

    #[test]
    fn only_a_mapped_blob_being_serialized_in_a_payload_is_offered() {
        let blob = mapped(3 * MAP_AT_LEAST);
        assert!(offered_during(&blob, &blob));
        // Not its slice (other bytes), nor a heap Blob of the same bytes.
        let part = blob.slice(1..);
        assert!(!offered_during(&part, &blob));
        assert!(offered_during(&part, &part));
        assert!(!offered_during(&Blob::from(&blob[..]), &blob));
        // Outside `offering`, and after a serialization, nothing is offered.
        assert!(codec::encode_to(&blob, &mut Probe(&blob, &mut false)).is_ok());
        assert!(offered(&blob).is_none());
        assert!(OFFER.with(|o| o.borrow().is_none()));
        assert!(!OFFERING.with(Cell::get));

        /// A sink that notes whether `.0` is on offer while it is written.
        struct Probe<'a>(&'a [u8], &'a mut bool);
        impl codec::ByteSink for Probe<'_> {
            fn push(&mut self, _: u8) -> Result<(), ()> {
                Ok(())
            }
            fn extend(&mut self, bytes: &[u8]) -> Result<(), ()> {
                if bytes.as_ptr() == self.0.as_ptr() && offered(bytes).is_some() {
                    *self.1 = true;
                }
                Ok(())
            }
        }
        /// Whether a mapped Blob with `bytes` is on offer while `value`
        /// serializes inside `offering`.
        fn offered_during<T: Serialize>(value: &T, bytes: &[u8]) -> bool {
            let mut seen = false;
            offering(|| codec::encode_to(value, &mut Probe(bytes, &mut seen))).expect("encode");
            seen
        }
    }

    #[cfg(feature = "bytes")]
    #[test]
    fn bytes_conversions_do_not_copy() {
        let vec_blob = Blob::from(vec![1u8; 100]);
        let base = vec_blob.as_ptr();
        assert_eq!(bytes::Bytes::from(vec_blob).as_ptr(), base);
        let shared = Blob::from(vec![2u8; 100]);
        let b = bytes::Bytes::from(shared.slice(10..));
        assert_eq!(b.as_ptr(), shared[10..].as_ptr());
        let map = mapped(3 * MAP_AT_LEAST);
        let b = bytes::Bytes::from(map.clone());
        assert_eq!(b.as_ptr(), map.as_ptr());
        // The Bytes alone keeps the mapping alive.
        drop(map);
        assert_eq!(b[300], (300 % 251) as u8);
        static S: &[u8] = b"static";
        assert_eq!(
            bytes::Bytes::from(Blob::from_static(S)).as_ptr(),
            S.as_ptr()
        );
        // And back: the Bytes is kept, and slices of it are its slices.
        let blob = Blob::from(b.clone());
        assert_eq!(blob.as_ptr(), b.as_ptr());
        assert!(!blob.is_mapped());
        assert_eq!(blob.slice(4..).as_ptr(), b[4..].as_ptr());
        assert_eq!(bytes::Bytes::from(blob).as_ptr(), b.as_ptr());
    }

    #[test]
    fn a_byte_sequence_decodes_too() {
        let seq = SeqDeserializer::<_, ValueError>::new(vec![1u8, 2, 3].into_iter());
        assert_eq!(Blob::deserialize(seq).expect("seq"), vec![1, 2, 3]);
        let text: Result<Blob, ValueError> = Blob::deserialize("hi".into_deserializer());
        assert_eq!(text.expect("str"), b"hi".to_vec());
    }

    #[test]
    fn constructors_and_comparisons() {
        static BYTES: &[u8] = b"static bytes";
        let s = Blob::from_static(BYTES);
        assert!(!s.is_mapped());
        assert_eq!(s, Blob::from(BYTES));
        assert_eq!(s.clone().into_vec(), BYTES.to_vec());
        assert!(Blob::new().is_empty() && Blob::default().is_empty());
        let (a, b) = (Blob::from(&b"a"[..]), Blob::from(vec![b'b']));
        assert!(a < b && a.cmp(&b) == std::cmp::Ordering::Less);
        assert_eq!(
            format!("{:?}", Blob::from(vec![0; 5])),
            "Blob { len: 5, mapped: false }"
        );
    }
}
