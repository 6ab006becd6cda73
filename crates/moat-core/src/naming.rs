//! Names of host resources, all derived from the moat root so that two roots
//! (two installations, or parallel test runs) never collide, and the name rules
//! that keep them within the kernel's 15-character interface-name limit.
//!
//! | resource            | name                     | example        |
//! |---------------------|--------------------------|----------------|
//! | domain bridge       | `mt<tag>-<domain>`       | `mtk3q-pro`    |
//! | machine host iface  | `mv<tag>-<ifnum>`        | `mvk3q-17`     |
//! | nftables tables     | `moat_<tag>` (inet, bridge) |             |
//!
//! `<tag>` is 3 base-36 characters of a hash of the root path. Interfaces also
//! carry an alias (`moat:<root>`) so moat can tell its own from another root's.

use sha2::{Digest, Sha256};

/// Longest domain name: `mt` + 3 + `-` + 9 = 15 characters.
pub const MAX_DOMAIN_LEN: usize = 9;
/// Longest full machine name (`<domain>-<machine>`): one DNS label.
pub const MAX_FULL_NAME_LEN: usize = 63;
/// Linux IFNAMSIZ - 1.
pub const MAX_IFNAME_LEN: usize = 15;

/// 3 base-36 characters identifying a moat root.
pub fn root_tag(root: &str) -> String {
    let digest = Sha256::digest(root.as_bytes());
    let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % (36 * 36 * 36);
    let alphabet = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [0u8; 3];
    for c in out.iter_mut().rev() {
        *c = alphabet[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn bridge_name(tag: &str, domain: &str) -> String {
    format!("mt{tag}-{domain}")
}

pub fn host_if_name(tag: &str, ifnum: u32) -> String {
    format!("mv{tag}-{ifnum}")
}

pub fn nft_table(tag: &str) -> String {
    format!("moat_{tag}")
}

/// Alias stamped on every interface moat creates, naming its root.
pub fn if_alias(root: &str) -> String {
    format!("moat:{root}")
}

/// DNS-label rule for domain, machine and profile names: lowercase letters,
/// digits and `-`, starting with a letter, not ending with `-`.
/// Returns what is wrong, or `None` when the name is fine.
pub fn check_dns_label(name: &str, max_len: usize) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > max_len {
        return Some(format!(
            "is {} characters long, at most {max_len} are allowed",
            name.len()
        ));
    }
    let first = name.as_bytes()[0];
    if !first.is_ascii_lowercase() {
        return Some("must start with a lowercase letter".into());
    }
    if name.ends_with('-') {
        return Some("must not end with '-'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "contains '{c}': only lowercase letters, digits and '-' are allowed"
        ));
    }
    None
}

/// Locally administered unicast MAC derived from the root tag and machine full name.
pub fn mac_for(tag: &str, full_name: &str) -> [u8; 6] {
    let d = Sha256::digest(format!("{tag}/{full_name}").as_bytes());
    [0x02, 0x6d, d[0], d[1], d[2], d[3]]
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz() {
        let tag = root_tag("/var/lib/moat");
        assert_eq!(tag.len(), 3);
        assert!(bridge_name(&tag, "abcdefghi").len() <= MAX_IFNAME_LEN);
        assert!(host_if_name(&tag, 99_999_999).len() <= MAX_IFNAME_LEN);
    }

    #[test]
    fn tags_differ_per_root() {
        assert_ne!(root_tag("/a"), root_tag("/b"));
        assert_eq!(root_tag("/a"), root_tag("/a"));
    }

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("ai-tools", 9).is_none());
        assert!(check_dns_label("Pro", 9).is_some());
        assert!(check_dns_label("1pro", 9).is_some());
        assert!(check_dns_label("pro-", 9).is_some());
        assert!(check_dns_label("pro_x", 9).is_some());
        assert!(check_dns_label("abcdefghij", 9).is_some());
    }
}
