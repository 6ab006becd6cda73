//! Who is calling and what they may do.
//!
//! Each connection's peer is read from the kernel (`SO_PEERCRED`: uid, gid,
//! pid), its supplementary groups from `/proc/<pid>/status`. Root and members
//! of the daemon's group may change things; everyone else gets what
//! `--others` says (read-only or nothing). The socket's mode (0660, owner
//! root:group) is the first gate, this check the second: with `--others read`
//! the socket is 0666 so others can reach the read-only endpoints.

use serde::Serialize;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

/// The process at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Supplementary groups (empty when the process is gone).
    pub groups: Vec<u32>,
}

impl Peer {
    /// The peer of a connected Unix stream.
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a properly sized, writable ucred and `len` holds
        // its size, as SO_PEERCRED requires; the fd is open for the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Peer {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
            groups: proc_groups(cred.pid),
        })
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Supplementary groups of a live process (its `Groups:` line).
fn proc_groups(pid: i32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return vec![];
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What users outside root and the group get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Others {
    /// Read-only endpoints (status, plan, logs, events, ...).
    Read,
    /// Nothing.
    None,
}

/// What an endpoint needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    Read,
    Write,
}

/// The authorization rules of one daemon.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The group whose members may change things (`None`: root only).
    pub group: Option<(String, u32)>,
    pub others: Others,
}

/// Why a request was refused (the 403's `reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Policy {
    /// Whether `peer` may call an endpoint that needs `need`.
    pub fn check(&self, peer: &Peer, need: Need) -> Result<(), Refusal> {
        if peer.uid == 0 {
            return Ok(());
        }
        if let Some((name, gid)) = &self.group {
            if peer.in_group(*gid) {
                return Ok(());
            }
            let who = format!("uid {} is not root and not in group '{name}'", peer.uid);
            return match (need, self.others) {
                (Need::Read, Others::Read) => Ok(()),
                (Need::Read, Others::None) => Err(Refusal(format!(
                    "{who}; this daemon gives other users nothing (--others none)"
                ))),
                (Need::Write, _) => Err(Refusal(format!(
                    "{who}: only they may change things; ask an administrator to add you to '{name}'"
                ))),
            };
        }
        let who = format!(
            "uid {} is not root (this daemon has no admin group)",
            peer.uid
        );
        match (need, self.others) {
            (Need::Read, Others::Read) => Ok(()),
            (Need::Read, Others::None) => Err(Refusal(format!(
                "{who}; other users get nothing (--others none)"
            ))),
            (Need::Write, _) => Err(Refusal(format!(
                "{who}: only root may change things; start the daemon with --group GROUP to let a group in"
            ))),
        }
    }
}

/// The gid of a group name (from /etc/group).
pub fn group_gid(name: &str) -> Option<u32> {
    let s = std::fs::read_to_string("/etc/group").ok()?;
    s.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_may_do_everything() {
        let p = Policy {
            group: None,
            others: Others::None,
        };
        assert!(p.check(&peer(0, 0, &[]), Need::Write).is_ok());
    }

    #[test]
    fn group_members_write_others_read_or_nothing() {
        let mut p = Policy {
            group: Some(("moat".into(), 990)),
            others: Others::Read,
        };
        assert!(p.check(&peer(1000, 1000, &[990]), Need::Write).is_ok());
        assert!(p.check(&peer(1000, 990, &[]), Need::Write).is_ok());
        assert!(p.check(&peer(1001, 1001, &[]), Need::Read).is_ok());
        let r = p.check(&peer(1001, 1001, &[]), Need::Write).unwrap_err();
        assert!(r.0.contains("not in group 'moat'"), "{}", r.0);
        p.others = Others::None;
        assert!(p.check(&peer(1001, 1001, &[]), Need::Read).is_err());
        assert!(p.check(&peer(1000, 1000, &[990]), Need::Read).is_ok());
    }

    #[test]
    fn no_group_means_root_only_writes() {
        let p = Policy {
            group: None,
            others: Others::Read,
        };
        assert!(p.check(&peer(1000, 1000, &[]), Need::Read).is_ok());
        let r = p.check(&peer(1000, 1000, &[]), Need::Write).unwrap_err();
        assert!(r.0.contains("--group"), "{}", r.0);
    }

    #[test]
    fn peer_of_a_socketpair_is_us() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        // SAFETY: getuid has no preconditions.
        assert_eq!(p.uid, unsafe { libc::getuid() });
        assert_eq!(p.pid, std::process::id() as i32);
    }
}
