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

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::budget::{Bounded, Budget};

/// Encodes `value` into a `Vec`; the error is the codec's message. The crate
/// itself streams with [`encode_to`]; this is for the fuzz targets and tests.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| e.to_string())
}

/// Where [`encode_to`] puts bytes as the encoder produces them. A refusal
/// (`Err`) stops the encoding; the sink keeps its own reason.
pub(crate) trait ByteSink {
    /// One byte; postcard writes most varints and every `u8` of a plain
    /// `Vec<u8>` this way, so it must be cheap.
    fn push(&mut self, byte: u8) -> Result<(), ()>;
    /// A run of bytes: a string, or a serde byte string in one piece.
    fn extend(&mut self, bytes: &[u8]) -> Result<(), ()>;
}

/// Encodes `value` into `sink` as it goes, without building it in memory
/// first; the error is the codec's message.
pub(crate) fn encode_to<T: Serialize + ?Sized, S: ByteSink>(
    value: &T,
    sink: &mut S,
) -> Result<(), String> {
    postcard::serialize_with_flavor(value, Flavor(sink)).map_err(|e| e.to_string())
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
    let mut de = postcard::Deserializer::from_bytes(bytes);
    let value = T::deserialize(Bounded {
        inner: &mut de,
        budget: &budget,
    })
    .map_err(|e| {
        if budget.refused() {
            format!(
                "more sequence or map elements than {} input bytes can hold",
                bytes.len()
            )
        } else {
            e.to_string()
        }
    })?;
    match de.finalize() {
        Ok([]) => Ok(value),
        Ok(rest) => Err(format!("{} trailing bytes after the value", rest.len())),
        Err(e) => Err(e.to_string()),
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
}
