//! The `ip` commands of a machine's network attachment, done in-process
//! over rtnetlink: one process each (three per attached container, one of
//! them `nsenter`) cost more than the kernel work they ask for.
//!
//! Exactly these forms are understood (what moat-net's `attach` and
//! `enslave` run); anything else returns `None` and the real program runs:
//! - `ip link add HIF numtxqueues 1 numrxqueues 1 type veth peer name PEER
//!   numtxqueues 1 numrxqueues 1 address MAC netns PATH`
//! - `ip link set dev HIF alias ALIAS master BRIDGE up`
//! - `nsenter --net=PATH ip -batch -` reading lines
//!   `addr add A.B.C.D/N dev IF`, `link set dev IF up`,
//!   `route replace default via A.B.C.D dev IF`
//!
//! Errors come back as `ip` prints them (`RTNETLINK answers: File exists`),
//! so callers that look at the message behave the same.

use crate::exec::{Cmd, Output};
use crate::netlink::{
    self, Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_NUM_TX_QUEUES: u16 = 31;
const IFLA_NUM_RX_QUEUES: u16 = 32;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;

/// One request of a machine's attachment.
#[derive(Debug, PartialEq, Eq)]
enum Req {
    AddVeth {
        host: String,
        peer: String,
        mac: [u8; 6],
        netns: String,
    },
    Enslave {
        dev: String,
        alias: String,
        master: String,
    },
    Inside {
        netns: String,
        steps: Vec<Step>,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Addr {
        ip: Ipv4Addr,
        prefix: u8,
        dev: String,
    },
    Up {
        dev: String,
    },
    DefaultVia {
        gw: Ipv4Addr,
        dev: String,
    },
}

/// Run `cmd` in-process when it is one of the forms above.
pub fn run(cmd: &Cmd) -> Option<Output> {
    let req = parse(cmd)?;
    Some(match exec(&req)? {
        Ok(()) => Output::ok(""),
        Err(e) => Output {
            status: 2,
            stdout: String::new(),
            stderr: format!("RTNETLINK answers: {}\n", strerror(&e)),
        },
    })
}

/// `ip`'s wording: the message without Rust's "(os error N)".
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn parse(cmd: &Cmd) -> Option<Req> {
    let a: Vec<&str> = cmd.args.iter().map(String::as_str).collect();
    match (cmd.program.as_str(), a.as_slice(), cmd.stdin.as_deref()) {
        (
            "ip",
            ["link", "add", host, "numtxqueues", "1", "numrxqueues", "1", "type", "veth", "peer", "name", peer, "numtxqueues", "1", "numrxqueues", "1", "address", mac, "netns", ns],
            None,
        ) if ifname_ok(host) && ifname_ok(peer) && ns.starts_with('/') => Some(Req::AddVeth {
            host: host.to_string(),
            peer: peer.to_string(),
            mac: netlink::parse_mac(mac)?,
            netns: ns.to_string(),
        }),
        ("ip", ["link", "set", "dev", dev, "alias", alias, "master", master, "up"], None)
            if ifname_ok(dev) && ifname_ok(master) && alias.len() < 256 =>
        {
            Some(Req::Enslave {
                dev: dev.to_string(),
                alias: alias.to_string(),
                master: master.to_string(),
            })
        }
        ("nsenter", [net, "ip", "-batch", "-"], Some(stdin)) => {
            let ns = net.strip_prefix("--net=").filter(|p| p.starts_with('/'))?;
            let mut steps = Vec::new();
            for l in std::str::from_utf8(stdin).ok()?.lines() {
                let w: Vec<&str> = l.split_whitespace().collect();
                steps.push(match w.as_slice() {
                    [] => continue,
                    ["addr", "add", cidr, "dev", dev] if ifname_ok(dev) => {
                        let (ip, p) = cidr.split_once('/')?;
                        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32)?;
                        Step::Addr {
                            ip: ip.parse().ok()?,
                            prefix,
                            dev: dev.to_string(),
                        }
                    }
                    ["link", "set", "dev", dev, "up"] if ifname_ok(dev) => Step::Up {
                        dev: dev.to_string(),
                    },
                    ["route", "replace", "default", "via", gw, "dev", dev] if ifname_ok(dev) => {
                        Step::DefaultVia {
                            gw: gw.parse().ok()?,
                            dev: dev.to_string(),
                        }
                    }
                    _ => return None,
                });
            }
            (!steps.is_empty()).then(|| Req::Inside {
                netns: ns.to_string(),
                steps,
            })
        }
        _ => None,
    }
}

/// `struct ifinfomsg`: family, type, index, flags, change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// Index of interface `name` in the calling thread's network namespace.
fn index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn open_ns(path: &str) -> io::Result<OwnedFd> {
    Ok(std::fs::File::open(path)?.into())
}

/// Messages of `req` for a socket in the right namespace; `None` when an
/// interface it names is not there (then `ip` runs and says so).
fn messages(req: &Req, seq0: u32, ns_fd: Option<i32>) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut seq = seq0;
    let mut push = |m: Msg| out.push(m.finish());
    match req {
        Req::AddVeth {
            host, peer, mac, ..
        } => {
            seq += 1;
            let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            let mut m = Msg::new(RTM_NEWLINK, flags, seq, &ifinfomsg(0, 0, 0));
            m.strz(IFLA_IFNAME, host);
            m.u32(IFLA_NUM_TX_QUEUES, 1);
            m.u32(IFLA_NUM_RX_QUEUES, 1);
            m.begin(IFLA_LINKINFO);
            m.strz(IFLA_INFO_KIND, "veth");
            m.begin(IFLA_INFO_DATA);
            m.begin(VETH_INFO_PEER);
            m.raw(&ifinfomsg(0, 0, 0));
            m.strz(IFLA_IFNAME, peer);
            m.u32(IFLA_NUM_TX_QUEUES, 1);
            m.u32(IFLA_NUM_RX_QUEUES, 1);
            m.attr(IFLA_ADDRESS, mac);
            m.u32(IFLA_NET_NS_FD, ns_fd? as u32);
            m.end();
            m.end();
            m.end();
            push(m);
        }
        Req::Enslave { dev, alias, master } => {
            seq += 1;
            let (i, b) = (index(dev)?, index(master)?);
            let mut m = Msg::new(
                RTM_NEWLINK,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                &ifinfomsg(i, IFF_UP, IFF_UP),
            );
            m.attr(IFLA_IFALIAS, alias.as_bytes());
            m.u32(IFLA_MASTER, b);
            push(m);
        }
        Req::Inside { steps, .. } => {
            for s in steps {
                seq += 1;
                match s {
                    Step::Addr { ip, prefix, dev } => {
                        let mut fixed = [0u8; 8];
                        fixed[0] = libc::AF_INET as u8;
                        fixed[1] = *prefix;
                        fixed[4..8].copy_from_slice(&index(dev)?.to_ne_bytes());
                        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
                        let mut m = Msg::new(RTM_NEWADDR, flags, seq, &fixed);
                        m.attr(IFA_LOCAL, &ip.octets());
                        m.attr(IFA_ADDRESS, &ip.octets());
                        push(m);
                    }
                    Step::Up { dev } => push(Msg::new(
                        RTM_NEWLINK,
                        NLM_F_REQUEST | NLM_F_ACK,
                        seq,
                        &ifinfomsg(index(dev)?, IFF_UP, IFF_UP),
                    )),
                    Step::DefaultVia { gw, dev } => {
                        // struct rtmsg: family, dst_len, src_len, tos, table,
                        // protocol, scope, type, flags.
                        let mut fixed = [0u8; 12];
                        fixed[0] = libc::AF_INET as u8;
                        fixed[4] = RT_TABLE_MAIN;
                        fixed[5] = RTPROT_BOOT;
                        fixed[7] = RTN_UNICAST;
                        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
                        let mut m = Msg::new(RTM_NEWROUTE, flags, seq, &fixed);
                        m.attr(RTA_GATEWAY, &gw.octets());
                        m.u32(RTA_OIF, index(dev)?);
                        push(m);
                    }
                }
            }
        }
    }
    Some(out)
}

/// Send `req`'s messages from the right namespace: the host's, or, for
/// [`Req::Inside`], the machine's (a thread of ours joins it, opens its
/// socket there and looks up interfaces there).
fn exec(req: &Req) -> Option<io::Result<()>> {
    // Every interface is looked up before anything is sent, so `None` (the
    // real program runs) never follows a request; the messages then go one
    // at a time and the first error stops the rest, as `ip -batch` does.
    let send = |ns_fd: Option<i32>| -> Option<io::Result<()>> {
        let seq0 = netlink::seq0();
        let msgs = messages(req, seq0, ns_fd)?;
        Some(netlink::socket(libc::NETLINK_ROUTE).and_then(|s| {
            for (i, m) in msgs.iter().enumerate() {
                netlink::request(s.as_raw_fd(), m, seq0 + i as u32, 1)?;
            }
            Ok(())
        }))
    };
    match req {
        Req::AddVeth { netns, .. } => match open_ns(netns) {
            Ok(ns) => send(Some(ns.as_raw_fd())),
            Err(_) => None,
        },
        Req::Enslave { .. } => send(None),
        Req::Inside { netns, .. } => {
            let ns = open_ns(netns).ok()?;
            std::thread::scope(|s| {
                let joined = std::thread::Builder::new()
                    .spawn_scoped(s, || {
                        // SAFETY: setns of this thread only, to a namespace
                        // file we hold open; the thread ends after the request.
                        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return None;
                        }
                        send(None)
                    })
                    .ok()? // no thread: the real nsenter runs
                    .join();
                // A panic may have come after a request went out: an error,
                // not a second try by the real program.
                Some(joined.unwrap_or_else(|_| {
                    Some(Err(io::Error::other("in-namespace request panicked")))
                }))
            })
            .flatten()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip` with `args` split at spaces.
    fn ip(args: &str) -> Cmd {
        Cmd::new("ip").args(args.split(' '))
    }

    #[test]
    fn parses_what_attach_runs() {
        let add = ip("link add mv7gn-0 numtxqueues 1 numrxqueues 1 type veth peer name eth0 numtxqueues 1 numrxqueues 1 address 02:6d:09:1f:e3:90 netns /r/run/netns/m");
        assert_eq!(
            parse(&add),
            Some(Req::AddVeth {
                host: "mv7gn-0".into(),
                peer: "eth0".into(),
                mac: [2, 0x6d, 9, 0x1f, 0xe3, 0x90],
                netns: "/r/run/netns/m".into(),
            })
        );
        let set = ip("link set dev mv7gn-0 alias moat:/r master mt7gn-lab up");
        assert!(matches!(parse(&set), Some(Req::Enslave { .. })));
        let inside = Cmd::new("nsenter")
            .args(["--net=/r/run/netns/m", "ip", "-batch", "-"])
            .stdin("addr add 10.1.0.2/24 dev eth0\nlink set dev eth0 up\nlink set dev lo up\nroute replace default via 10.1.0.254 dev eth0\n");
        let Some(Req::Inside { netns, steps }) = parse(&inside) else {
            panic!("not parsed")
        };
        assert_eq!(netns, "/r/run/netns/m");
        assert_eq!(steps.len(), 4);
        assert_eq!(
            steps[3],
            Step::DefaultVia {
                gw: Ipv4Addr::new(10, 1, 0, 254),
                dev: "eth0".into()
            }
        );
    }

    #[test]
    fn anything_else_runs_ip() {
        for c in [
            ip("link add x type bridge"),
            ip("link set dev x up"),
            ip("link add mv0 numtxqueues 1 numrxqueues 1 type veth peer name eth0 numtxqueues 1 numrxqueues 1 address zz:00:00:00:00:00 netns /n"),
            ip("link add a/b numtxqueues 1 numrxqueues 1 type veth peer name eth0 numtxqueues 1 numrxqueues 1 address 02:00:00:00:00:01 netns /n"),
            Cmd::new("nsenter")
                .args(["--net=/n", "ip", "-batch", "-"])
                .stdin("addr add 10.0.0.1/24 dev eth0\nlink set dev eth0 mtu 9000\n"),
            Cmd::new("nsenter")
                .args(["--net=/n", "ip", "-batch", "-"])
                .stdin("route add 10.0.0.0/8 via 10.0.0.1 dev eth0\n"),
            Cmd::new("nsenter").args(["--net=/n", "ip", "-batch", "-"]),
        ] {
            assert_eq!(parse(&c), None, "{c:?}");
        }
    }

    #[test]
    fn errors_read_like_ip() {
        let e = io::Error::from_raw_os_error(libc::EEXIST);
        assert_eq!(strerror(&e), "File exists");
    }
}
