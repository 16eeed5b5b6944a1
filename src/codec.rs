//! The serde codec seam: arguments and results are encoded here and nowhere
//! else, so the format can change in one place.
//!
//! The codec is [postcard](https://docs.rs/postcard): maintained, compact,
//! serde-native, and what servo's ipc-channel moved to when bincode was
//! abandoned (RUSTSEC-2025-0141). Decoding always runs with a size limit on
//! its input, and refuses trailing bytes, so a truncated or padded buffer is an
//! error rather than a silently different value.

use serde::Serialize;
use serde::de::DeserializeOwned;

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
/// are only a hint capped by serde, and every element consumes input.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, String> {
    if bytes.len() > limit {
        return Err(format!(
            "{} bytes exceed the decode limit of {limit}",
            bytes.len()
        ));
    }
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} trailing bytes after the value", rest.len())),
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
    fn huge_claimed_length_does_not_allocate_it() {
        // A varint length of 2^62 followed by nothing: must fail, not OOM.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
        assert!(decode::<Vec<u64>>(&bytes, 100).is_err());
    }
}
