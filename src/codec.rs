//! The serde codec seam: arguments and results are encoded here and nowhere
//! else, so the format can change in one place.
//!
//! The codec is [postcard](https://docs.rs/postcard): maintained, compact,
//! serde-native, and what servo's ipc-channel moved to when bincode was
//! abandoned (RUSTSEC-2025-0141). `benches/codec.rs` measures it against
//! bitcode, MessagePack and CBOR. It is the fastest or within 10% of it for
//! small values and byte strings, and only bitcode beats it, on large numeric
//! arrays (about 3x), and bitcode's serde mode offers neither thing this
//! module needs: a serializer over any byte sink (to stream into a memfd) and
//! a deserializer over a slice that can be wrapped (to bound the element
//! count). Decoding always runs with a size limit on its input, and refuses
//! trailing bytes, so a truncated or padded buffer is an error rather than a
//! silently different value.
//!
//! # The format
//!
//! postcard's, with one addition: every string or byte string of at least
//! [`LARGE`] bytes has a *pad marker* between its varint length and its
//! bytes, a little-endian `u16` `k` of at most [`PAD_MAX`] followed by `k`
//! zero bytes:
//!
//! ```text
//! varint(len)  [k as u16 LE, 0 x k]  bytes        (the marker only if len >= LARGE)
//! ```
//!
//! The marker lets the payload writer put each large string wherever suits
//! the copy into its memfd (see `payload`); a decoder accepts any `k` up to
//! [`PAD_MAX`] and skips it. Encoding into a `Vec` (`encode`) writes
//! `k = 0`. The encoder is postcard's serializer wrapped so that it writes
//! large strings itself (`codec/ser.rs`), the decoder postcard's deserializer
//! over an input flavor that checks and skips the markers (`codec/de.rs`).
//! Shorter strings, and everything else, are exactly postcard's, so a value
//! without large strings encodes as postcard alone encodes it.
//!
//! "String" means what serde's `serialize_str`, `serialize_bytes` and
//! `collect_str` write (a `String`, a `Blob`, a `serde_bytes` buffer), not a
//! sequence of `u8` such as a plain `Vec<u8>`. postcard alone encodes those
//! two alike, so a value written as one could be read as the other; here
//! that holds only below [`LARGE`]. Both ends of a task use the same types,
//! so this only matters to a type whose `Serialize` and `Deserialize`
//! disagree on which of the two it is.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::budget::{Bounded, Budget};

mod de;
mod ser;

/// Strings of at least this many bytes carry a pad marker. A page: the
/// kernel's copy of anything shorter is too brief for its alignment to
/// matter, and the marker's two bytes (and any padding) would cost more in
/// proportion. The payload writer in fact pads only the strings it writes
/// straight from where they are, which are longer still (its chunk size),
/// but the format leaves that choice to the writer, and keeps the marker
/// within reach of the fuzz targets, whose inputs are at most 64 KiB.
pub(crate) const LARGE: usize = 4096;

/// The most padding a pad marker may claim: enough to move a string to any
/// offset within a 4 KiB page.
pub(crate) const PAD_MAX: usize = 4095;

static ZEROS: [u8; PAD_MAX] = [0; PAD_MAX];

/// `k` bytes of padding, for a marker of `k` (at most [`PAD_MAX`]).
pub(crate) fn zeros(k: usize) -> &'static [u8] {
    &ZEROS[..k.min(PAD_MAX)]
}

/// Encodes `value` into a `Vec`, with no padding; the error is the codec's
/// message. The crate itself streams with [`encode_to`]; this is for the fuzz
/// targets and tests.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut sink = VecSink::padded(Vec::new(), vec![0]);
    encode_to(value, &mut sink)?;
    Ok(sink.bytes)
}

/// Where [`encode_to`] puts bytes as the encoder produces them. A refusal
/// (`Err`) stops the encoding; the sink keeps its own reason.
pub(crate) trait ByteSink {
    /// One byte; postcard writes most varints and every `u8` of a plain
    /// `Vec<u8>` this way, so it must be cheap.
    fn push(&mut self, byte: u8) -> Result<(), ()>;
    /// A run of bytes: a string, or a serde byte string in one piece.
    fn extend(&mut self, bytes: &[u8]) -> Result<(), ()>;
    /// The bytes of a string of at least [`LARGE`] bytes, after its length:
    /// a pad marker of the sink's choice, then `bytes`. By default no
    /// padding.
    fn extend_large(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.extend(&[0, 0])?;
        self.extend(bytes)
    }
}

/// The sink of [`encode`], and of tests that choose each large string's
/// padding: after `bytes`, it pads the large strings by `pads` in turn.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) struct VecSink {
    pub(crate) bytes: Vec<u8>,
    pads: std::iter::Cycle<std::vec::IntoIter<usize>>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl VecSink {
    /// `pads` must not be empty; each is at most [`PAD_MAX`].
    pub(crate) fn padded(bytes: Vec<u8>, pads: Vec<usize>) -> VecSink {
        VecSink {
            bytes,
            pads: pads.into_iter().cycle(),
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl ByteSink for VecSink {
    fn push(&mut self, byte: u8) -> Result<(), ()> {
        self.bytes.push(byte);
        Ok(())
    }

    fn extend(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn extend_large(&mut self, bytes: &[u8]) -> Result<(), ()> {
        let k = self.pads.next().unwrap_or(0);
        debug_assert!(k <= PAD_MAX, "a pad marker of {k}");
        self.bytes.extend_from_slice(&(k as u16).to_le_bytes());
        self.bytes.extend_from_slice(zeros(k));
        self.extend(bytes)
    }
}

/// Encodes `value` into `sink` as it goes, without building it in memory
/// first; the error is the codec's message.
pub(crate) fn encode_to<T: Serialize + ?Sized, S: ByteSink>(
    value: &T,
    sink: &mut S,
) -> Result<(), String> {
    ser::serialize(value, Flavor(sink)).map_err(|e| e.to_string())
}

/// Adapts a [`ByteSink`] to postcard's output trait.
struct Flavor<'a, S>(&'a mut S);

impl<S: ByteSink> postcard::ser_flavors::Flavor for Flavor<'_, S> {
    type Output = ();

    #[inline]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0
            .push(byte)
            .map_err(|()| postcard::Error::SerializeBufferFull)
    }

    #[inline]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0
            .extend(bytes)
            .map_err(|()| postcard::Error::SerializeBufferFull)
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

impl<S: ByteSink> ser::Large for Flavor<'_, S> {
    fn try_extend_large(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0
            .extend_large(bytes)
            .map_err(|()| postcard::Error::SerializeBufferFull)
    }
}

/// Decodes a `T` from exactly `bytes`, refusing inputs longer than `limit`.
///
/// postcard allocates no more than the input could describe: sequence lengths
/// are only a hint capped by serde, and every element that is not zero-sized
/// consumes input. Zero-sized elements are counted by [`Bounded`] instead, so
/// a claimed `Vec<()>` of 2^62 elements fails in about a millisecond.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, String> {
    if bytes.len() > limit {
        return Err(format!(
            "{} bytes exceed the decode limit of {limit}",
            bytes.len()
        ));
    }
    let budget = Budget::for_input(bytes.len());
    let mut de = postcard::Deserializer::from_flavor(de::Unpad::new(bytes));
    let value = T::deserialize(Bounded {
        inner: &mut de,
        budget: &budget,
    });
    let rest = de.finalize().map_err(|e| e.to_string())?;
    match value {
        Err(_) if budget.refused() => Err(format!(
            "more sequence or map elements than {} input bytes can hold",
            bytes.len()
        )),
        Err(e) => Err(rest
            .bad
            .map_or_else(|| e.to_string(), |bad| bad.to_string())),
        Ok(_) if !rest.bytes.is_empty() => Err(format!(
            "{} trailing bytes after the value",
            rest.bytes.len()
        )),
        Ok(value) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_trailing_bytes_refused() {
        let bytes = encode(&(1u64, "two".to_string())).unwrap();
        assert_eq!(
            decode::<(u64, String)>(&bytes, 100).unwrap(),
            (1, "two".into())
        );
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(decode::<(u64, String)>(&padded, 100).is_err());
        assert!(decode::<(u64, String)>(&bytes, 2).is_err());
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a million budget charges: hours under Miri
    fn huge_claimed_length_of_zero_sized_elements_fails_fast() {
        // 2^62 units, in nine bytes: each consumes no input, so only the
        // element budget stops the loop (without it this test never ends).
        let bytes = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40];
        let err = decode::<Vec<()>>(&bytes, 100).unwrap_err();
        assert!(err.contains("elements"), "{err}");
        // Nested, so that the outer elements do consume input.
        let mut nested = vec![0xe8, 0x07]; // 1000 inner vectors
        for _ in 0..1000 {
            nested.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40]);
        }
        assert!(decode::<Vec<Vec<()>>>(&nested, 1 << 20).is_err());
        // Legitimate values with zero-sized elements still decode.
        let units = vec![(); 100_000];
        assert_eq!(
            decode::<Vec<()>>(&encode(&units).unwrap(), 100).unwrap(),
            units
        );
    }

    #[test]
    fn every_serde_shape_decodes_as_postcard_alone_does() {
        use std::collections::BTreeMap;
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        enum Shape {
            Unit,
            Newtype(Option<String>),
            Tuple(i128, u128, char),
            Struct {
                map: BTreeMap<u8, Vec<f64>>,
                bytes: serde_bytes::ByteBuf,
            },
        }
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Wrapper(Vec<Shape>, (), Option<Box<Wrapper>>);
        let value = Wrapper(
            vec![
                Shape::Unit,
                Shape::Newtype(Some("x".into())),
                Shape::Newtype(None),
                Shape::Tuple(-1, u128::MAX, 'λ'),
                Shape::Struct {
                    map: [(1, vec![0.5, -2.0]), (9, vec![])].into(),
                    bytes: serde_bytes::ByteBuf::from(vec![0, 255]),
                },
            ],
            (),
            Some(Box::new(Wrapper(vec![], (), None))),
        );
        let bytes = encode(&value).unwrap();
        assert_eq!(decode::<Wrapper>(&bytes, 1 << 20).unwrap(), value);
        assert_eq!(postcard::from_bytes::<Wrapper>(&bytes).unwrap(), value);
    }

    #[test]
    fn huge_claimed_length_does_not_allocate_it() {
        // A varint length of 2^62 followed by nothing: must fail, not OOM.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
        assert!(decode::<Vec<u64>>(&bytes, 100).is_err());
    }

    /// A string of `len` bytes that differ from one another.
    fn text(len: usize, seed: u8) -> String {
        (0..len)
            .map(|i| char::from(b'a' + ((i + usize::from(seed)) % 26) as u8))
            .collect()
    }

    fn padded<T: Serialize>(value: &T, pads: Vec<usize>) -> Vec<u8> {
        let mut sink = VecSink::padded(Vec::new(), pads);
        encode_to(value, &mut sink).unwrap();
        sink.bytes
    }

    /// `Display`ed in fragments of one to seven bytes.
    struct Fragmented(usize);

    impl std::fmt::Display for Fragmented {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let mut left = self.0;
            let mut i = 0;
            while left > 0 {
                let n = (i % 7 + 1).min(left);
                f.write_str(&"0123456"[..n])?;
                left -= n;
                i += 1;
            }
            Ok(())
        }
    }

    impl Serialize for Fragmented {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(self)
        }
    }

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug, Clone)]
    enum Nested {
        Leaf(#[serde(with = "serde_bytes")] Vec<u8>),
        Text { name: String, more: Option<String> },
        Pair(String, Box<Nested>),
        Map(std::collections::BTreeMap<String, serde_bytes::ByteBuf>),
    }

    fn nested() -> impl proptest::strategy::Strategy<Value = Nested> {
        use proptest::prelude::*;
        // Lengths around LARGE, where the marker starts, and well past it.
        let len = prop_oneof![0usize..16, LARGE - 2..LARGE + 2, LARGE..3 * LARGE];
        let leaf = prop_oneof![
            (len.clone(), any::<u8>()).prop_map(|(n, b)| Nested::Leaf(vec![b; n])),
            (len.clone(), proptest::option::of(len.clone()), any::<u8>()).prop_map(
                |(n, m, seed)| Nested::Text {
                    name: text(n, seed),
                    more: m.map(|m| text(m, seed.wrapping_add(1))),
                }
            ),
        ];
        leaf.prop_recursive(3, 12, 3, move |inner| {
            prop_oneof![
                (len.clone(), inner.clone()).prop_map(|(n, v)| Nested::Pair(text(n, 3), v.into())),
                proptest::collection::vec((len.clone(), len.clone()), 0..3).prop_map(|kv| {
                    Nested::Map(
                        kv.into_iter()
                            .enumerate()
                            .map(|(i, (k, v))| {
                                (
                                    text(k, i as u8),
                                    serde_bytes::ByteBuf::from(vec![i as u8; v]),
                                )
                            })
                            .collect(),
                    )
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever padding the writer chose for each large string, nested
        /// however deep, the value decodes unchanged; and with no padding the
        /// encoding differs from postcard's only by the markers.
        #[test]
        fn every_shape_with_large_strings_round_trips_whatever_the_padding(
            value in proptest::collection::vec(nested(), 1..4),
            pads in proptest::collection::vec(0usize..=PAD_MAX, 1..5),
        ) {
            let plain = encode(&value).unwrap();
            proptest::prop_assert_eq!(&decode::<Vec<Nested>>(&plain, usize::MAX).unwrap(), &value);
            let bytes = padded(&value, pads);
            proptest::prop_assert_eq!(decode::<Vec<Nested>>(&bytes, usize::MAX).unwrap(), value.clone());
            let markers = plain.len() - postcard::to_stdvec(&value).unwrap().len();
            proptest::prop_assert_eq!(markers % 2, 0);
            if markers == 0 {
                proptest::prop_assert_eq!(postcard::from_bytes::<Vec<Nested>>(&plain).unwrap(), value);
            }
        }
    }

    #[test]
    fn a_large_string_has_a_marker_and_a_short_one_none() {
        for len in [0, 1, LARGE - 1, LARGE, 100_000] {
            let value = text(len, 0);
            let bytes = encode(&value).unwrap();
            let postcard = postcard::to_stdvec(&value).unwrap();
            let head = postcard.len() - len;
            if len < LARGE {
                assert_eq!(bytes, postcard, "len {len}");
            } else {
                assert_eq!(bytes[..head], postcard[..head], "len {len}");
                assert_eq!(bytes[head..head + 2], [0, 0], "len {len}");
                assert_eq!(bytes[head + 2..], postcard[head..], "len {len}");
            }
            let bytes = serde_bytes::ByteBuf::from(value.clone().into_bytes());
            assert_eq!(encode(&bytes).unwrap(), encode(&value).unwrap());
        }
    }

    #[test]
    fn a_large_collect_str_written_in_fragments_round_trips() {
        for len in [0, 5, LARGE - 1, LARGE, 3 * LARGE + 5] {
            let value = (Fragmented(len), 7u8, Some(Fragmented(len + 1)));
            let bytes = encode(&value).unwrap();
            let (a, n, b) = decode::<(String, u8, Option<String>)>(&bytes, usize::MAX).unwrap();
            assert_eq!(a, Fragmented(len).to_string());
            assert_eq!((n, b), (7, Some(Fragmented(len + 1).to_string())));
            // Only the two-byte markers of the large strings added to postcard's.
            let markers = [len, len + 1].iter().filter(|&&l| l >= LARGE).count();
            let postcard = postcard::to_stdvec(&value).unwrap();
            assert_eq!(bytes.len(), postcard.len() + 2 * markers, "len {len}");
        }
    }

    #[test]
    fn a_display_whose_length_changes_is_refused() {
        use std::cell::RefCell;
        /// Displayed as many bytes as it pops from its list each time.
        struct Changing(RefCell<Vec<usize>>);
        impl std::fmt::Display for Changing {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let len = self.0.borrow_mut().pop().unwrap_or(0);
                write!(f, "{}", "x".repeat(len))
            }
        }
        impl Serialize for Changing {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        // Counted first, written second (the list pops from the end).
        for (written, counted) in [(LARGE + 1, LARGE), (LARGE, LARGE + 1), (3, 2), (2, 3)] {
            let value = Changing(RefCell::new(vec![written, counted]));
            assert!(encode(&value).is_err(), "{counted} then {written}");
        }
        let same = Changing(RefCell::new(vec![LARGE, LARGE]));
        assert_eq!(
            decode::<String>(&encode(&same).unwrap(), usize::MAX).unwrap(),
            "x".repeat(LARGE)
        );
    }

    #[test]
    fn a_hostile_pad_marker_is_an_error_not_a_panic() {
        let value = serde_bytes::ByteBuf::from(vec![7u8; LARGE]);
        let good = padded(&value, vec![3]);
        let head = good.len() - LARGE - 5; // the varint length
        assert_eq!(
            decode::<serde_bytes::ByteBuf>(&good, usize::MAX).unwrap(),
            value
        );
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            edit(&mut bytes);
            decode::<serde_bytes::ByteBuf>(&bytes, usize::MAX).unwrap_err()
        };
        let too_long = with(&|b| b[head..head + 2].copy_from_slice(&4096u16.to_le_bytes()));
        assert!(
            too_long.contains("4096") && too_long.contains("more than 4095"),
            "{too_long}"
        );
        let max = with(&|b| b[head..head + 2].copy_from_slice(&u16::MAX.to_le_bytes()));
        assert!(max.contains("65535"), "{max}");
        let not_zero = with(&|b| b[head + 3] = 1);
        assert!(not_zero.contains("not all zeros"), "{not_zero}");
        for cut in [head, head + 1, head + 2, head + 4] {
            let truncated = decode::<serde_bytes::ByteBuf>(&good[..cut], usize::MAX).unwrap_err();
            assert!(truncated.contains("ends inside"), "cut {cut}: {truncated}");
        }
        // The marker claims more padding than is left, then the bytes.
        let past = with(&|b| b[head..head + 2].copy_from_slice(&4000u16.to_le_bytes()));
        assert!(!past.is_empty());
        // Cut in the string's bytes: postcard's own error.
        assert!(decode::<serde_bytes::ByteBuf>(&good[..good.len() - 1], usize::MAX).is_err());
        // A string's length that leaves no room for a marker at all.
        let mut short = encode(&(LARGE as u64)).unwrap();
        short.push(0);
        assert!(decode::<String>(&short, usize::MAX).is_err());
    }
}
