//! The decoding side of the pad marker (see the `codec` module docs): a
//! postcard input flavor over a slice that, before handing out the bytes of a
//! string of at least [`LARGE`] bytes, checks and skips the marker in front of
//! them.
//!
//! postcard asks its flavor for a run of bytes only for strings (and for the
//! four or eight bytes of a float, and the at most four of a `char`, all far
//! below [`LARGE`]), so every run of [`LARGE`] bytes or more is a string
//! whose marker comes first. The input is another process's: a marker that
//! is too long, not zeros, or cut short is an error (kept for the message,
//! since postcard's error type cannot carry it), never a panic or a read past
//! the end. Postcard's own `Slice` flavor walks raw
//! pointers; this one only calls slice methods.

use std::fmt;

use postcard::Error;
use postcard::de_flavors::Flavor;

use super::{LARGE, PAD_MAX};

/// The input left to decode.
pub(super) struct Unpad<'de> {
    rest: &'de [u8],
    bad: Option<BadPad>,
}

/// What [`Unpad`] leaves: the bytes after the value, and why a marker was
/// refused, if one was.
pub(super) struct Rest<'de> {
    pub(super) bytes: &'de [u8],
    pub(super) bad: Option<BadPad>,
}

/// Why a pad marker was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BadPad {
    /// It claims more than [`PAD_MAX`] bytes of padding (given).
    TooLong(usize),
    /// Some of its padding is not zero.
    NotZero,
    /// The input ends inside it.
    Truncated,
}

impl fmt::Display for BadPad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadPad::TooLong(k) => write!(
                f,
                "a large string's pad marker claims {k} bytes of padding, more than {PAD_MAX}"
            ),
            BadPad::NotZero => f.write_str("a large string's padding is not all zeros"),
            BadPad::Truncated => f.write_str("the input ends inside a large string's pad marker"),
        }
    }
}

impl<'de> Unpad<'de> {
    pub(super) fn new(input: &'de [u8]) -> Unpad<'de> {
        Unpad {
            rest: input,
            bad: None,
        }
    }

    /// Checks and skips the pad marker at the start of `rest`.
    fn skip_pad(&mut self) -> Result<(), BadPad> {
        let (marker, after) = self
            .rest
            .split_first_chunk::<2>()
            .ok_or(BadPad::Truncated)?;
        let k = usize::from(u16::from_le_bytes(*marker));
        if k > PAD_MAX {
            return Err(BadPad::TooLong(k));
        }
        let (pad, after) = after.split_at_checked(k).ok_or(BadPad::Truncated)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(BadPad::NotZero);
        }
        self.rest = after;
        Ok(())
    }
}

impl<'de> Flavor<'de> for Unpad<'de> {
    type Remainder = Rest<'de>;
    type Source = &'de [u8];

    #[inline]
    fn pop(&mut self) -> postcard::Result<u8> {
        let (&byte, rest) = self
            .rest
            .split_first()
            .ok_or(Error::DeserializeUnexpectedEnd)?;
        self.rest = rest;
        Ok(byte)
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        Some(self.rest.len())
    }

    #[inline]
    fn try_take_n(&mut self, ct: usize) -> postcard::Result<&'de [u8]> {
        if ct >= LARGE {
            if let Err(bad) = self.skip_pad() {
                self.bad = Some(bad);
                return Err(Error::DeserializeBadEncoding);
            }
        }
        let (taken, rest) = self
            .rest
            .split_at_checked(ct)
            .ok_or(Error::DeserializeUnexpectedEnd)?;
        self.rest = rest;
        Ok(taken)
    }

    fn finalize(self) -> postcard::Result<Rest<'de>> {
        Ok(Rest {
            bytes: self.rest,
            bad: self.bad,
        })
    }
}
