//! The little netlink both in-process paths need ([`crate::nfnl`] for
//! nftables set elements, [`crate::rtnl`] for links, addresses and routes):
//! a message builder, a socket, and the reading of acknowledgements.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

pub(crate) const NLM_F_REQUEST: u16 = 1;
pub(crate) const NLM_F_ACK: u16 = 4;
pub(crate) const NLM_F_REPLACE: u16 = 0x100;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;

/// A MAC address written `xx:xx:xx:xx:xx:xx` (two hex digits each).
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// One netlink message: header, the family's fixed header, attributes.
pub(crate) struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    pub(crate) fn new(ty: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend(0u32.to_ne_bytes()); // length, set by finish
        buf.extend(ty.to_ne_bytes());
        buf.extend(flags.to_ne_bytes());
        buf.extend(seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes()); // port id: the kernel's
        let mut m = Msg {
            buf,
            nests: Vec::new(),
        };
        m.raw(fixed);
        m
    }

    /// Bytes as they are (a fixed header inside a nested attribute), padded.
    pub(crate) fn raw(&mut self, data: &[u8]) {
        self.buf.extend(data);
        self.pad();
    }

    pub(crate) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend((len as u16).to_ne_bytes());
        self.buf.extend(ty.to_ne_bytes());
        self.raw(data);
    }

    pub(crate) fn strz(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(ty, &d);
    }

    pub(crate) fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    pub(crate) fn begin(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend(0u16.to_ne_bytes());
        self.buf.extend((ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub(crate) fn end(&mut self) {
        let at = self.nests.pop().expect("nested attribute begun");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// A netlink socket of `protocol` with a 5 s receive timeout, whose
/// acknowledgements carry only the request's header (`NETLINK_CAP_ACK`, so
/// an error about a large request still fits the receive buffer).
pub(crate) fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    let one: i32 = 1;
    // SAFETY: setsockopt with valid values of the right sizes.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // Kernels before 4.3 lack it: acks then carry the whole request, which
    // moat's requests (a few hundred bytes) fit in the receive buffer anyway.
    // SAFETY: as above.
    let _ = unsafe {
        libc::setsockopt(
            fd,
            SOL_NETLINK,
            NETLINK_CAP_ACK,
            (&one as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    Ok(sock)
}

/// A first sequence number for a request.
pub(crate) fn seq0() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1)
}

/// Send `msg` (one or more messages) on `fd`, then read one answer per
/// acknowledged message, numbered `seq0 + 1 ..= seq0 + acks`: the first
/// error wins (any error counts, whatever it answers: nf_tables reports a
/// failed commit against the batch's begin message); after it, whatever is
/// already queued is drained without waiting. The kernel handles the
/// messages within `send`, in order, so every answer is queued by then.
pub(crate) fn request(fd: i32, msg: &[u8], seq0: u32, acks: u32) -> io::Result<()> {
    // SAFETY: sending a buffer we own, of its own length.
    let n = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 16384];
    let mut seen = 0;
    let mut error: Option<io::Error> = None;
    while seen < acks {
        let flags = if error.is_some() {
            libc::MSG_DONTWAIT
        } else {
            0
        };
        // SAFETY: receiving into a buffer we own, of its own length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.unwrap_or(e));
        }
        let (n, mut at) = (n as usize, 0usize);
        while at + 16 <= n {
            let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
            let len = word(at) as usize;
            let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            let seq = word(at + 8);
            if len < 16 || at + len > n {
                break;
            }
            if ty == NLMSG_ERROR && len >= 20 {
                let code = word(at + 16) as i32;
                if code < 0 && error.is_none() {
                    error = Some(io::Error::from_raw_os_error(-code));
                }
                if seq > seq0 && seq <= seq0 + acks {
                    seen += 1;
                }
            }
            at += (len + 3) & !3;
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
