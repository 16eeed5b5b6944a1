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

/// Encodes `value`; the error is the codec's message.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| e.to_string())
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
