//! Encoded arguments and results: in memory while small, streamed into a
//! sealed memfd once they outgrow their inline room.
//!
//! A large value used to be encoded into a `Vec` and then copied into a memfd.
//! On this kind of machine every fresh page costs a fault of a few
//! microseconds, so that intermediate `Vec` cost as much as the copy that
//! mattered (about 40 ms for 64 MiB), and it doubled the peak memory.
//! [`PayloadWriter`] instead keeps the first `inline_max` bytes in memory and,
//! past that, writes the encoder's output straight to a memfd in chunks with
//! `write(2)`, which fills the file's pages without faulting them into any
//! mapping. It also enforces the size limit *while* encoding, so a result far
//! over the limit fails after `limit` bytes instead of after allocating all of
//! them.
//!
//! When the byte string that makes the payload spill is large (a `Blob` or a
//! `serde_bytes` buffer, written in one piece), the memfd starts with up to
//! 4095 bytes of padding (a hole), chosen so that the string lands at a file
//! offset with the same offset within 4 KiB as its source address. The
//! kernel copies with `rep movsb`, which on the AMD host we measured runs
//! at half speed when the destination sits a few bytes above the source
//! modulo 4 KiB: a page-aligned 64 MiB buffer behind a 4-byte length prefix
//! took 56–88 ms to write instead of 35–51 ms. Readers take the payload as
//! the memfd's last `len` bytes (`SealedBytes::open`). Only that first large
//! string can be aligned so: the payload is one contiguous postcard encoding,
//! which has no room for padding between two values, so a later large string
//! lands wherever the bytes before it end (it still decodes as a mapped
//! `Blob`: borrowing needs no alignment).
//!
//! A mapped `Blob` whose bytes make the payload spill may not be copied at
//! all. If its memfd already holds exactly the payload as its tail (the bytes
//! buffered so far, then the `Blob`'s, then the end of the file, after at most
//! `shm::PAD_MAX` bytes), the writer forwards a duplicate of that memfd,
//! which is sealed already, instead of making a new one. That is the case
//! when a task's `Blob` result is passed as the next task's argument, or an
//! argument is returned as the result. Should anything follow the `Blob`,
//! the writer falls back to copying it, having lost nothing but a `dup`.

use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};

use crate::blob::{self, Forwardable};
use crate::codec::ByteSink;
use crate::epoch::ForkLocal;
use crate::shm;
use crate::sys::{self, SysError};

/// Writes to the memfd go out in chunks of at least this many bytes.
const CHUNK: usize = 64 * 1024;

/// The period of the copy alignment that the padding matches (see the module
/// docs); one more than `shm::PAD_MAX`.
const ALIGN: usize = 4096;
const _: () = assert!(ALIGN as u64 - 1 == shm::PAD_MAX);

/// An encoded value, wherever it ended up.
pub(crate) enum Payload {
    /// Short enough for its inline room.
    Inline(Vec<u8>),
    /// In a memfd sealed against writes, growth and shrinking. An argument's
    /// may be dropped in a fork that inherited it (an unstarted `Task` in a
    /// static), where its fd number is not its own.
    Sealed { fd: ForkLocal<OwnedFd>, len: u64 },
}

impl Payload {
    /// Encodes `value`: inline if it fits in `inline_max` bytes, otherwise in
    /// a new sealed memfd called `name`; an error once it exceeds `limit`.
    pub(crate) fn encode<T: serde::Serialize + ?Sized>(
        value: &T,
        name: &'static str,
        inline_max: usize,
        limit: u64,
    ) -> Result<Payload, PayloadError> {
        Payload::encode_in(Vec::new(), value, name, inline_max, limit)
    }

    /// As [`encode`](Payload::encode), reusing `buf`'s memory for the inline
    /// bytes.
    pub(crate) fn encode_in<T: serde::Serialize + ?Sized>(
        buf: Vec<u8>,
        value: &T,
        name: &'static str,
        inline_max: usize,
        limit: u64,
    ) -> Result<Payload, PayloadError> {
        let mut writer = PayloadWriter::new(buf, name, inline_max, limit);
        match blob::offering(|| crate::codec::encode_to(value, &mut writer)) {
            Ok(()) => writer.finish(),
            // The writer knows whether it refused the bytes (and why); if it
            // did not, the value's own `Serialize` failed.
            Err(message) => Err(writer.failure.unwrap_or(PayloadError::Codec(message))),
        }
    }

    /// Length of the encoded bytes.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Payload::Inline(bytes) => bytes.len() as u64,
            Payload::Sealed { len, .. } => *len,
        }
    }
}

/// Why a value could not be encoded.
#[derive(Debug)]
pub(crate) enum PayloadError {
    /// The encoding passed the size limit (given) before it ended.
    OverLimit(u64),
    /// The value's `Serialize` implementation failed.
    Codec(String),
    /// The memfd could not be created, written or sealed.
    Sys(SysError),
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::OverLimit(limit) => {
                write!(f, "the encoding is over the limit of {limit} bytes")
            }
            PayloadError::Codec(message) => f.write_str(message),
            PayloadError::Sys(e) => write!(f, "{} failed: {}", e.call, e.source),
        }
    }
}

/// The encoder's sink; see the module docs.
struct PayloadWriter {
    name: &'static str,
    inline_max: usize,
    limit: u64,
    /// Bytes already written to the memfd.
    flushed: u64,
    /// The whole payload while inline; once spilled, bytes not yet written
    /// to the memfd.
    buf: Vec<u8>,
    /// `buf` may grow to this length without any other check: the inline
    /// room or the chunk size, and never past the limit.
    fast_until: usize,
    memfd: Option<File>,
    /// A mapped `Blob`'s bytes that follow `buf` and end the payload so far,
    /// in a memfd that holds exactly `buf` and them as its tail; `memfd` is
    /// then `None` and `fast_until` 0, so that any later byte reaches
    /// `accept`, which copies them after all.
    forward: Option<Forward>,
    /// Why the last write was refused.
    failure: Option<PayloadError>,
}

/// Bytes to be forwarded in the memfd they are already in.
struct Forward {
    bytes: Forwardable,
    /// A duplicate of the memfd, taken when the bytes were offered (the
    /// process's own, by `SealedMap::fd`).
    fd: OwnedFd,
}

impl PayloadWriter {
    fn new(mut buf: Vec<u8>, name: &'static str, inline_max: usize, limit: u64) -> PayloadWriter {
        buf.clear();
        let mut writer = PayloadWriter {
            name,
            inline_max,
            limit,
            flushed: 0,
            buf,
            fast_until: 0,
            memfd: None,
            forward: None,
            failure: None,
        };
        writer.fast_until = writer.room();
        writer
    }

    /// How long `buf` may get before the next byte needs a decision.
    fn room(&self) -> usize {
        let target = if self.memfd.is_none() {
            self.inline_max
        } else {
            CHUNK
        };
        let below_limit = self.limit.saturating_sub(self.flushed);
        target.min(usize::try_from(below_limit).unwrap_or(usize::MAX))
    }

    /// Moves what is buffered into a new memfd; later bytes go there too.
    /// `next` is what made the payload spill: if it is large, padding aligns
    /// it with its source (see the module docs).
    fn spill(&mut self, next: &[u8]) -> Result<&mut File, PayloadError> {
        let fd = sys::memfd_create(self.name).map_err(PayloadError::Sys)?;
        let mut file = File::from(fd);
        if next.len() >= CHUNK {
            let pad = (next.as_ptr() as usize).wrapping_sub(self.buf.len()) % ALIGN;
            // A hole: reads as zeros, and nobody reads it.
            file.seek(SeekFrom::Start(pad as u64))
                .map_err(|e| PayloadError::Sys(SysError::new("lseek", e)))?;
        }
        write_out(&mut file, &self.buf)?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(self.memfd.insert(file))
    }

    /// `data`, the bytes that make the payload spill, as bytes to forward,
    /// if they are a mapped `Blob`'s whose memfd holds what is buffered and
    /// them as its tail (see the module docs).
    fn forwarding(&self, data: &[u8]) -> Option<Forward> {
        debug_assert!(self.memfd.is_none() && self.flushed == 0);
        let bytes = blob::offered(data)?;
        let map = &*bytes.map;
        let start = bytes.range.start.checked_sub(self.buf.len())?;
        let tail = bytes.range.end == map.len() && start as u64 <= shm::PAD_MAX;
        if !tail || map[start..bytes.range.start] != self.buf[..] {
            return None;
        }
        let fd = bytes.map.fd()?.try_clone_to_owned().ok()?;
        Some(Forward { bytes, fd })
    }

    /// The slow path of `push` and `extend`: limit, spill, chunked writes.
    fn accept(&mut self, data: &[u8]) -> Result<(), PayloadError> {
        let forwarded = self.forward.as_ref().map_or(0, |f| f.bytes.range.len());
        let len = (self.flushed + self.buf.len() as u64 + forwarded as u64)
            .saturating_add(data.len() as u64);
        if len > self.limit {
            return Err(PayloadError::OverLimit(self.limit));
        }
        if let Some(forward) = self.forward.take() {
            // More follows the forwarded bytes, so they are not the tail of
            // this payload after all: copy them, as if never offered.
            let bytes = forward.bytes.bytes();
            let file = self.spill(bytes)?;
            write_out(file, bytes)?;
            self.flushed += bytes.len() as u64;
        }
        if self.memfd.is_none() && self.buf.len() + data.len() > self.inline_max {
            if let Some(forward) = self.forwarding(data) {
                self.forward = Some(forward);
                self.fast_until = 0;
                return Ok(());
            }
            self.spill(data)?;
        }
        match &mut self.memfd {
            None => self.buf.extend_from_slice(data),
            Some(_) if self.buf.len() + data.len() <= CHUNK => self.buf.extend_from_slice(data),
            Some(file) => {
                write_out(file, &self.buf)?;
                self.flushed += self.buf.len() as u64;
                self.buf.clear();
                if data.len() >= CHUNK {
                    write_out(file, data)?;
                    self.flushed += data.len() as u64;
                } else {
                    self.buf.extend_from_slice(data);
                }
            }
        }
        self.fast_until = self.room();
        Ok(())
    }

    /// Records why bytes were refused, for `Payload::encode` to report.
    fn refuse(&mut self, result: Result<(), PayloadError>) -> Result<(), ()> {
        result.map_err(|e| self.failure = Some(e))
    }

    /// The encoded payload: inline, or the memfd with the rest written out
    /// and sealed.
    fn finish(mut self) -> Result<Payload, PayloadError> {
        if let Some(forward) = self.forward.take() {
            // Sealed already, by whoever made it (`SealedBytes::open` checked).
            return Ok(Payload::Sealed {
                fd: ForkLocal::new(forward.fd),
                len: (self.buf.len() + forward.bytes.range.len()) as u64,
            });
        }
        let Some(mut file) = self.memfd.take() else {
            return Ok(Payload::Inline(self.buf));
        };
        write_out(&mut file, &self.buf)?;
        let len = self.flushed + self.buf.len() as u64;
        let fd = OwnedFd::from(file);
        shm::seal(fd.as_fd()).map_err(PayloadError::Sys)?;
        Ok(Payload::Sealed {
            fd: ForkLocal::new(fd),
            len,
        })
    }
}

impl ByteSink for PayloadWriter {
    #[inline]
    fn push(&mut self, byte: u8) -> Result<(), ()> {
        if self.buf.len() < self.fast_until {
            self.buf.push(byte);
            return Ok(());
        }
        let accepted = self.accept(&[byte]);
        self.refuse(accepted)
    }

    #[inline]
    fn extend(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() <= self.fast_until.saturating_sub(self.buf.len()) {
            self.buf.extend_from_slice(bytes);
            return Ok(());
        }
        let accepted = self.accept(bytes);
        self.refuse(accepted)
    }
}

fn write_out(file: &mut File, bytes: &[u8]) -> Result<(), PayloadError> {
    file.write_all(bytes)
        .map_err(|e| PayloadError::Sys(SysError::new("write", e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::SealedBytes;

    fn bytes(payload: &Payload) -> Vec<u8> {
        match payload {
            Payload::Inline(b) => b.clone(),
            Payload::Sealed { fd, len } => SealedBytes::open(fd.as_fd(), *len, u64::MAX)
                .expect("sealed")
                .bytes()
                .to_vec(),
        }
    }

    #[test]
    fn small_values_stay_inline_and_large_ones_spill_unchanged() {
        for (len, inline) in [(0usize, true), (10, true), (100, false), (300_000, false)] {
            // A Vec<u8> is encoded byte by byte (many one-byte writes); a
            // serde_bytes buffer in one large write. Both must spill intact.
            let value: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let expected = crate::codec::encode(&value).unwrap();
            let payload = Payload::encode(&value, "test", 64, u64::MAX).unwrap();
            assert_eq!(matches!(payload, Payload::Inline(_)), inline, "len {len}");
            assert_eq!(payload.len(), expected.len() as u64);
            assert_eq!(bytes(&payload), expected, "len {len}");

            let buf = serde_bytes::ByteBuf::from(value);
            let expected = crate::codec::encode(&buf).unwrap();
            let payload = Payload::encode(&buf, "test", 64, u64::MAX).unwrap();
            assert_eq!(bytes(&payload), expected, "bytes len {len}");
        }
    }

    #[test]
    fn a_large_byte_string_lands_aligned_with_its_source() {
        let mut source = memmap2::MmapMut::map_anon(300_000).unwrap();
        source
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        // Behind a 3-byte length: page-aligned, then 100 bytes into a page.
        for skip in [0usize, 100] {
            let value = serde_bytes::Bytes::new(&source[skip..]);
            let expected = crate::codec::encode(&value).unwrap();
            let Payload::Sealed { fd, len } =
                Payload::encode(&value, "test", 64, u64::MAX).unwrap()
            else {
                panic!("a large value spills")
            };
            let size = rustix::fs::fstat(&*fd).unwrap().st_size as usize;
            let pad = size - len as usize;
            let header = expected.len() - value.len();
            assert_eq!(
                (pad + header) % ALIGN,
                (source.as_ptr() as usize + skip) % ALIGN
            );
            assert_eq!(bytes(&Payload::Sealed { fd, len }), expected, "skip {skip}");
        }
        // Many small writes: no padding.
        let value: Vec<u16> = (0..50_000).collect();
        let Payload::Sealed { fd, len } = Payload::encode(&value, "test", 64, u64::MAX).unwrap()
        else {
            panic!("a large value spills")
        };
        assert_eq!(rustix::fs::fstat(&*fd).unwrap().st_size as u64, len);
    }

    /// `value` sealed in a memfd with `pad` bytes of padding, as a writer
    /// leaves it, decoded as the receiver would; and the memfd's inode.
    fn received<T: serde::Serialize + serde::de::DeserializeOwned>(
        value: &T,
        pad: usize,
    ) -> (T, u64) {
        let mut bytes = vec![0u8; pad];
        bytes.extend(crate::codec::encode(value).unwrap());
        let fd = shm::sealed_copy(&bytes).unwrap();
        let len = (bytes.len() - pad) as u64;
        let sealed = SealedBytes::open(fd.as_fd(), len, u64::MAX).unwrap();
        let value = crate::blob::decoding_from(&sealed, || {
            crate::codec::decode(sealed.bytes(), usize::MAX)
        })
        .unwrap();
        (value, inode(fd.as_fd()))
    }

    fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    fn pattern(len: usize) -> Blob {
        Blob::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
    }

    use crate::Blob;

    /// Encodes `value`, which must spill, checks its bytes are the codec's,
    /// and returns the memfd's inode.
    fn spilled_inode<T: serde::Serialize>(value: &T) -> u64 {
        let expected = crate::codec::encode(value).unwrap();
        let Payload::Sealed { fd, len } = Payload::encode(value, "test", 64, u64::MAX).unwrap()
        else {
            panic!("a large value spills")
        };
        let ino = inode(fd.as_fd());
        assert_eq!(bytes(&Payload::Sealed { fd, len }), expected);
        ino
    }

    #[test]
    fn a_mapped_blob_that_ends_its_memfd_is_forwarded_in_it() {
        // The whole value, behind the most padding a payload may have.
        let (blob, ino) = received(&pattern(300_000), 4095);
        assert_eq!(spilled_inode(&blob), ino);
        // The end of a tuple whose first field is passed on unchanged.
        let (tuple, ino) = received(&(7u32, pattern(100_000)), 12);
        assert_eq!(spilled_inode(&tuple), ino);
    }

    #[test]
    fn a_mapped_blob_is_copied_unless_its_memfd_holds_exactly_the_payload() {
        let (blob, ino) = received(&pattern(300_000), 0);
        let short = blob.slice(..blob.len() - 1);
        assert_ne!(
            spilled_inode(&(blob.clone(), 1u8)),
            ino,
            "something follows it"
        );
        assert_ne!(spilled_inode(&short), ino, "a slice short of the end");
        // Its length prefix differs from the one in the memfd.
        assert_ne!(spilled_inode(&blob.slice(1..)), ino, "a slice of the end");
        let ((n, tail), ino_tuple) = received(&(7u32, pattern(100_000)), 0);
        assert_ne!(
            spilled_inode(&(n + 1, tail)),
            ino_tuple,
            "a different prefix"
        );
        let ((head, _), ino_head) = received(&(pattern(100_000), 5u8), 0);
        assert_ne!(spilled_inode(&head), ino_head, "not the end of its memfd");
        // The padding would have to be more than PAD_MAX bytes.
        let (blob, ino) = received(&(vec![0u8; 5000], pattern(100_000)), 0);
        assert_ne!(spilled_inode(&blob), ino, "more than PAD_MAX before it");
    }

    #[test]
    fn a_forwarded_blob_still_counts_against_the_limit() {
        let (blob, _) = received(&pattern(300_000), 0);
        let len = crate::codec::encode(&blob).unwrap().len() as u64;
        assert!(matches!(
            Payload::encode(&blob, "test", 64, len - 1),
            Err(PayloadError::OverLimit(_))
        ));
        assert_eq!(Payload::encode(&blob, "test", 64, len).unwrap().len(), len);
        // And over the limit once something follows it.
        assert!(matches!(
            Payload::encode(&(blob, 1u8), "test", 64, len),
            Err(PayloadError::OverLimit(_))
        ));
    }

    #[test]
    fn the_limit_stops_the_encoding() {
        let value = vec![1u8; 1000];
        match Payload::encode(&value, "test", 64, 999) {
            Err(PayloadError::OverLimit(999)) => {}
            other => panic!("expected OverLimit, got {:?}", other.map(|p| p.len())),
        }
        // Exactly at the limit is fine: 1000 bytes plus a 2-byte length.
        assert_eq!(
            Payload::encode(&value, "test", 64, 1002).unwrap().len(),
            1002
        );
    }

    proptest::proptest! {
        /// Whatever the mix of one-byte and bulk writes, the inline room and
        /// the limit: the bytes are exactly the codec's, or the limit is
        /// reported when (and only when) they would pass it.
        #[test]
        fn matches_the_codec_or_reports_the_limit(
            parts in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..300), ".{0,40}"),
                0..8,
            ),
            bulk in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            inline_max in 0usize..600,
            // Mostly right at the boundary, where an off-by-one would show.
            slack in -3i64..3,
            far in proptest::bool::weighted(0.2),
        ) {
            let value = (parts, serde_bytes::ByteBuf::from(bulk));
            let expected = crate::codec::encode(&value).unwrap();
            let limit = if far {
                (expected.len() as u64) / 2
            } else {
                (expected.len() as i64 + slack).max(0) as u64
            };
            match Payload::encode(&value, "test", inline_max, limit) {
                Ok(payload) => {
                    proptest::prop_assert!(expected.len() as u64 <= limit);
                    proptest::prop_assert_eq!(
                        matches!(payload, Payload::Inline(_)),
                        expected.len() <= inline_max
                    );
                    proptest::prop_assert_eq!(bytes(&payload), expected);
                }
                Err(PayloadError::OverLimit(l)) => {
                    proptest::prop_assert_eq!(l, limit);
                    proptest::prop_assert!(expected.len() as u64 > limit);
                }
                Err(e) => proptest::prop_assert!(false, "unexpected error: {}", e),
            }
        }
    }

    #[test]
    fn a_failing_serialize_is_a_codec_error() {
        struct Fails;
        impl serde::Serialize for Fails {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("nope"))
            }
        }
        match Payload::encode(&Fails, "test", 64, u64::MAX) {
            Err(PayloadError::Codec(message)) => assert!(!message.is_empty()),
            other => panic!("expected Codec, got {:?}", other.map(|p| p.len())),
        }
    }
}
