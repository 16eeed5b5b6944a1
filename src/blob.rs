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

use std::borrow::Borrow;
use std::cell::RefCell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, Range};
use std::sync::Arc;

use memmap2::Mmap;
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};

use crate::shm::SealedBytes;

/// Byte strings shorter than this are copied even out of a mapping: a page's
/// worth is cheap to copy.
const MAP_AT_LEAST: usize = 4096;

/// A mapped `Blob` keeps the whole mapping alive, and the worker chose what
/// else is in it. So a byte string maps only if it is at least this fraction
/// of the mapping: no `Blob` pins more than `PIN_FACTOR` times its own size.
const PIN_FACTOR: usize = 8;

thread_local! {
    /// The mapping being decoded on this thread, if it is a sealed payload.
    static SOURCE: RefCell<Option<Arc<Mmap>>> = const { RefCell::new(None) };
}

/// Runs `decode` with `bytes`' mapping as this thread's source, so that a
/// [`Blob`] decoded from it borrows the mapping instead of copying.
pub(crate) fn decoding_from<T>(bytes: &SealedBytes, decode: impl FnOnce() -> T) -> T {
    let Some(map) = bytes.mapping() else {
        return decode();
    };
    /// Puts the previous source back, even if `decode` unwinds.
    struct Restore(Option<Arc<Mmap>>);
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
/// mapped `Blob` keeps the whole mapping alive until it and every clone of it
/// are dropped, so the eighth bounds what a small `Blob` can pin to eight
/// times its size, whatever else the worker put in the value. The pages count
/// as shared memory (`RssShmem` in `/proc/self/status`, once touched), not
/// heap; each retained result is one memory mapping (see
/// `vm.max_map_count`); and the last drop pays the `munmap` and the freeing
/// of the pages (about 15 ms for 64 MiB on a small VM). The memfd is sealed,
/// so nobody, including the worker that wrote it, can change or truncate the
/// bytes while they are visible. [`Blob::into_vec`] copies them out when an
/// owned `Vec` is wanted.
///
/// Otherwise a `Blob` is an ordinary owned buffer: made from a `Vec`, decoded
/// from a small result or with another serde format, it holds its bytes on
/// the heap, and cloning it copies them (cloning a mapped or static `Blob`
/// does not).
///
/// ```no_run
/// use run_in_process::{Blob, Zygote};
///
/// fn render(pages: u32) -> Blob {
///     Blob::from(vec![0u8; pages as usize * 4096])
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let zygote = Zygote::start()?;
/// tokio::runtime::Runtime::new()?.block_on(async {
///     let image: Blob = zygote.run(render, 16_384).await?;
///     assert_eq!(image.len(), 64 << 20);
///     assert!(image.is_mapped()); // 64 MiB, and no copy in this process
///     Ok(())
/// })
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Blob(Repr);

#[derive(Clone)]
enum Repr {
    Heap(Vec<u8>),
    Static(&'static [u8]),
    /// `range` lies within `map` (checked when it was made).
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
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

    /// The bytes as a `Vec`: free for a `Blob` made from a `Vec`, a copy
    /// otherwise.
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Heap(v) => v,
            _ => self.to_vec(),
        }
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
            _ => Blob(Repr::Heap(bytes.to_vec())),
        }
    }
}

// A `Blob` moves and is shared across threads (checked when compiling).
const _: fn() = || {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Blob>();
};

/// Where `bytes` sits inside `map`, if it does; plain address arithmetic.
fn range_within(map: &Mmap, bytes: &[u8]) -> Option<Range<usize>> {
    let start = (bytes.as_ptr() as usize).checked_sub(map.as_ptr() as usize)?;
    let end = start.checked_add(bytes.len())?;
    (end <= map.len()).then_some(start..end)
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(v) => v,
            Repr::Static(s) => s,
            Repr::Mapped { map, range } => &map[range.clone()],
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
    fn from(bytes: Vec<u8>) -> Blob {
        Blob(Repr::Heap(bytes))
    }
}

impl From<&[u8]> for Blob {
    fn from(bytes: &[u8]) -> Blob {
        Blob(Repr::Heap(bytes.to_vec()))
    }
}

impl From<String> for Blob {
    fn from(text: String) -> Blob {
        Blob(Repr::Heap(text.into_bytes()))
    }
}

impl From<Blob> for Vec<u8> {
    fn from(blob: Blob) -> Vec<u8> {
        blob.into_vec()
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
        serializer.serialize_bytes(self)
    }
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
