//! A serde `Deserializer` wrapper that bounds how many sequence and map
//! elements one decode may visit.
//!
//! postcard checks every length against the input it has left, except where
//! an element takes no input at all: a worker can claim a `Vec<()>` of 2^62
//! elements in nine bytes, and the parent would spend centuries producing
//! them (SAFETY.md S3). No allocation is involved (zero-sized elements need
//! none), so the payload size limit does not help; a count does. [`Bounded`]
//! charges one unit per element (and per end-of-sequence check) against a
//! [`Budget`] sized from the input, and fails the decode once it runs out.
//!
//! It wraps every visitor, seed and access object postcard hands out, in the
//! manner of `serde_ignored` and `serde_stacker`, and otherwise forwards each
//! call unchanged, so the decoded value is exactly what postcard alone gives.

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Elements a decode may visit.
pub(crate) struct Budget {
    left: Cell<u64>,
    refused: Cell<bool>,
}

impl Budget {
    /// Every element that is not zero-sized consumes at least one input byte,
    /// so a value of `input_len` bytes has at most `input_len` of those; the
    /// rest of the budget is for zero-sized elements (`Vec<()>` and the like)
    /// and for end-of-sequence checks.
    pub(crate) fn for_input(input_len: usize) -> Budget {
        Budget::new((input_len as u64).saturating_add(ZERO_SIZED_ELEMENTS))
    }

    fn new(elements: u64) -> Budget {
        Budget {
            left: Cell::new(elements),
            refused: Cell::new(false),
        }
    }

    /// True once a charge was refused (the codec's own error type may not
    /// keep the message). A budget spent to exactly zero was not refused.
    pub(crate) fn refused(&self) -> bool {
        self.refused.get()
    }

    fn charge<E: de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.refused.set(true);
                Err(E::custom(
                    "more sequence or map elements than the input can hold",
                ))
            }
        }
    }
}

/// Zero-sized elements a decode may produce beyond one per input byte: about
/// a millisecond of work, and far more than any real value carries.
const ZERO_SIZED_ELEMENTS: u64 = 1 << 20;

/// A `Deserializer` that charges `budget` for every element.
pub(crate) struct Bounded<'b, D> {
    pub(crate) inner: D,
    pub(crate) budget: &'b Budget,
}

/// The same wrapper around a visitor, a seed, or an access object.
struct Wrap<'b, T> {
    inner: T,
    budget: &'b Budget,
}

impl<'b, T> Wrap<'b, T> {
    fn new(inner: T, budget: &'b Budget) -> Wrap<'b, T> {
        Wrap { inner, budget }
    }
}

macro_rules! forward_deserialize {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.inner.$method(Wrap::new(visitor, self.budget))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<'_, D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_unit_struct(name, Wrap::new(visitor, self.budget))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_newtype_struct(name, Wrap::new(visitor, self.budget))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_tuple(len, Wrap::new(visitor, self.budget))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_tuple_struct(name, len, Wrap::new(visitor, self.budget))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_struct(name, fields, Wrap::new(visitor, self.budget))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_enum(name, variants, Wrap::new(visitor, self.budget))
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Bounded {
            inner: d,
            budget: self.budget,
        })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Bounded {
            inner: d,
            budget: self.budget,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(Wrap::new(seq, self.budget))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(Wrap::new(map, self.budget))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(Wrap::new(data, self.budget))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Bounded {
            inner: d,
            budget: self.budget,
        })
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.budget.charge()?;
        self.inner.next_element_seed(Wrap::new(seed, self.budget))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.budget.charge()?;
        self.inner.next_key_seed(Wrap::new(seed, self.budget))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(Wrap::new(seed, self.budget))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, 'b, A: EnumAccess<'de>> EnumAccess<'de> for Wrap<'b, A> {
    type Error = A::Error;
    type Variant = Wrap<'b, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let budget = self.budget;
        let (value, variant) = self.inner.variant_seed(Wrap::new(seed, budget))?;
        Ok((value, Wrap::new(variant, budget)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Wrap<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner
            .newtype_variant_seed(Wrap::new(seed, self.budget))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.inner
            .tuple_variant(len, Wrap::new(visitor, self.budget))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.inner
            .struct_variant(fields, Wrap::new(visitor, self.budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_with<T: serde::de::DeserializeOwned>(bytes: &[u8], budget: &Budget) -> Option<T> {
        let mut de = postcard::Deserializer::from_bytes(bytes);
        T::deserialize(Bounded {
            inner: &mut de,
            budget,
        })
        .ok()
    }

    #[test]
    fn each_element_and_each_end_costs_one() {
        let bytes = postcard::to_stdvec(&vec![(); 10]).unwrap();
        // Ten elements, then the check that finds the end.
        let exact = Budget::new(11);
        assert_eq!(decode_with::<Vec<()>>(&bytes, &exact), Some(vec![(); 10]));
        assert!(!exact.refused(), "a budget spent to zero was not refused");
        let short = Budget::new(10);
        assert_eq!(decode_with::<Vec<()>>(&bytes, &short), None);
        assert!(short.refused());
        // Map entries are charged by key, through nested options and enums.
        let map: std::collections::BTreeMap<u8, Option<Vec<()>>> =
            [(1, Some(vec![(); 3])), (2, None)].into();
        let bytes = postcard::to_stdvec(&map).unwrap();
        assert_eq!(decode_with(&bytes, &Budget::new(3 + 4)), Some(map.clone()));
        assert_eq!(
            decode_with::<std::collections::BTreeMap<u8, Option<Vec<()>>>>(
                &bytes,
                &Budget::new(3 + 3),
            ),
            None
        );
    }
}
