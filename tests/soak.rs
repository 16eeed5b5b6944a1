//! The soak example, small: a seeded mix of every way a task can end, with
//! zombies, strays, fds and RSS checked at quiet points (`examples/soak.rs`;
//! CI also runs the example itself with 20,000 tasks). A `harness = false`
//! target, so the zygotes start while the process has one thread.

mod common;
#[path = "../examples/soak.rs"]
mod soak;

use libtest_mimic::Trial;

fn main() {
    let config = soak::Config {
        // Fewer unoptimised: `cargo test` builds the tasks without optimisation.
        tasks: if cfg!(debug_assertions) { 1_000 } else { 2_000 },
        seed: 20_261_207,
        ..soak::Config::default()
    };
    let zygote = soak::start(&config).expect("start the soak's zygotes");
    let args = common::harness_args();
    let trials = vec![Trial::test(
        "a_mixed_soak_delivers_every_outcome_and_leaks_nothing",
        move || Ok(soak::check(&config, zygote)?),
    )];
    libtest_mimic::run(&args, trials).exit();
}
