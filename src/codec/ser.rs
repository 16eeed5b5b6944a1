//! The encoding side of the pad marker (see the `codec` module docs): a serde
//! `Serializer` that is postcard's, except that it writes every string of at
//! least [`LARGE`] bytes itself, with the marker between its length and its
//! bytes.
//!
//! It wraps postcard's serializer the way `serde_ignored` wraps a
//! deserializer: every call is forwarded unchanged, and every compound
//! (sequence, tuple, map, struct, variant) is wrapped too, so that the values
//! inside it come back through [`Padded`]. Only `serialize_str`,
//! `serialize_bytes` and `collect_str` differ. A string postcard's
//! `collect_str` would write is formatted in many fragments, so the flavor
//! could not tell where a large one starts; here the string is in one piece
//! when it reaches [`Large::try_extend_large`], which chooses the padding.

use std::fmt::{self, Display, Write};

use postcard::ser_flavors::Flavor;
use postcard::{Error, Serializer};
use serde::Serialize;
use serde::ser::{self, Serializer as _};

use super::LARGE;

/// A postcard output that also takes large strings whole.
pub(super) trait Large: Flavor {
    /// The bytes of a string of at least [`LARGE`] bytes, after its length:
    /// writes a pad marker of the flavor's choice, then `bytes`.
    fn try_extend_large(&mut self, bytes: &[u8]) -> postcard::Result<()>;
}

/// Encodes `value` into `flavor` in the crate's format.
pub(super) fn serialize<T: Serialize + ?Sized, F: Large>(
    value: &T,
    flavor: F,
) -> postcard::Result<F::Output> {
    let mut serializer = Serializer { output: flavor };
    value.serialize(Padded(&mut serializer))?;
    serializer
        .output
        .finalize()
        .map_err(|_| Error::SerializeBufferFull)
}

/// postcard's serializer, writing large strings with a pad marker.
struct Padded<'a, F: Flavor>(&'a mut Serializer<F>);

/// A compound postcard started, whose elements go through [`Padded`].
struct Compound<'a, F: Flavor>(&'a mut Serializer<F>);

impl<'a, F: Large> Padded<'a, F> {
    /// The length, then (for a large string) the marker and the bytes.
    fn string(self, bytes: &[u8]) -> postcard::Result<()> {
        // postcard writes a length as a varint `usize`; a varint's bytes
        // depend on the value only, so a `u64` of it is the same bytes.
        self.0.serialize_u64(bytes.len() as u64)?;
        if bytes.len() >= LARGE {
            self.0.output.try_extend_large(bytes)
        } else {
            self.0
                .output
                .try_extend(bytes)
                .map_err(|_| Error::SerializeBufferFull)
        }
    }
}

/// Forwards scalar methods to postcard's serializer unchanged.
macro_rules! forward {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        #[inline]
        fn $method(self, v: $ty) -> postcard::Result<()> {
            self.0.$method(v)
        }
    )*};
}

impl<'a, F: Large> ser::Serializer for Padded<'a, F> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Compound<'a, F>;
    type SerializeTuple = Compound<'a, F>;
    type SerializeTupleStruct = Compound<'a, F>;
    type SerializeTupleVariant = Compound<'a, F>;
    type SerializeMap = Compound<'a, F>;
    type SerializeStruct = Compound<'a, F>;
    type SerializeStructVariant = Compound<'a, F>;

    fn is_human_readable(&self) -> bool {
        false
    }

    forward!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_unit_struct(&'static str),
    );

    fn serialize_str(self, v: &str) -> postcard::Result<()> {
        self.string(v.as_bytes())
    }

    fn serialize_bytes(self, v: &[u8]) -> postcard::Result<()> {
        self.string(v)
    }

    fn serialize_none(self) -> postcard::Result<()> {
        self.0.serialize_none()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> postcard::Result<()> {
        self.0.serialize_u8(1)?;
        value.serialize(self)
    }

    fn serialize_unit(self) -> postcard::Result<()> {
        self.0.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        variant_index: u32,
        variant: &'static str,
    ) -> postcard::Result<()> {
        self.0.serialize_unit_variant(name, variant_index, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> postcard::Result<()> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
        value: &T,
    ) -> postcard::Result<()> {
        // postcard writes the variant index as a varint u32, then the value.
        self.0.serialize_u32(variant_index)?;
        value.serialize(self)
    }

    fn serialize_seq(self, len: Option<usize>) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_seq(len)?))
    }

    fn serialize_tuple(self, len: usize) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_tuple(len)?))
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_tuple_struct(name, len)?))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        variant_index: u32,
        variant: &'static str,
        len: usize,
    ) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_tuple_variant(
            name,
            variant_index,
            variant,
            len,
        )?))
    }

    fn serialize_map(self, len: Option<usize>) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_map(len)?))
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_struct(name, len)?))
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        variant_index: u32,
        variant: &'static str,
        len: usize,
    ) -> postcard::Result<Compound<'a, F>> {
        Ok(Compound(self.0.serialize_struct_variant(
            name,
            variant_index,
            variant,
            len,
        )?))
    }

    /// As postcard does, formats `value` once to count its length and again
    /// to write it; unlike postcard, refuses a `Display` whose second output
    /// differs in length from its first, which would corrupt the encoding.
    fn collect_str<T: Display + ?Sized>(self, value: &T) -> postcard::Result<()> {
        let mut counted = Fragments {
            output: None::<&mut F>,
            left: usize::MAX,
        };
        write!(counted, "{value}").map_err(|_| Error::CollectStrError)?;
        let len = usize::MAX - counted.left;
        self.0.serialize_u64(len as u64)?; // as in `string`
        if len >= LARGE {
            // No padding: the bytes are written in fragments, so there is no
            // one source address to align them with.
            self.0
                .output
                .try_extend(&[0, 0])
                .map_err(|_| Error::SerializeBufferFull)?;
        }
        let mut fragments = Fragments {
            output: Some(&mut self.0.output),
            left: len,
        };
        write!(fragments, "{value}").map_err(|_| Error::CollectStrError)?;
        if fragments.left != 0 {
            return Err(Error::CollectStrError);
        }
        Ok(())
    }
}

/// Writes a formatted string's fragments to `output` (or only counts them),
/// refusing more than `left` bytes in all.
struct Fragments<O> {
    output: Option<O>,
    left: usize,
}

impl<F: Flavor> Write for Fragments<&mut F> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.left = self.left.checked_sub(s.len()).ok_or(fmt::Error)?;
        match &mut self.output {
            Some(output) => output.try_extend(s.as_bytes()).map_err(|_| fmt::Error),
            None => Ok(()),
        }
    }
}

impl<F: Large> ser::SerializeSeq for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeSeq::end(self.0)
    }
}

impl<F: Large> ser::SerializeTuple for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeTuple::end(self.0)
    }
}

impl<F: Large> ser::SerializeTupleStruct for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeTupleStruct::end(self.0)
    }
}

impl<F: Large> ser::SerializeTupleVariant for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeTupleVariant::end(self.0)
    }
}

impl<F: Large> ser::SerializeMap for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> postcard::Result<()> {
        key.serialize(Padded(&mut *self.0))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeMap::end(self.0)
    }
}

impl<F: Large> ser::SerializeStruct for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        value: &T,
    ) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeStruct::end(self.0)
    }
}

impl<F: Large> ser::SerializeStructVariant for Compound<'_, F> {
    type Ok = ();
    type Error = Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        value: &T,
    ) -> postcard::Result<()> {
        value.serialize(Padded(&mut *self.0))
    }

    fn end(self) -> postcard::Result<()> {
        ser::SerializeStructVariant::end(self.0)
    }
}
