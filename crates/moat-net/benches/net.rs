//! Ruleset render and apply time, and ruleset size, for 10 and 200 domains
//! (2 machines and 2 policies each). Apply needs root and `nft`; it replaces
//! a table with a unique per-run name and deletes it afterwards.
//! Run: `cargo bench -p moat-net --bench net` (see bench/net/).

use moat_core::model::{Endpoint, Ports, Protocol};
use moat_host::exec::HostExecutor;
use moat_net::fixture::{self, dom, policy, DomainSpec};
use moat_net::{render, NetHost, RenderOptions};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("moat-net-bench-{}", std::process::id()));
    let root = dir.display().to_string();
    let is_root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let host = NetHost::new(HostExecutor);
    println!("| domains | machines | policies | rules | bytes | render (median) | apply nft -f (median) |");
    println!("|---|---|---|---|---|---|---|");
    for n in [10usize, 200] {
        let domains: Vec<DomainSpec> = (0..n)
            .map(|i| DomainSpec::new(&format!("d{i}"), &["m1", "m2"]))
            .collect();
        let mut policies = Vec::new();
        for i in 0..n {
            let next = format!("d{}", (i + 1) % n);
            policies.push(policy(
                dom(&format!("d{i}")),
                dom(&next),
                Ports::List(vec![22, 443]),
                Protocol::Tcp,
                false,
            ));
            policies.push(policy(
                dom(&format!("d{i}")),
                Endpoint::Host,
                Ports::List(vec![53]),
                Protocol::Udp,
                false,
            ));
        }
        let resolved = fixture::resolved(&format!("{root}-{n}"), 250, &domains, policies);
        let runs = 30;
        let mut times = Vec::new();
        let mut rs = render(&resolved, RenderOptions::default());
        for _ in 0..runs {
            let t = Instant::now();
            rs = render(&resolved, RenderOptions::default());
            times.push(t.elapsed());
        }
        let render_t = median(times);
        let apply_t = if is_root {
            let prev = host.ip_forward().ok();
            let mut times = Vec::new();
            for _ in 0..7 {
                let t = Instant::now();
                if let Err(e) = host.apply_ruleset(&rs) {
                    eprintln!("apply failed: {e}");
                    break;
                }
                times.push(t.elapsed());
            }
            let _ = host.remove_ruleset(&rs.root_tag);
            if let Some(p) = prev {
                let _ = host.set_ip_forward(p);
            }
            if times.is_empty() {
                "failed".to_string()
            } else {
                format!("{:.1?}", median(times))
            }
        } else {
            "skipped (not root)".to_string()
        };
        println!(
            "| {n} | {} | {} | {} | {} | {:.1?} | {apply_t} |",
            resolved.nics.len(),
            resolved.project.policies.len(),
            rs.rule_count,
            rs.bytes(),
            render_t
        );
    }
}
