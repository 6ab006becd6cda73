//! Host access behind small traits: command executor, cgroups (v1 hybrid and v2), mounts, processes. The only crate besides the runtime allowed to use unsafe.
pub mod busybox;
pub mod exec;
pub mod mount;
mod netlink;
pub mod nfnl;
pub mod rtnl;
