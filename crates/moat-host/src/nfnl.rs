//! `nft -f -` of set-element changes, done in-process over netlink.
//!
//! moat adds and removes a machine's anti-spoofing entries with a script of
//! `add element` / `delete element` lines (see moat-net's `update_script`).
//! Run by the `nft` program, such a transaction costs more than its work: the
//! kernel flushes the transaction clean-up (an RCU grace period, 10 to 15 ms
//! here) when a netfilter netlink socket that committed is closed, and `nft`
//! closes its socket before it exits. [`run_script`] sends the same
//! transaction as one netlink batch, waits for the kernel's answer, and
//! leaves the last close of the socket to a short-lived grandchild process,
//! so the caller does not wait for the grace period. The grandchild closes
//! it 200 ms later, when the clean-up is done: the release holds the
//! nf_tables commit mutex while it waits, and registering a network
//! interface (the machine's veth, created right after) needs that mutex.
//!
//! Only what moat writes is understood: lines of the form
//! `add|delete element FAMILY TABLE SET { ELEM, ... }` on moat's `inet` or
//! `bridge` tables (`moat_*`) and sets whose key types are known
//! ([`MOAT_SETS`]), elements made of `"ifname"`, MAC and IPv4 address
//! fields joined by ` . ` in the set's order, and an optional
//! `comment "..."`. Anything else returns `None` and the real `nft` runs.
//!
//! The grandchild keeps only the socket and a pipe (every other inherited
//! descriptor is closed at once, so no lock or connection outlives its
//! owner's use) and is re-parented to init, or to the nearest subreaper.

use crate::netlink::{self, Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
/// libnftnl's user-data type of an element comment.
const UDATA_SET_ELEM_COMMENT: u8 = 0;
const IFNAMSIZ: usize = 16;

/// moat's sets whose elements change in place, with the fields of their
/// keys: `i` an `ifname`, `e` an `ether_addr`, `a` an `ipv4_addr`.
const MOAT_SETS: [(&str, &str); 5] = [
    ("state", "i"),
    ("ports", "i"),
    ("ip_ok", "iea"),
    ("mac_ok", "ie"),
    ("dhcp_ok", "ie"),
];
/// One `add element` / `delete element` line.
#[derive(Debug, PartialEq, Eq)]
struct Change {
    add: bool,
    family: u8,
    table: String,
    set: String,
    /// Key bytes (fields padded to 4 bytes, as nftables concatenations are)
    /// and comment.
    elements: Vec<(Vec<u8>, Option<String>)>,
}

/// Parse a script of element changes; `None` when any line is something else.
fn parse(script: &str) -> Option<Vec<Change>> {
    let mut out = Vec::new();
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (head, rest) = line.split_once('{')?;
        let body = rest.trim_end().strip_suffix('}')?;
        let words: Vec<&str> = head.split_whitespace().collect();
        let [verb, "element", family, table, set] = words.as_slice() else {
            return None;
        };
        let add = match *verb {
            "add" => true,
            "delete" => false,
            _ => return None,
        };
        let family = match *family {
            "inet" => libc::NFPROTO_INET as u8,
            "bridge" => libc::NFPROTO_BRIDGE as u8,
            _ => return None,
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() < 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !name_ok(table) || !name_ok(set) || !table.starts_with("moat_") {
            return None;
        }
        // The key is built from the syntax of its fields, so only sets whose
        // type is known are taken: moat's own (moat-net's render.rs).
        let fields = MOAT_SETS.iter().find(|(n, _)| n == set)?.1;
        let mut elements = Vec::new();
        for e in body.split(',').map(str::trim) {
            let (key, comment) = match e.split_once(" comment ") {
                Some((k, c)) => {
                    let c = c.trim().strip_prefix('"')?.strip_suffix('"')?;
                    if c.contains('"') || c.len() > 127 || (!add && !c.is_empty()) {
                        return None;
                    }
                    (k, Some(c.to_string()))
                }
                None => (e, None),
            };
            let mut bytes = Vec::new();
            let mut kinds = String::new();
            for field in key.split(" . ").map(str::trim) {
                let (kind, b) = field_bytes(field)?;
                kinds.push(kind);
                bytes.extend(b);
            }
            if kinds != fields {
                return None;
            }
            elements.push((bytes, comment));
        }
        out.push(Change {
            add,
            family,
            table: table.to_string(),
            set: set.to_string(),
            elements,
        });
    }
    (!out.is_empty()).then_some(out)
}

/// One key field and its kind: `"ifname"` (`i`, 16 bytes), a MAC (`e`, 6,
/// padded to 8) or an IPv4 address (`a`, 4, network order).
fn field_bytes(f: &str) -> Option<(char, Vec<u8>)> {
    if let Some(name) = f.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['"', '*']) {
            return None;
        }
        let mut b = name.as_bytes().to_vec();
        b.resize(IFNAMSIZ, 0);
        return Some(('i', b));
    }
    if let Ok(ip) = f.parse::<Ipv4Addr>() {
        return Some(('a', ip.octets().to_vec()));
    }
    if let Some(mac) = netlink::parse_mac(f) {
        let mut b = mac.to_vec();
        b.resize(8, 0);
        return Some(('e', b));
    }
    None
}

/// nfnetlink's fixed header: family, version 0, resource id (big endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

/// The whole transaction: batch begin, one message per change, batch end.
/// Returns the bytes and how many acknowledgements to expect.
fn batch(changes: &[Change], seq0: u32) -> (Vec<u8>, u32) {
    let mut out = Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq0,
        &nfgenmsg(0, NFNL_SUBSYS_NFTABLES),
    )
    .finish();
    let mut seq = seq0;
    for c in changes {
        seq += 1;
        let (ty, flags) = if c.add {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        };
        let mut m = Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            seq,
            &nfgenmsg(c.family, 0),
        );
        m.strz(NFTA_SET_ELEM_LIST_TABLE, &c.table);
        m.strz(NFTA_SET_ELEM_LIST_SET, &c.set);
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (key, comment) in &c.elements {
            m.begin(NFTA_LIST_ELEM);
            m.begin(NFTA_SET_ELEM_KEY);
            m.attr(NFTA_DATA_VALUE, key);
            m.end();
            if let Some(c) = comment {
                let mut ud = vec![UDATA_SET_ELEM_COMMENT, (c.len() + 1) as u8];
                ud.extend(c.as_bytes());
                ud.push(0);
                m.attr(NFTA_SET_ELEM_USERDATA, &ud);
            }
            m.end();
        }
        m.end();
        out.extend(m.finish());
    }
    out.extend(
        Msg::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq + 1,
            &nfgenmsg(0, NFNL_SUBSYS_NFTABLES),
        )
        .finish(),
    );
    (out, changes.len() as u32)
}

/// Run `script` (what `nft -f -` would read) in-process; `None` when it is
/// not a script of element changes. `Some(Err)` carries the kernel's error:
/// the transaction was not applied, none of it.
pub fn run_script(script: &str) -> Option<io::Result<()>> {
    let changes = parse(script)?;
    Some(commit(&changes))
}

fn commit(changes: &[Change]) -> io::Result<()> {
    let sock = netlink::socket(NETLINK_NETFILTER)?;
    let seq0 = netlink::seq0();
    let (msg, acks) = batch(changes, seq0);
    let result = netlink::request(sock.as_raw_fd(), &msg, seq0, acks);
    close_later(sock);
    result
}

/// How long the grandchild holds the socket after this process let go.
const LAST_CLOSE_DELAY_MS: libc::c_long = 200;

/// Close the socket without waiting: the kernel flushes the committed
/// transaction's clean-up (an RCU grace period) when the last reference to
/// a netfilter socket goes. A grandchild holds a copy until this process
/// has closed its own, waits [`LAST_CLOSE_DELAY_MS`] more (the clean-up has
/// then run on its own) and exits, which closes it; its parent exits at
/// once and is reaped here, the grandchild is re-parented to init.
fn close_later(sock: OwnedFd) {
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 into a two-element array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return; // dropping `sock` closes it here: slower, still correct
    }
    // SAFETY: the pipe ends were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    // SAFETY: between fork and _exit the children only make async-signal-safe
    // calls (fork, close_range/close, read, nanosleep, _exit), on
    // descriptors they inherited.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            if libc::fork() != 0 {
                libc::_exit(0);
            }
            // Keep only the socket and the pipe's read end: an inherited
            // copy of anything else (a locked apply.lock, a client's
            // connection in the daemon) would outlive this process's use.
            close_all_but(sock.as_raw_fd(), r.as_raw_fd());
            let mut b = 0u8;
            while libc::read(r.as_raw_fd(), (&mut b as *mut u8).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            // The release of the socket takes the nf_tables commit mutex
            // while it waits for that clean-up; network interfaces created
            // meanwhile (a machine's veth, right after) need that mutex to
            // register. Later, the clean-up has run on its own and the
            // release is quick.
            let later = libc::timespec {
                tv_sec: 0,
                tv_nsec: LAST_CLOSE_DELAY_MS * 1_000_000,
            };
            libc::nanosleep(&later, std::ptr::null_mut());
            libc::_exit(0);
        }
    }
    drop(sock);
    drop(w);
    drop(r);
    if pid > 0 {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
}

/// Close every descriptor but `a` and `b` (async-signal-safe: raw
/// close_range(2) calls, with a bounded loop where it is missing).
unsafe fn close_all_but(a: i32, b: i32) {
    let close = |first: u32, last: u32| {
        // SAFETY: close_range only closes descriptors of this process.
        if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } != 0 {
            for fd in first..=last.min(4095) {
                // SAFETY: as above, one descriptor at a time.
                unsafe { libc::close(fd as i32) };
            }
        }
    };
    let mut next = 0u32;
    for keep in [a.min(b) as u32, a.max(b) as u32] {
        if keep > next {
            close(next, keep - 1);
        }
        next = keep + 1;
    }
    close(next, u32::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_moat_writes() {
        let s = "delete element inet moat_7gn state { \"8295ba232613781\" }\n\
                 add element inet moat_7gn state { \"0f0530bf4e4eaf8\" comment \"moat 0f05 25\" }\n\
                 add element bridge moat_7gn ip_ok { \"mv7gn-2\" . 02:6d:fa:4f:8d:c1 . 10.233.0.2, \"mv7gn-3\" . 02:6d:6d:d6:b5:e2 . 10.233.1.1 }\n";
        let c = parse(s).expect("parsed");
        assert_eq!(c.len(), 3);
        assert!(!c[0].add && c[1].add && c[2].add);
        assert_eq!(c[0].family, libc::NFPROTO_INET as u8);
        assert_eq!(c[2].family, libc::NFPROTO_BRIDGE as u8);
        assert_eq!(c[0].elements[0].0.len(), 16);
        assert_eq!(&c[0].elements[0].0[..15], b"8295ba232613781");
        assert_eq!(c[1].elements[0].1.as_deref(), Some("moat 0f05 25"));
        // ifname (16) . MAC (6 + 2 padding) . IPv4 (4)
        let k = &c[2].elements[1].0;
        assert_eq!(k.len(), 28);
        assert_eq!(&k[16..24], &[2, 0x6d, 0x6d, 0xd6, 0xb5, 0xe2, 0, 0]);
        assert_eq!(&k[24..], &[10, 233, 1, 1]);
    }

    #[test]
    fn anything_else_goes_to_nft() {
        for s in [
            "",
            "flush ruleset",
            "add table inet t",
            "add element ip t s { 1.2.3.4 }",
            "add element inet t s { 1.2.3.4/24 }",
            "add element inet t s { \"much-too-long-ifname\" }",
            "add element inet t s { \"eth*\" }",
            "add element inet t s { 10.0.0.1 : drop }",
            "add element inet t; s { 1.2.3.4 }",
            "delete element inet moat_t state { \"a\" comment \"x\" }",
            // Not moat's: a table or set whose key type is not known.
            "add element inet t ports { \"a\" }",
            "add element inet moat_t other { \"a\" }",
            // A key that does not fit the set's type.
            "add element bridge moat_t mac_ok { 02:00:00:00:00:01 }",
            "add element bridge moat_t ports { 10.0.0.1 }",
            "add element bridge moat_t ip_ok { \"a\" . 10.0.0.1 . 02:00:00:00:00:01 }",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }

    #[test]
    fn batch_layout() {
        let c = parse("delete element bridge moat_t ports { \"mv0-1\" }").unwrap();
        let (b, acks) = batch(&c, 100);
        assert_eq!(acks, 1);
        // begin (20) + message + end (20); lengths are 4-aligned and add up.
        let mut at = 0;
        let mut types = Vec::new();
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            types.push(u16::from_ne_bytes(b[at + 4..at + 6].try_into().unwrap()));
            assert!(len.is_multiple_of(4));
            at += len;
        }
        assert_eq!(at, b.len());
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                (10 << 8) | NFT_MSG_DELSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
