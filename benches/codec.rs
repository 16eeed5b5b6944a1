//! Measures the maintained serde codecs this crate could use for arguments and results, each encoding and then decoding the same values in one process, and prints each one's encoded size.
//!
//! The crate uses postcard (`src/codec.rs`). The others are bitcode (serde
//! mode), MessagePack (`rmp-serde`) and CBOR (`ciborium`); bincode is
//! unmaintained (RUSTSEC-2025-0141) and left out. Speed is not the only
//! criterion: the crate streams large encodings into a memfd and wraps the
//! decoder to bound the element count, so the codec must offer a serde
//! `Serializer` over a byte sink and a `Deserializer` over a slice. postcard
//! does both. bitcode's serde mode encodes a whole value into its own buffer
//! and does not expose its deserializer.
//!
//! `cargo bench --bench codec`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A typical small argument: a request with a few fields.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Request {
    id: u64,
    name: String,
    scale: f64,
    tags: Vec<String>,
    limit: Option<u32>,
}

fn request() -> Request {
    Request {
        id: 123_456_789,
        name: "thumbnail-large.png".into(),
        scale: 0.75,
        tags: vec!["image".into(), "resize".into(), "cache".into()],
        limit: Some(4096),
    }
}

/// One codec: how it encodes and decodes.
struct Codec {
    name: &'static str,
    encode: fn(&dyn erased::Value) -> Vec<u8>,
}

/// Encoding through `&dyn` keeps one table of codecs for every payload type.
mod erased {
    pub(crate) trait Value {
        fn postcard(&self) -> Vec<u8>;
        fn bitcode(&self) -> Vec<u8>;
        fn msgpack(&self) -> Vec<u8>;
        fn cbor(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Value for T {
        fn postcard(&self) -> Vec<u8> {
            postcard::to_stdvec(self).expect("postcard encodes")
        }
        fn bitcode(&self) -> Vec<u8> {
            bitcode::serialize(self).expect("bitcode encodes")
        }
        fn msgpack(&self) -> Vec<u8> {
            rmp_serde::to_vec(self).expect("msgpack encodes")
        }
        fn cbor(&self) -> Vec<u8> {
            let mut out = Vec::new();
            ciborium::into_writer(self, &mut out).expect("cbor encodes");
            out
        }
    }
}

const CODECS: [Codec; 4] = [
    Codec {
        name: "postcard",
        encode: |v| v.postcard(),
    },
    Codec {
        name: "bitcode",
        encode: |v| v.bitcode(),
    },
    Codec {
        name: "msgpack",
        encode: |v| v.msgpack(),
    },
    Codec {
        name: "cbor",
        encode: |v| v.cbor(),
    },
];

fn decode<T: DeserializeOwned>(codec: &str, bytes: &[u8]) -> T {
    match codec {
        "postcard" => postcard::from_bytes(bytes).expect("postcard decodes"),
        "bitcode" => bitcode::deserialize(bytes).expect("bitcode decodes"),
        "msgpack" => rmp_serde::from_slice(bytes).expect("msgpack decodes"),
        "cbor" => ciborium::from_reader(bytes).expect("cbor decodes"),
        other => unreachable!("no codec {other}"),
    }
}

/// Benchmarks an encode + decode round trip of `value` with every codec,
/// after checking that each one gives the value back.
fn group<T>(c: &mut Criterion, name: &str, value: T, bytes_moved: u64)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut g = c.benchmark_group(format!("codec/{name}"));
    g.throughput(Throughput::Bytes(bytes_moved));
    for codec in &CODECS {
        let encoded = (codec.encode)(&value);
        assert_eq!(
            decode::<T>(codec.name, &encoded),
            value,
            "{} round trip of {name}",
            codec.name
        );
        eprintln!("{name}: {} encodes to {} bytes", codec.name, encoded.len());
        g.bench_with_input(BenchmarkId::from_parameter(codec.name), &value, |b, v| {
            b.iter(|| {
                let encoded = (codec.encode)(black_box(v));
                black_box(decode::<T>(codec.name, &encoded))
            })
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    group(&mut c, "u64", 0xdead_beef_u64, 8);
    group(&mut c, "request", request(), 64);
    let numbers: Vec<u64> = (0..10_000u64).map(|i| i * i).collect();
    group(&mut c, "vec_u64_10k", numbers, 80_000);
    let bytes: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    group(&mut c, "vec_u8_1mib", bytes.clone(), 1 << 20);
    group(
        &mut c,
        "byte_buf_1mib",
        serde_bytes::ByteBuf::from(bytes),
        1 << 20,
    );

    c.final_summary();
}
