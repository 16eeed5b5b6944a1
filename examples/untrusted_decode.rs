//! Decodes attacker-controlled input in a confined worker: a hand-made
//! decompression bomb (7 MB of deflate that inflates to 1 GiB of zeros) fed
//! to a decoder that trusts it (`miniz_oxide::inflate::decompress_to_vec`
//! has no output limit), under a memory limit, a CPU limit and a sandbox.
//!
//! The host survives: the worker's allocation fails at the limit, and the
//! task ends with `ErrorKind::ResourceLimit` / `Limit::Memory` instead of
//! the host's memory being eaten. An honest input decodes as usual.
//!
//! ```text
//! cargo run --example untrusted_decode
//! ```

use std::time::Duration;

use run_in_process::{ErrorKind, Sandbox, Zygote};

/// The decoder under attack. It trusts its input, as decoders too often do.
fn inflate(input: Vec<u8>) -> Result<usize, String> {
    miniz_oxide::inflate::decompress_to_vec(&input)
        .map(|out| out.len())
        .map_err(|e| format!("{e:?}"))
}

/// A raw deflate stream that inflates to `1 + 258 × matches` zero bytes:
/// one fixed-Huffman block holding a literal 0 and then `matches` copies of
/// "258 bytes from distance 1", 13 bits each (the format's best ratio,
/// about 1:1030).
fn bomb(matches: usize) -> Vec<u8> {
    let mut bits = BitWriter::default();
    bits.put(1, 1); // BFINAL: the only block
    bits.put(1, 2); // BTYPE 01: fixed Huffman codes
    bits.put_code(0x30, 8); // literal 0
    for _ in 0..matches {
        bits.put_code(0xc5, 8); // length code 285: 258 bytes, no extra bits
        bits.put_code(0, 5); // distance code 0: distance 1
    }
    bits.put_code(0, 7); // end of block
    bits.finish()
}

/// Deflate's bit order: fields least significant bit first, Huffman codes
/// most significant bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, bits: u32) {
        self.acc |= value << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn put_code(&mut self, code: u64, bits: u32) {
        let reversed = code.reverse_bits() >> (64 - bits);
        self.put(reversed, bits);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before the runtime exists: the zygote must be forked single-threaded.
    let zygote = Zygote::start()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let sandbox = Sandbox::new().deny_network().deny_exec().deny_fs_writes();
        let confined = |input: Vec<u8>| {
            zygote
                .task(inflate, input)
                .memory_limit(64 << 20)
                .cpu_limit(Duration::from_secs(10))
                .sandbox(sandbox)
                .timeout(Duration::from_secs(60))
        };

        let honest = miniz_oxide::deflate::compress_to_vec(b"an honest, small input", 6);
        match confined(honest).run().await? {
            Ok(n) => println!("honest input: decoded {n} bytes"),
            Err(e) => println!("honest input: refused by the decoder: {e}"),
        }

        let matches = (1usize << 30) / 258;
        let attack = bomb(matches);
        println!(
            "bomb: {} bytes that inflate to {} bytes",
            attack.len(),
            1 + 258 * matches
        );
        match confined(attack).run().await {
            Ok(Ok(n)) => println!("bomb: decoded {n} bytes (no limit was hit)"),
            Ok(Err(e)) => println!("bomb: refused by the decoder: {e}"),
            Err(e) if e.kind() == ErrorKind::ResourceLimit => {
                println!("bomb: contained, limit hit: {:?} ({e})", e.limit());
            }
            Err(e) => println!("bomb: the worker failed otherwise: {e}"),
        }
        Ok::<(), run_in_process::Error>(())
    })?;
    Ok(())
}

#[test]
fn the_bomb_is_valid_deflate() {
    // A small one, decoded without any limit: 1 + 258 × 4 zeros.
    let out = miniz_oxide::inflate::decompress_to_vec(&bomb(4)).expect("valid deflate");
    assert_eq!(out, vec![0u8; 1 + 258 * 4]);
}
