//! Root tests: real bridges, veths, nftables tables; machines are network
//! namespaces. Traffic only flows between the namespaces and bridges each
//! test creates (every domain has `egress: none`).

mod common;

use common::*;
use moat_core::model::{Endpoint, Ports, Protocol};
use moat_net::fixture::{self, dom, mach, policy, DomainSpec};
use std::collections::BTreeMap;

macro_rules! need_root {
    () => {
        if let Some(r) = skip_reason() {
            eprintln!("SKIP: {r}");
            return;
        }
    };
}

const PROTOS: [&str; 4] = ["icmp", "tcp", "udp", "ipv6"];

/// What the matrix policies allow, written independently of the renderer.
fn expected(env: &Env, src: &str, dst: &str, proto: &str) -> bool {
    if proto == "ipv6" {
        return false; // moat assigns no IPv6 and drops it at every machine port
    }
    let dom_of = |n: &str| (n != "host").then(|| n.split('-').next().unwrap_or("").to_string());
    if src != "host" && dst != "host" && dom_of(src) == dom_of(dst) {
        return true;
    }
    let matches = |node: &str, e: &Endpoint| match e {
        Endpoint::Host => node == "host",
        Endpoint::Domain(d) => dom_of(node).as_deref() == Some(d.as_str()),
        Endpoint::Machine(m) => node == m,
    };
    env.resolved.project.policies.iter().any(|p| {
        let fits = match (&p.ports, p.protocol) {
            (Ports::All, _) => true,
            (_, Protocol::Icmp) => proto == "icmp",
            (Ports::List(l), Protocol::Tcp) => proto == "tcp" && l.contains(&TCP_PORT),
            (Ports::List(l), Protocol::Udp) => proto == "udp" && l.contains(&UDP_PORT),
        };
        fits && ((matches(src, &p.from) && matches(dst, &p.to))
            || (p.bidirectional && matches(src, &p.to) && matches(dst, &p.from)))
    })
}

#[test]
fn isolation_matrix() {
    need_root!();
    let _g = serial();
    let t = std::time::Instant::now();
    let mut env = Env::new(|root| {
        let l = |p: u16| Ports::List(vec![p]);
        fixture::resolved(
            root,
            241,
            &[
                DomainSpec::new("a", &["m1", "m2"]),
                DomainSpec::new("b", &["m1", "m2"]),
                DomainSpec::new("c", &["m1", "m2"]),
            ],
            vec![
                policy(dom("a"), dom("b"), l(TCP_PORT), Protocol::Tcp, false),
                policy(dom("b"), dom("c"), l(UDP_PORT), Protocol::Udp, true),
                policy(mach("c-m1"), mach("a-m1"), Ports::All, Protocol::Tcp, false),
                policy(Endpoint::Host, dom("c"), l(TCP_PORT), Protocol::Tcp, false),
                policy(dom("b"), Endpoint::Host, l(TCP_PORT), Protocol::Tcp, false),
                policy(
                    mach("a-m2"),
                    dom("c"),
                    Ports::List(vec![]),
                    Protocol::Icmp,
                    false,
                ),
            ],
        )
    });
    let machines: Vec<String> = env.resolved.nics.keys().cloned().collect();
    for m in &machines {
        env.server(Some(m), &[]);
    }
    let gws: Vec<String> = env
        .resolved
        .networks
        .keys()
        .map(|d| env.gateway(d))
        .collect();
    env.server(None, &gws);

    let mut nodes = vec!["host".to_string()];
    nodes.extend(machines.iter().cloned());
    let mut children = Vec::new();
    for src in &nodes {
        let mut probes = Vec::new();
        for dst in nodes.iter().filter(|d| *d != src) {
            for proto in PROTOS {
                let id = format!("{dst}/{proto}");
                let addr = match (dst.as_str(), proto) {
                    // The host as seen from a machine: its own gateway.
                    ("host", "ipv6") => {
                        let br = &env.net_of(src).bridge;
                        let mac = sh(&["cat", &format!("/sys/class/net/{br}/address")]);
                        let mac: Vec<u8> = mac
                            .trim()
                            .split(':')
                            .filter_map(|h| u8::from_str_radix(h, 16).ok())
                            .collect();
                        let mac: [u8; 6] = mac.try_into().expect("bridge mac");
                        format!("{}%eth0", eui64(&mac))
                    }
                    ("host", _) => env.net_of(src).gateway.to_string(),
                    (m, "ipv6") => {
                        let dev = if src == "host" {
                            env.net_of(m).bridge.clone()
                        } else {
                            "eth0".into()
                        };
                        format!("{}%{dev}", env.link_local(m))
                    }
                    (m, _) => env.ip(m),
                };
                probes.push(Probe::new(id, proto, addr));
            }
        }
        let m = (src != "host").then_some(src.as_str());
        children.push((src.clone(), env.spawn_probes(m, &probes)));
    }
    let results: BTreeMap<String, BTreeMap<String, bool>> =
        children.into_iter().map(|(s, c)| (s, collect(c))).collect();

    // Print the matrix: one cell per (src, dst), letters for flows that passed.
    let mut out = String::from(
        "\nisolation matrix (I=icmp T=tcp U=udp 6=ipv6 passed, .=blocked, !=unexpected)\n",
    );
    out += &format!("{:>8} |", "from\\to");
    for d in &nodes {
        out += &format!(" {d:>6}");
    }
    out += "\n";
    let mut wrong = Vec::new();
    for s in &nodes {
        out += &format!("{s:>8} |");
        for d in &nodes {
            if s == d {
                out += &format!(" {:>6}", "-");
                continue;
            }
            let mut cell = String::new();
            for (p, letter) in PROTOS.iter().zip(['I', 'T', 'U', '6']) {
                let got = results[s][&format!("{d}/{p}")];
                let want = expected(&env, s, d, p);
                if got != want {
                    wrong.push(format!("{s} -> {d} {p}: got {got}, expected {want}"));
                    cell.push('!');
                } else {
                    cell.push(if got { letter } else { '.' });
                }
            }
            out += &format!(" {cell:>6}");
        }
        out += "\n";
    }
    eprintln!("{out}policies: {:#?}", env.ruleset().notes);
    eprintln!("matrix took {:?}", t.elapsed());
    let counters = env.host.counters(env.tag()).expect("counters");
    eprintln!("counters: {counters:?}");
    assert!(wrong.is_empty(), "unexpected flows:\n{}", wrong.join("\n"));
}

#[test]
fn attacks_from_a_machine_fail() {
    need_root!();
    let _g = serial();
    let mut env = Env::new(|root| {
        let l = |p: u16| Ports::List(vec![p]);
        fixture::resolved(
            root,
            242,
            &[
                DomainSpec::new("a", &["m1", "m2"]),
                DomainSpec::new("b", &["m1"]),
                DomainSpec::new("c", &["m1"]),
            ],
            vec![
                policy(dom("b"), dom("c"), l(TCP_PORT), Protocol::Tcp, false),
                policy(dom("b"), Endpoint::Host, l(TCP_PORT), Protocol::Tcp, false),
            ],
        )
    });
    for m in ["a-m2", "b-m1", "c-m1"] {
        env.server(Some(m), &[]);
    }
    // A host address outside every domain, on a spare link of this run
    // (a bridge: this kernel has no dummy driver).
    let dummy = format!("mx{}-d", env.tag());
    env.track_link(&dummy);
    let other = "10.242.250.1".to_string();
    sh(&["ip", "link", "add", &dummy, "type", "bridge"]);
    sh(&["ip", "addr", "add", &format!("{other}/32"), "dev", &dummy]);
    sh(&["ip", "link", "set", &dummy, "up"]);
    let (gw_a, gw_b, gw_c) = (env.gateway("a"), env.gateway("b"), env.gateway("c"));
    env.server(
        None,
        &[gw_a.clone(), gw_b.clone(), gw_c.clone(), other.clone()],
    );
    let a1 = Some("a-m1");
    let b1 = Some("b-m1");
    let tcp = |id: &str, dst: &str| Probe::new(id, "tcp", dst);

    // Legitimate flows work (the attacks below are not passing by accident).
    assert!(
        env.probe1(b1, tcp("b->c", &env.ip("c-m1"))),
        "b -> c tcp must pass"
    );
    assert!(
        env.probe1(a1, tcp("a1->a2", &env.ip("a-m2"))),
        "intra-domain must pass"
    );
    assert!(
        env.probe1(b1, tcp("b->gw_b", &gw_b)),
        "b -> host (policy) must pass"
    );
    assert!(
        env.probe1(b1, tcp("b->other", &other)),
        "b -> host other address (policy) must pass"
    );

    // 1. Spoofed source IP: a-m1 sends as b-m1 (which may reach c).
    let b_ip = env.ip("b-m1");
    env.in_ns(
        "a-m1",
        &["ip", "addr", "add", &format!("{b_ip}/32"), "dev", "eth0"],
    );
    let spoof = env.probe1(a1, tcp("spoof", &env.ip("c-m1")).with_src(&b_ip));
    let spoof_intra = env.probe1(a1, tcp("spoof-intra", &env.ip("a-m2")).with_src(&b_ip));
    env.in_ns(
        "a-m1",
        &["ip", "addr", "del", &format!("{b_ip}/32"), "dev", "eth0"],
    );
    assert!(!spoof, "spoofed source IP reached another domain");
    assert!(
        !spoof_intra,
        "spoofed source IP reached a machine of the same domain"
    );
    eprintln!("spoofed source IP: blocked");

    // 2. Spoofed MAC: a-m1 changes eth0's MAC and talks inside its own domain.
    env.in_ns(
        "a-m1",
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:66:66"],
    );
    env.in_ns("a-m1", &["ip", "neigh", "flush", "dev", "eth0"]);
    env.in_ns("a-m2", &["ip", "neigh", "flush", "dev", "eth0"]);
    let mac_spoof = env.probe1(a1, tcp("mac", &env.ip("a-m2")));
    let mac = moat_core::naming::mac_string(&env.resolved.nics["a-m1"].mac);
    env.in_ns("a-m1", &["ip", "link", "set", "eth0", "address", &mac]);
    env.in_ns("a-m1", &["ip", "route", "replace", "default", "via", &gw_a]);
    assert!(!mac_spoof, "a spoofed MAC could talk");
    assert!(
        env.probe1(a1, tcp("a1->a2 again", &env.ip("a-m2"))),
        "intra-domain must pass again"
    );
    eprintln!("spoofed MAC: blocked");

    // 3. Forged ARP replies: a-m1 claims a-m2's and the gateway's address;
    // a sniffer in a-m2 must see a-m1's honest ARP but none of the forged ones.
    let sniff = env.dir.path().join("sniff.py");
    std::fs::write(&sniff, SNIFF_PY).expect("write sniff.py");
    let sniff = sniff.display().to_string();
    let ns_a2 = env.ns["a-m2"].clone();
    let sniffer = std::process::Command::new("ip")
        .args(["netns", "exec", &ns_a2, "/usr/bin/python3", &sniff, &mac])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sniffer");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let a2_mac = moat_core::naming::mac_string(&env.resolved.nics["a-m2"].mac);
    env.in_ns(
        "a-m1",
        &[
            "/usr/bin/python3",
            &sniff,
            "--send",
            &mac,
            &env.ip("a-m1"),
            &env.ip("a-m2"),
            &gw_a,
            &a2_mac,
        ],
    );
    let seen = sniffer.wait_with_output().expect("sniffer output");
    let seen = String::from_utf8_lossy(&seen.stdout).to_string();
    eprintln!("ARP seen by a-m2 from a-m1's MAC: {}", seen.trim());
    assert!(
        seen.contains(&env.ip("a-m1")),
        "honest ARP did not arrive: sniffer broken? {seen}"
    );
    assert!(
        !seen.contains(&format!("{} ", env.ip("a-m2"))),
        "forged ARP for a-m2 arrived"
    );
    assert!(
        !seen.contains(&format!("{gw_a} ")),
        "forged ARP for the gateway arrived"
    );
    eprintln!("forged ARP: blocked");

    // 4. IPv6 link-local: to another domain, and even inside the domain.
    let ll = |m: &str| format!("{}%eth0", env.link_local(m));
    let r = env.probe(
        a1,
        &[
            Probe::new("ll-b", "ipv6", ll("b-m1")),
            Probe::new("ll-a2", "ipv6", ll("a-m2")),
            Probe::new("ll-self", "ipv6", ll("a-m1")),
            Probe::new("lo6", "ipv6", "::1"),
        ],
    );
    assert!(
        r["ll-self"] && r["lo6"],
        "IPv6 itself works inside the machine: {r:?}"
    );
    assert!(
        !r["ll-b"] && !r["ll-a2"],
        "IPv6 link-local reached another machine: {r:?}"
    );
    eprintln!("IPv6 link-local: blocked");

    // 5. The host's gateway addresses (own and other bridges) and its other
    // addresses: a has no `to: host` policy.
    let r = env.probe(
        a1,
        &[
            tcp("gw_a", &gw_a),
            tcp("gw_b", &gw_b),
            tcp("gw_c", &gw_c),
            tcp("other", &other),
            Probe::new("gw_b icmp", "icmp", &gw_b),
            Probe::new("gw_b udp", "udp", &gw_b),
        ],
    );
    assert!(r.values().all(|ok| !ok), "a reached the host: {r:?}");
    eprintln!("host addresses (own gateway, other gateways, other address): blocked");
}

const SNIFF_PY: &str = r#"
import socket, struct, sys, time
def arp(src_mac, sender_ip, target_ip):
    mac = bytes.fromhex(src_mac.replace(':', ''))
    bc = b'\xff' * 6
    return bc + mac + b'\x08\x06' + struct.pack('!HHBBH', 1, 0x0800, 6, 4, 2) + mac + socket.inet_aton(sender_ip) + bc + socket.inet_aton(target_ip)
if sys.argv[1] == '--send':
    mac, own, victim, gw, _ = sys.argv[2:7]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(('eth0', 0))
    for _ in range(3):
        s.send(arp(mac, own, gw))      # honest gratuitous ARP
        s.send(arp(mac, victim, gw))   # claims the victim's address
        s.send(arp(mac, gw, victim))   # claims the gateway's address
        time.sleep(0.05)
    sys.exit(0)
want = bytes.fromhex(sys.argv[1].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(('eth0', 0)); s.settimeout(0.2)
end = time.time() + 1.5
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) >= 42 and f[22:28] == want:
        print(socket.inet_ntoa(f[28:32]) + ' ', flush=True)
"#;

#[test]
fn reapply_keeps_established_connection() {
    need_root!();
    let _g = serial();
    let mut env = Env::new(|root| {
        fixture::resolved(
            root,
            243,
            &[
                DomainSpec::new("a", &["m1", "m2"]),
                DomainSpec::new("b", &["m1"]),
            ],
            vec![],
        )
    });
    env.server(Some("a-m2"), &[]);
    env.server(Some("b-m1"), &[]);
    let client = env.dir.path().join("client.py");
    std::fs::write(&client, CLIENT_PY).expect("client.py");
    let ns = env.ns["a-m1"].clone();
    let child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "/usr/bin/python3",
            &client.display().to_string(),
            &env.ip("a-m2"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    std::thread::sleep(std::time::Duration::from_millis(300));

    let closed = env.ruleset();
    let mut open_r = env.resolved.clone();
    open_r.project.policies.push(policy(
        dom("a"),
        dom("b"),
        Ports::List(vec![TCP_PORT]),
        Protocol::Tcp,
        false,
    ));
    let open = moat_net::render(&open_r, moat_net::RenderOptions::default());
    let t = std::time::Instant::now();
    for i in 0..20 {
        let rs = if i % 2 == 0 { &open } else { &closed };
        env.apply(rs);
        let (_, hash) = env.host.observe(env.tag()).expect("observe");
        assert_eq!(
            hash.as_deref(),
            Some(rs.hash.as_str()),
            "apply {i} did not switch the rules"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("20 re-applies in {:?}", t.elapsed());
    // Last apply was `closed`: a -> b is blocked again; switch once more and it opens.
    assert!(!env.probe1(Some("a-m1"), Probe::new("a->b", "tcp", env.ip("b-m1"))));
    env.apply(&open);
    assert!(env.probe1(Some("a-m1"), Probe::new("a->b", "tcp", env.ip("b-m1"))));
    let out = child.wait_with_output().expect("client output");
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("client: {}", out.trim());
    assert!(
        out.starts_with("ok"),
        "connection broke during re-applies: {out}"
    );
}

const CLIENT_PY: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5000), timeout=1.0)
n = 0; end = time.time() + 3.5
try:
    while time.time() < end:
        msg = b'msg%06d' % n
        s.sendall(msg)
        got = b''
        while len(got) < len(msg):
            d = s.recv(64)
            if not d: raise EOFError('connection closed')
            got += d
        assert got == msg, got
        n += 1
        time.sleep(0.05)
    print('ok', n, 'messages', flush=True)
except Exception as e:
    print('fail after', n, 'messages:', repr(e), flush=True)
"#;

#[test]
fn dhcp_gives_allocated_address_and_bridge_drift_is_fixed() {
    need_root!();
    let _g = serial();
    if !std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        eprintln!("SKIP: dnsmasq not installed (apt-get install dnsmasq-base)");
        return;
    }
    let env = Env::new(|root| {
        fixture::resolved(
            root,
            244,
            &[DomainSpec::new("d", &["m1"]).dhcp(true)],
            vec![],
        )
    });
    let net = env.resolved.networks["d"].clone();
    let nic = env.resolved.nics["d-m1"].clone();

    // Drift: a stray address and a missing gateway are repaired.
    sh(&["ip", "addr", "add", "10.244.9.9/24", "dev", &net.bridge]);
    sh(&[
        "ip",
        "addr",
        "del",
        &format!("{}/24", net.gateway),
        "dev",
        &net.bridge,
    ]);
    let changes = env
        .host
        .ensure_bridge(&net, &env.alias)
        .expect("ensure_bridge");
    eprintln!("drift fixed: {changes:?}");
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(env
        .host
        .ensure_bridge(&net, &env.alias)
        .expect("ensure_bridge")
        .is_empty());
    let (nets, hash) = env.host.observe(env.tag()).expect("observe");
    assert_eq!(nets["d"].subnet, Some(net.subnet));
    assert!(nets["d"].up);
    assert_eq!(hash, Some(env.ruleset().hash));
    assert_eq!(
        sh(&[
            "cat",
            &format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", net.bridge)
        ])
        .trim(),
        "1"
    );

    // A rule added by hand inside moat's table shows as drift.
    let table = moat_core::naming::nft_table(env.tag());
    sh(&["nft", "add", "rule", "inet", &table, "input", "accept"]);
    let (_, hash) = env.host.observe(env.tag()).expect("observe");
    eprintln!("after a hand edit: {hash:?}");
    assert_ne!(hash, Some(env.ruleset().hash));
    env.apply(&env.ruleset());
    assert_eq!(
        env.host.observe(env.tag()).expect("observe").1,
        Some(env.ruleset().hash)
    );

    let pid = env
        .host
        .ensure_dhcp(&net, &[&nic], &env.run_dir)
        .expect("dnsmasq");
    assert_eq!(
        env.host
            .ensure_dhcp(&net, &[&nic], &env.run_dir)
            .expect("dnsmasq"),
        pid,
        "restarted without change"
    );
    env.in_ns("d-m1", &["ip", "addr", "flush", "dev", "eth0"]);
    let out = env.in_ns(
        "d-m1",
        &[
            "sh",
            "-c",
            "busybox udhcpc -i eth0 -n -q -f -t 4 -T 1 -s /bin/true 2>&1",
        ],
    );
    eprintln!("udhcpc: {}", out.trim());
    assert!(
        out.contains(&format!("lease of {} obtained", nic.ip)),
        "{out}"
    );
    env.in_ns(
        "d-m1",
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/24", nic.ip),
            "dev",
            "eth0",
        ],
    );
    let q = format!("busybox nslookup -type=a d-m1 {} 2>&1; true", net.gateway);
    let dns = env.in_ns("d-m1", &["sh", "-c", &q]);
    eprintln!("nslookup: {}", dns.trim());
    assert!(dns.contains(&nic.ip.to_string()), "{dns}");
    env.host.stop_dhcp(&net.bridge, &env.run_dir).expect("stop");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let gone = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.is_empty())
        .unwrap_or(true);
    assert!(gone, "dnsmasq {pid} still running after stop_dhcp");
}

/// The AnKLuMe showcase's policies (hand-built Resolved with the same
/// domains and policies, on a subnet of this run) checked by real flows.
#[test]
fn showcase_policies_hold() {
    need_root!();
    let _g = serial();
    let mut env = Env::new(|root| fixture::showcase(root, 245));
    let tcp_ports = [22, 3000, 3210, 8000, 8089, 9050, 11434];
    let machines: Vec<String> = env.resolved.nics.keys().cloned().collect();
    for m in &machines {
        env.server_ports(Some(m), &tcp_ports, &[5353], &[]);
    }
    let gws: Vec<String> = env
        .resolved
        .networks
        .keys()
        .map(|d| env.gateway(d))
        .collect();
    env.server_ports(None, &tcp_ports, &[], &gws);
    // (from, to, kind, port, allowed)
    let cases: &[(&str, &str, &str, u16, bool)] = &[
        ("pro-dev", "ai-tools-gpu-server", "tcp", 11434, true),
        ("pro-dev", "ai-tools-webui", "tcp", 3210, true),
        ("perso-firefox", "ai-tools-webui", "tcp", 3000, true),
        ("perso-firefox", "ai-tools-webui", "tcp", 3210, false),
        ("ai-tools-gpu-server", "pro-dev", "tcp", 11434, false),
        ("vault-keepass", "pro-desktop", "tcp", 9050, true),
        ("vault-keepass", "pro-desktop", "icmp", 0, true),
        ("pro-desktop", "vault-keepass", "tcp", 22, false),
        ("pro-dev", "perso-desktop", "tcp", 22, true),
        ("perso-desktop", "pro-dev", "tcp", 22, true),
        ("perso-desktop", "pro-dev", "tcp", 8000, false),
        (
            "sandbox-risky-browse",
            "sandbox-tor-gateway",
            "tcp",
            9050,
            true,
        ),
        (
            "sandbox-risky-browse",
            "sandbox-tor-gateway",
            "udp",
            5353,
            true,
        ),
        ("sandbox-risky-browse", "pro-dev", "tcp", 22, false),
        (
            "sandbox-tor-gateway",
            "ai-tools-gpu-server",
            "tcp",
            11434,
            false,
        ),
        ("host", "ai-tools-gpu-server", "tcp", 8000, true),
        ("host", "pro-dev", "tcp", 22, false),
        ("pro-dev", "host", "tcp", 22, false),
    ];
    let mut by_src: BTreeMap<&str, Vec<Probe>> = BTreeMap::new();
    for (i, (from, to, kind, port, _)) in cases.iter().enumerate() {
        let dst = if *to == "host" {
            env.net_of(from).gateway.to_string()
        } else {
            env.ip(to)
        };
        let kind: &'static str = match *kind {
            "tcp" => "tcp",
            "udp" => "udp",
            _ => "icmp",
        };
        by_src
            .entry(from)
            .or_default()
            .push(Probe::new(i.to_string(), kind, dst).port(*port));
    }
    let children: Vec<_> = by_src
        .iter()
        .map(|(src, probes)| env.spawn_probes((*src != "host").then_some(*src), probes))
        .collect();
    let mut results = BTreeMap::new();
    for c in children {
        results.extend(collect(c));
    }
    let mut wrong = Vec::new();
    for (i, (from, to, kind, port, want)) in cases.iter().enumerate() {
        let got = results[&i.to_string()];
        eprintln!(
            "{from:>22} -> {to:<22} {kind} {port:>5}: {}",
            if got { "pass" } else { "blocked" }
        );
        if got != *want {
            wrong.push(format!(
                "{from} -> {to} {kind} {port}: got {got}, expected {want}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `run --domain` and `destroy` of a machine change only the bridge table's
/// port sets: `update_ruleset` does that in place, and falls back to
/// replacing the tables when its base is not what is live.
#[test]
fn machine_ports_update_in_place() {
    need_root!();
    let _g = serial();
    let mut env = Env::new(|root| {
        fixture::resolved(root, 248, &[DomainSpec::new("a", &["m1", "m2"])], vec![])
    });
    env.server(Some("a-m2"), &[]);
    let table = moat_core::naming::nft_table(env.tag());
    let both = env.ruleset();
    let mut r = env.resolved.clone();
    let port = r.nics.remove("a-m2").expect("a-m2").host_if;
    let one = moat_net::render(&r, moat_net::RenderOptions::default());
    let hash = |env: &Env| env.host.observe(env.tag()).expect("observe").1;
    // Tables from `from` to `to`; whether that was done in place.
    let update = |env: &Env, from: &moat_net::Ruleset, to: &moat_net::Ruleset| {
        let u = env.host.update_ruleset(Some(&from.body), to);
        u.expect("update").in_place
    };
    // a-m2's entry in the `ports` set, added or deleted by hand.
    let port_entry = |verb: &str| {
        let elem = format!("{{ \"{port}\" }}");
        sh(&["nft", verb, "element", "bridge", &table, "ports", &elem]);
    };
    let to_m2 = |env: &Env| env.probe1(Some("a-m1"), Probe::new("m1->m2", "tcp", env.ip("a-m2")));
    assert!(to_m2(&env), "a-m1 -> a-m2 before");

    // a-m2 leaves: its port entries go, in place; its replies are now spoofed.
    assert!(update(&env, &both, &one));
    assert_eq!(hash(&env), Some(one.hash.clone()));
    assert!(!to_m2(&env), "a-m2's port is unknown now");
    // And comes back.
    assert!(update(&env, &one, &both));
    assert_eq!(hash(&env), Some(both.hash.clone()));
    assert!(to_m2(&env), "a-m1 -> a-m2 again");

    // A stale base (what the live tables were before): the swap is refused
    // and the tables replaced.
    assert!(!update(&env, &one, &both));
    assert_eq!(hash(&env), Some(both.hash.clone()));
    // An entry deleted by hand: the in-place delete fails, whole, and the
    // tables are replaced.
    port_entry("delete");
    assert!(!update(&env, &both, &one));
    assert_eq!(hash(&env), Some(one.hash.clone()));
    assert!(!to_m2(&env));
    // An entry added by hand (a port let through) shows as drift, and
    // replacing the tables removes it.
    port_entry("add");
    let drifted = hash(&env).expect("table present");
    assert!(drifted.starts_with("drifted ("), "{drifted}");
    env.apply(&one);
    assert_eq!(hash(&env), Some(one.hash.clone()));
}

#[test]
fn cleanup_root_leaves_nothing() {
    need_root!();
    let _g = serial();
    let env = Env::new(|root| {
        fixture::resolved(
            root,
            246,
            &[DomainSpec::new("a", &["m1"]), DomainSpec::new("b", &["m1"])],
            vec![],
        )
    });
    let tag = env.tag().to_string();
    drop(env);
    let links = sh(&["ip", "-br", "link"]);
    let ours: Vec<&str> = links
        .lines()
        .filter(|l| l.starts_with(&format!("mt{tag}-")) || l.starts_with(&format!("mv{tag}-")))
        .collect();
    assert!(ours.is_empty(), "left behind: {ours:?}");
    assert!(!sh(&["nft", "list", "tables"]).contains(&format!("moat_{tag}")));
    let host = moat_net::NetHost::new(moat_host::exec::HostExecutor);
    assert_eq!(
        host.observe(&tag).expect("observe"),
        (Default::default(), None)
    );
}

#[test]
fn tap_port_for_vms() {
    need_root!();
    let _g = serial();
    let env =
        Env::new(|root| fixture::resolved(root, 247, &[DomainSpec::new("a", &["m1"])], vec![]));
    let mut vm = env.resolved.nics["a-m1"].clone();
    vm.machine = "a-vm".into();
    vm.host_if = moat_core::naming::host_if_name(env.tag(), 99);
    let net = env.resolved.networks["a"].clone();
    env.host
        .attach_tap(&vm, &net, &env.alias)
        .expect("attach_tap");
    let ports = env.host.ports(env.tag()).expect("ports");
    eprintln!("ports: {ports:?}");
    assert_eq!(ports[&vm.host_if].as_deref(), Some(net.bridge.as_str()));
    assert_eq!(
        ports[&env.resolved.nics["a-m1"].host_if].as_deref(),
        Some(net.bridge.as_str())
    );
    let details = sh(&["ip", "-d", "link", "show", &vm.host_if]);
    assert!(
        details.contains("tun type tap") || details.contains("tap"),
        "{details}"
    );
    assert!(details.contains(&env.alias), "{details}");
    env.host.detach(&vm.host_if).expect("detach");
    assert!(!env
        .host
        .ports(env.tag())
        .expect("ports")
        .contains_key(&vm.host_if));
}
