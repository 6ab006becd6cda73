//! Domain networks: bridges, veths/taps, addresses, and the nftables ruleset (rendered by a pure function, applied atomically)
