//! Timing of address allocation and planning on generated projects.
//!
//! `cargo bench -p moat-core --bench plan` prints, for 1k and 10k machines
//! (100 and 1,000 domains × 10 machines), the best of 7 runs of:
//! allocate on a fresh state, allocate with every allocation already made,
//! plan against an empty host, and plan against a converged host.
//! A plain `harness = false` main: no extra dependency.

#[path = "../tests/common/mod.rs"]
mod common;

use moat_core::address::allocate;
use moat_core::model::Allocations;
use moat_core::observed::Observed;
use moat_core::plan::{plan, simulate, Desired, DesiredFirewall, PlanOptions};
use std::hint::black_box;
use std::time::{Duration, Instant};

const ROOT: &str = "/var/lib/moat";

fn best(mut f: impl FnMut(), runs: usize) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    // The fastest run: on a shared, loaded machine the others measure the
    // neighbours as much as this code.
    t.sort();
    t[0]
}

fn ms(d: Duration) -> String {
    format!("{:9.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: stay quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 1 } else { 7 };
    println!(
        "{:>8} {:>9} | {:>12} {:>12} {:>12} {:>12} | actions",
        "domains", "machines", "alloc fresh", "alloc stable", "plan empty", "plan convg"
    );
    let mut per_machine = Vec::new();
    for domains in [100usize, 1000] {
        let p = common::big_project(domains, 10);
        let machines = domains * 10;
        let fresh = best(
            || drop(black_box(allocate(&p, &Allocations::default(), ROOT))),
            runs,
        );
        let first = match allocate(&p, &Allocations::default(), ROOT) {
            Ok(a) => a.resolved,
            Err(d) => panic!("generated project does not allocate:\n{d}"),
        };
        let stable = best(
            || drop(black_box(allocate(&p, &first.allocations, ROOT))),
            runs,
        );
        let mut desired = Desired::new(first);
        desired.firewall = Some(DesiredFirewall {
            hash: "fw".into(),
            summary: String::new(),
        });
        let opts = PlanOptions::default();
        let empty = Observed::default();
        let t_empty = best(|| drop(black_box(plan(&desired, &empty, &opts))), runs);
        let full_plan = plan(&desired, &empty, &opts);
        let converged = simulate(&empty, &full_plan, &desired);
        let t_conv = best(|| drop(black_box(plan(&desired, &converged, &opts))), runs);
        let again = plan(&desired, &converged, &opts);
        assert!(
            again.is_empty(),
            "converged state still plans {} actions",
            again.actions.len()
        );
        println!(
            "{domains:>8} {machines:>9} | {} {} {} {} | {}",
            ms(fresh),
            ms(stable),
            ms(t_empty),
            ms(t_conv),
            full_plan.actions.len()
        );
        per_machine.push((machines, fresh + t_empty, stable + t_conv));
    }
    if let [(m1, a1, b1), (m2, a2, b2)] = per_machine[..] {
        println!(
            "growth {m1} → {m2} machines ({}x): fresh alloc+plan {:.1}x, steady alloc+plan {:.1}x",
            m2 / m1,
            a2.as_secs_f64() / a1.as_secs_f64(),
            b2.as_secs_f64() / b1.as_secs_f64()
        );
    }
}
