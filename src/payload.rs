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
//! Every large string or byte string that the writer hands to `write(2)`
//! straight from where it is (a `Blob`, a `serde_bytes` buffer or a `String`
//! of at least a chunk, written in one piece) lands at a file offset with the
//! same offset within 4 KiB as its source address, however many the payload
//! holds. The kernel copies with `rep movsb`, which on the AMD host we
//! measured runs at half speed when the destination sits a few bytes above
//! the source modulo 4 KiB: a page-aligned 64 MiB buffer behind a 4-byte
//! length prefix took 56–88 ms to write instead of 35–51 ms. The codec puts
//! a pad marker (up to 4095 zero bytes) between each large string's length
//! and its bytes (see `codec`), and the writer chooses each pad's length
//! ([`PayloadWriter::pad_for`]). A string copied into a buffer first (the
//! inline bytes, or the chunk buffer) gets none, and so does one whose pad
//! would take the payload past the limit. The memfd holds the payload from
//! its first byte; readers take it as the memfd's last `len` bytes
//! (`SealedBytes::open`), which lets a forwarded memfd (below) hold more
//! before it.
//!
//! A mapped `Blob` whose bytes make the payload spill may not be copied at
//! all. If its memfd already holds exactly the payload as its tail (the bytes
//! buffered so far, then the `Blob`'s, then the end of the file, after at most
//! `shm::PAD_MAX` bytes), the writer forwards a duplicate of that memfd,
//! which is sealed already, instead of making a new one. That is the case
//! when a task's `Blob` result is passed as the next task's argument, or an
//! argument is returned as the result. The writer picks the `Blob`'s pad so
//! that the bytes before it can match the source memfd's: usually the
//! aligned one is that very pad, since the mapping is page-aligned, but the
//! writer reads the pad the source has. Should anything follow the `Blob`,
//! the writer falls back to copying it, having lost nothing but a `dup`.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use crate::blob::{self, Forwardable};
use crate::codec::{self, ByteSink};
use crate::epoch::ForkLocal;
use crate::shm;
use crate::sys::{self, SysError};

/// Writes to the memfd go out in chunks of at least this many bytes.
const CHUNK: usize = 64 * 1024;

/// The period of the copy alignment that the padding matches (see the module
/// docs); a pad marker can move a string to any offset within it.
const ALIGN: usize = 4096;
const _: () = assert!(ALIGN - 1 == codec::PAD_MAX && codec::LARGE <= CHUNK);

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
    fn spill(&mut self) -> Result<&mut File, PayloadError> {
        let fd = sys::memfd_create(self.name).map_err(PayloadError::Sys)?;
        let mut file = File::from(fd);
        write_out(&mut file, &self.buf)?;
        self.flushed += self.buf.len() as u64;
        self.buf.clear();
        Ok(self.memfd.insert(file))
    }

    /// Length of the payload so far: flushed, buffered and to be forwarded.
    fn written(&self) -> u64 {
        let forwarded = self.forward.as_ref().map_or(0, |f| f.bytes.range.len());
        self.flushed + self.buf.len() as u64 + forwarded as u64
    }

    /// The padding for a large string of `bytes`, whose marker comes next
    /// (see the module docs): none if the payload stays inline or the string
    /// will be copied into the chunk buffer; the source's, if it is a mapped
    /// `Blob` that may be forwarded; otherwise what aligns it with its source,
    /// unless that would take the payload past the limit.
    fn pad_for(&self, bytes: &[u8]) -> usize {
        // Where the string would start with no padding.
        let at = self.written() + 2;
        let end = at.saturating_add(bytes.len() as u64);
        if self.memfd.is_none() && self.forward.is_none() && end <= self.inline_max as u64 {
            return 0;
        }
        if let Some(pad) = self.source_pad(bytes) {
            return pad;
        }
        if bytes.len() < CHUNK {
            return 0;
        }
        let pad = (bytes.as_ptr() as usize).wrapping_sub(at as usize) % ALIGN;
        if end.saturating_add(pad as u64) > self.limit {
            return 0;
        }
        pad
    }

    /// The padding that makes what is buffered, then a marker and the
    /// padding, the bytes before `bytes` in the memfd they are in, if they
    /// are a mapped `Blob`'s and might be forwarded (see `forwarding`).
    fn source_pad(&self, bytes: &[u8]) -> Option<usize> {
        if self.memfd.is_some() || self.forward.is_some() {
            return None;
        }
        let offer = blob::offered(bytes).filter(|o| o.range.end == o.map.len())?;
        let before = &offer.map[..offer.range.start];
        // The zeros just before the bytes: the padding is all of them, or all
        // but the marker's high byte, or none (its marker then among them).
        let zeros = before
            .iter()
            .rev()
            .take(codec::PAD_MAX + 2)
            .take_while(|&&b| b == 0)
            .count();
        [zeros, zeros.saturating_sub(1), 0]
            .into_iter()
            .find(|&pad| {
                let Some(marker_at) = before.len().checked_sub(pad + 2) else {
                    return false;
                };
                let marker = &before[marker_at..marker_at + 2];
                let head = marker_at.checked_sub(self.buf.len());
                pad <= codec::PAD_MAX
                    && marker == (pad as u16).to_le_bytes()
                    && head.is_some_and(|h| before[h..marker_at] == self.buf[..])
            })
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
        let len = self.written().saturating_add(data.len() as u64);
        if len > self.limit {
            return Err(PayloadError::OverLimit(self.limit));
        }
        if let Some(forward) = self.forward.take() {
            // More follows the forwarded bytes, so they are not the tail of
            // this payload after all: copy them, as if never offered.
            let bytes = forward.bytes.bytes();
            let file = self.spill()?;
            write_out(file, bytes)?;
            self.flushed += bytes.len() as u64;
        }
        if self.memfd.is_none() && self.buf.len() + data.len() > self.inline_max {
            if let Some(forward) = self.forwarding(data) {
                self.forward = Some(forward);
                self.fast_until = 0;
                return Ok(());
            }
            self.spill()?;
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

    fn extend_large(&mut self, bytes: &[u8]) -> Result<(), ()> {
        let pad = self.pad_for(bytes);
        let marker = (pad as u16).to_le_bytes();
        let room = self.limit.saturating_sub(self.written());
        if self.memfd.is_none() && self.forward.is_none() && (2 + pad) as u64 <= room {
            // Still in memory: the string itself decides whether the payload
            // spills, and whether it is forwarded, not its padding.
            self.buf.extend_from_slice(&marker);
            self.buf.extend_from_slice(codec::zeros(pad));
        } else {
            self.extend(&marker)?;
            self.extend(codec::zeros(pad))?;
        }
        self.extend(bytes)
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

            // A large one in one piece may be padded, but decodes the same.
            let buf = serde_bytes::ByteBuf::from(value);
            let payload = Payload::encode(&buf, "test", 64, u64::MAX).unwrap();
            assert_eq!(
                decoded::<serde_bytes::ByteBuf>(&payload),
                buf,
                "bytes len {len}"
            );
        }
    }

    /// `payload` decoded as the receiver decodes it.
    fn decoded<T: serde::de::DeserializeOwned>(payload: &Payload) -> T {
        match payload {
            Payload::Inline(b) => crate::codec::decode(b, usize::MAX).unwrap(),
            Payload::Sealed { fd, len } => {
                let sealed = SealedBytes::open(fd.as_fd(), *len, u64::MAX).unwrap();
                crate::blob::decoding_from(&sealed, || {
                    crate::codec::decode(sealed.bytes(), usize::MAX)
                })
                .unwrap()
            }
        }
    }

    #[test]
    fn every_large_byte_string_lands_aligned_with_its_source() {
        let mut source = memmap2::MmapMut::map_anon(1 << 20).unwrap();
        source
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        // Each starts at a different offset within its page (the mapping's
        // are aligned), and each length prefix shifts the ones after it.
        let parts: Vec<&[u8]> = [(0, 200_000), (100, 150_000), (4000, 100_000), (1, 120_000)]
            .iter()
            .scan(0usize, |at, &(skew, len)| {
                let start = at.next_multiple_of(ALIGN) + skew;
                *at = start + len;
                Some(&source[start..start + len])
            })
            .collect();
        let text = String::from_utf8(vec![b'x'; 100_000]).unwrap();
        let value = (
            5u8,
            parts
                .iter()
                .map(|p| serde_bytes::Bytes::new(p))
                .collect::<Vec<_>>(),
            "between",
            Some(crate::Blob::from_static(b"")),
            &text,
        );
        // Spilling at once, or after an inline room the size of a slot.
        for inline_max in [64, 60_000] {
            let payload = Payload::encode(&value, "test", inline_max, u64::MAX).unwrap();
            let Payload::Sealed { fd, len } = &payload else {
                panic!("a large value spills")
            };
            assert_eq!(
                rustix::fs::fstat(&**fd).unwrap().st_size as u64,
                *len,
                "no room before the payload"
            );
            // Decoded as the receiver does, each Blob points into the
            // mapping, which starts at the memfd's first byte.
            let sealed = SealedBytes::open(fd.as_fd(), *len, u64::MAX).unwrap();
            let (n, blobs, between, empty, last): (u8, Vec<Blob>, String, Option<Blob>, Blob) =
                crate::blob::decoding_from(&sealed, || {
                    crate::codec::decode(sealed.bytes(), usize::MAX)
                })
                .unwrap();
            assert_eq!(
                (n, between.as_str(), empty),
                (5, "between", Some(Blob::new()))
            );
            assert_eq!(blobs.len(), parts.len());
            let base = sealed.mapping().expect("mapped").as_ptr() as usize;
            let sources = parts.iter().copied().chain([text.as_bytes()]);
            for (i, (blob, source)) in blobs.iter().chain([&last]).zip(sources).enumerate() {
                assert!(blob.is_mapped(), "string {i}");
                assert_eq!(blob, source, "string {i}");
                let offset = blob.as_ptr() as usize - base;
                assert_eq!(
                    offset % ALIGN,
                    source.as_ptr() as usize % ALIGN,
                    "string {i} at file offset {offset}, inline_max {inline_max}"
                );
            }
        }
        // Many small writes: no padding.
        let value: Vec<u16> = (0..50_000).collect();
        let payload = Payload::encode(&value, "test", 64, u64::MAX).unwrap();
        assert_eq!(bytes(&payload), crate::codec::encode(&value).unwrap());
    }

    #[test]
    fn padding_never_takes_a_payload_past_the_limit() {
        let value = serde_bytes::ByteBuf::from(vec![3u8; 200_000]);
        let unpadded = crate::codec::encode(&value).unwrap().len() as u64;
        for limit in [unpadded, unpadded + 1, unpadded + 4095] {
            let payload = Payload::encode(&value, "test", 64, limit).unwrap();
            assert!(payload.len() <= limit, "limit {limit}");
            assert_eq!(decoded::<serde_bytes::ByteBuf>(&payload), value);
        }
        assert!(matches!(
            Payload::encode(&value, "test", 64, unpadded - 1),
            Err(PayloadError::OverLimit(_))
        ));
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

    /// Encodes `value`, which must spill, checks that it decodes unchanged,
    /// and returns the memfd's inode.
    fn spilled_inode<T>(value: &T) -> u64
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let payload = Payload::encode(value, "test", 64, u64::MAX).unwrap();
        let Payload::Sealed { fd, .. } = &payload else {
            panic!("a large value spills")
        };
        let ino = inode(fd.as_fd());
        assert_eq!(&decoded::<T>(&payload), value);
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
        // As a worker's writer leaves it: the Blob aligned by its own pad.
        for skip in [0, 1, 100, 4000] {
            let sent =
                Payload::encode(&(9u8, pattern(300_000).slice(skip..)), "test", 64, u64::MAX)
                    .unwrap();
            let Payload::Sealed { fd, .. } = &sent else {
                panic!("a large value spills")
            };
            let ino = inode(fd.as_fd());
            let value: (u8, Blob) = decoded(&sent);
            assert!(value.1.is_mapped());
            assert_eq!(spilled_inode(&value), ino, "skip {skip}");
        }
        // Whatever pad the source chose, the writer finds it.
        for k in [0, 1, 2, 255, 256, 257, 258, 4094, 4095] {
            let (tuple, ino) = received_with(&(7u32, pattern(100_000)), 3, k);
            assert_eq!(spilled_inode(&tuple), ino, "pad {k}");
        }
    }

    /// As [`received`], with every large string padded by `k` bytes.
    fn received_with<T: serde::Serialize + serde::de::DeserializeOwned>(
        value: &T,
        lead: usize,
        k: usize,
    ) -> (T, u64) {
        let mut sink = codec::VecSink::padded(vec![0u8; lead], vec![k]);
        crate::codec::encode_to(value, &mut sink).unwrap();
        let fd = shm::sealed_copy(&sink.bytes).unwrap();
        let len = (sink.bytes.len() - lead) as u64;
        let sealed = SealedBytes::open(fd.as_fd(), len, u64::MAX).unwrap();
        let value = crate::blob::decoding_from(&sealed, || {
            crate::codec::decode(sealed.bytes(), usize::MAX)
        })
        .unwrap();
        (value, inode(fd.as_fd()))
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
