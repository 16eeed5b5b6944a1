//! The soak of `tests/soak.rs` in reuse mode: the same seeded mix, so every
//! way a task ends but success retires its worker, and fresh and reused
//! workers alternate. Its own target (one process per soak): the soak counts
//! any other child of this process as a stray.

mod common;
#[path = "../examples/soak.rs"]
mod soak;

use libtest_mimic::Trial;

fn main() {
    let config = soak::Config {
        // Fewer unoptimised: `cargo test` builds the tasks without optimisation.
        tasks: if cfg!(debug_assertions) { 1_000 } else { 2_000 },
        seed: 20_261_208,
        reuse: 50,
        ..soak::Config::default()
    };
    let zygote = soak::start(&config).expect("start the soak's zygotes");
    let args = common::harness_args();
    let trials = vec![Trial::test(
        "a_mixed_soak_in_reuse_mode_delivers_every_outcome_and_leaks_nothing",
        move || Ok(soak::check(&config, zygote)?),
    )];
    libtest_mimic::run(&args, trials).exit();
}
