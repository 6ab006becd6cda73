//! The desired state, as the user wrote it (after loading and validation), and
//! the resolved form with addresses allocated.
//!
//! `Project` is what the loader produces from moat's own format or from an
//! AnKLuMe folder: both map onto the same types. Fields keep the [`Loc`] of the
//! YAML node they came from where later stages (allocation, planning) may need
//! to point at them in an error.

use crate::diag::Loc;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Which file format a project was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Moat,
    Anklume,
}

/// A whole project: the desired state of one moat root.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Project {
    /// Project name (`project:` in moat.yml, else the folder name).
    pub name: String,
    pub format: Format,
    /// The folder holding the project files (relative paths resolve here).
    pub dir: PathBuf,
    pub addressing: Addressing,
    pub defaults: Defaults,
    /// Named image sources (`images:`), by name.
    pub images: BTreeMap<String, ImageSource>,
    /// All domains, enabled or not, by name.
    pub domains: BTreeMap<String, Domain>,
    pub policies: Vec<Policy>,
    pub reconcile: Reconcile,
    /// How to reach an Incus server (`incus:`); `None` = the local Unix socket.
    pub incus: Option<IncusConfig>,
}

/// Connection settings for the `incus` driver (`incus:` at the top level).
/// Paths are resolved against the project folder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IncusConfig {
    /// `https://host:port` of a remote server; `None` = the local Unix socket.
    pub url: Option<String>,
    /// Local Unix socket path (default `/var/lib/incus/unix.socket`).
    pub socket: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The server's certificate (pinned) when it is not signed by a known CA.
    pub server_cert: Option<PathBuf>,
    /// Existing Incus objects a domain adopts (`incus:` in a domain, as
    /// `moat import incus` writes it), by domain name.
    pub domains: BTreeMap<String, IncusAdopt>,
    /// Existing Incus instance a machine adopts (`incus: {instance: N}` in a
    /// machine), by machine full name.
    pub instances: BTreeMap<String, String>,
}

/// Names of existing Incus objects a domain stands for, instead of the ones
/// moat derives (`moat-<tag>-<domain>`, bridge `mt<tag>-<domain>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IncusAdopt {
    /// Incus project of the domain's instances.
    pub project: Option<String>,
    /// Bridge network (in Incus's `default` project): the domain's bridge name.
    pub network: Option<String>,
    /// The network's own address, when it is not the subnet's last usable one.
    pub gateway: Option<Ipv4Addr>,
}

impl IncusConfig {
    /// What domain `domain` adopts, if anything.
    pub fn adopted(&self, domain: &str) -> Option<&IncusAdopt> {
        self.domains.get(domain)
    }
}

impl Project {
    /// Enabled domains only, in name order.
    pub fn enabled_domains(&self) -> impl Iterator<Item = &Domain> {
        self.domains.values().filter(|d| d.enabled)
    }

    /// Every machine of every enabled domain, in (domain, machine) order.
    pub fn machines(&self) -> impl Iterator<Item = &Machine> {
        self.enabled_domains().flat_map(|d| d.machines.values())
    }

    /// Look a machine up by its full name (`<domain>-<machine>`).
    pub fn machine(&self, full_name: &str) -> Option<&Machine> {
        self.machines().find(|m| m.full_name == full_name)
    }

    /// The existing Incus objects domain `domain` adopts (`incus:` in the domain).
    pub fn incus_adopted(&self, domain: &str) -> Option<&IncusAdopt> {
        self.incus.as_ref().and_then(|i| i.adopted(domain))
    }
}

/// `addressing:`: how domain subnets are numbered (AnKLuMe's convention).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Addressing {
    /// First two octets, `"10.100"` by default.
    pub base: [u8; 2],
    /// Distance between trust zones in the second octet (default 10).
    pub zone_step: u8,
}

impl Default for Addressing {
    fn default() -> Self {
        Addressing {
            base: [10, 100],
            zone_step: 10,
        }
    }
}

/// `defaults:`: values machines and domains fall back to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Defaults {
    /// Image for machines that name none (`os_image` in AnKLuMe).
    pub image: String,
    pub trust_level: TrustLevel,
    /// Driver per machine type.
    pub driver: BTreeMap<MachineType, String>,
    pub cpus: Option<u32>,
    /// Bytes.
    pub memory: Option<u64>,
    /// Bytes.
    pub disk: Option<u64>,
    pub pids: Option<u32>,
}

impl Default for Defaults {
    fn default() -> Self {
        let mut driver = BTreeMap::new();
        driver.insert(MachineType::Container, "native".to_string());
        driver.insert(MachineType::Vm, "qemu".to_string());
        driver.insert(MachineType::Microvm, "qemu".to_string());
        Defaults {
            image: "busybox".into(),
            trust_level: TrustLevel::SemiTrusted,
            driver,
            cpus: None,
            memory: None,
            disk: None,
            pids: None,
        }
    }
}

/// Trust level of a domain; decides its address zone and what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrustLevel {
    Admin,
    Trusted,
    SemiTrusted,
    Untrusted,
    Disposable,
}

impl TrustLevel {
    pub const ALL: [TrustLevel; 5] = [
        TrustLevel::Admin,
        TrustLevel::Trusted,
        TrustLevel::SemiTrusted,
        TrustLevel::Untrusted,
        TrustLevel::Disposable,
    ];

    /// Zone index; the second octet is `base[1] + zone * zone_step`
    /// (admin 0, trusted 10, semi-trusted 20, untrusted 40, disposable 50).
    pub fn zone(self) -> u8 {
        match self {
            TrustLevel::Admin => 0,
            TrustLevel::Trusted => 1,
            TrustLevel::SemiTrusted => 2,
            TrustLevel::Untrusted => 4,
            TrustLevel::Disposable => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TrustLevel::Admin => "admin",
            TrustLevel::Trusted => "trusted",
            TrustLevel::SemiTrusted => "semi-trusted",
            TrustLevel::Untrusted => "untrusted",
            TrustLevel::Disposable => "disposable",
        }
    }

    pub fn parse(s: &str) -> Option<TrustLevel> {
        TrustLevel::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Untrusted and disposable domains may not hold privileged machines.
    pub fn allows_privileged(self) -> bool {
        !matches!(self, TrustLevel::Untrusted | TrustLevel::Disposable)
    }
}

/// Where a domain's machines may send traffic that leaves the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Masquerade to the host's uplink (default).
    #[default]
    Nat,
    /// No route out of the host.
    None,
}

/// Whether drift found between applies is only reported or also repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconcile {
    #[default]
    Report,
    Auto,
}

/// A domain: one network (bridge + subnet) and its machines.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Domain {
    pub name: String,
    pub description: String,
    pub trust_level: TrustLevel,
    pub enabled: bool,
    /// Default `ephemeral` of its machines (AnKLuMe: may be destroyed without --force).
    pub ephemeral: bool,
    /// Subnet override; `None` = allocated by the addressing convention.
    pub subnet: Option<Ipv4Net>,
    pub egress: Egress,
    /// Serve DHCP on the domain bridge.
    pub dhcp: bool,
    /// Profiles defined in this domain, by name.
    pub profiles: BTreeMap<String, Profile>,
    /// Default Incus cluster member for the domain's machines (`target:`).
    pub target: Option<String>,
    pub machines: BTreeMap<String, Machine>,
    /// Where the domain is defined (its file, or its key in moat.yml).
    pub loc: Option<Loc>,
}

/// A named bundle of settings machines can refer to (`profiles: [name]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Profile {
    pub name: String,
    /// Incus-style `config:` keys (e.g. `limits.cpu`).
    pub config: BTreeMap<String, String>,
    /// Incus-style devices: device name → key/value settings.
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    Container,
    Vm,
    Microvm,
}

impl MachineType {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineType::Container => "container",
            MachineType::Vm => "vm",
            MachineType::Microvm => "microvm",
        }
    }
}

/// VM accelerator (`accel:`): `auto` uses KVM when a probe shows it works, else TCG.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Full-VM firmware (`firmware:`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS: fastest to boot.
    #[default]
    Bios,
    /// OVMF.
    Uefi,
}

/// Full-VM display (`display:`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Display {
    /// Headless (serial console only).
    #[default]
    None,
    /// SPICE on a Unix socket (`moat console --gui`).
    Spice,
}

/// A USB device passed through to a VM, by vendor and product id (hex, e.g. `046d`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbDevice {
    pub vendor: String,
    pub product: String,
}

/// How a machine is attached to networks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A NIC on its domain's bridge (default).
    #[default]
    Domain,
    /// Shares the host's network namespace (admin trust level only).
    Host,
    /// Loopback only.
    None,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    OnFailure,
    Always,
}

/// A bind mount from the host into a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Host path (absolute, or relative to the project folder).
    pub source: String,
    /// Path inside the machine.
    pub target: String,
    pub readonly: bool,
}

/// A machine: system container, application container, VM or microVM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Machine {
    /// Short name inside its domain.
    pub name: String,
    /// Globally unique `<domain>-<machine>`.
    pub full_name: String,
    pub domain: String,
    pub description: String,
    pub kind: MachineType,
    /// Image reference: a name from `images:` or a built-in source (`busybox`, `debian/13`, ...).
    pub image: String,
    /// Driver name (`native`, `nspawn`, `qemu`, `firecracker`, `incus`), defaults applied.
    pub driver: String,
    pub cpus: Option<u32>,
    /// Bytes.
    pub memory: Option<u64>,
    /// Bytes.
    pub disk: Option<u64>,
    pub pids: Option<u32>,
    pub network: NetworkMode,
    /// Fixed address requested by the user (validated to lie in the domain subnet).
    pub ip: Option<Ipv4Addr>,
    /// May be destroyed without `--force` (AnKLuMe's `ephemeral`).
    pub ephemeral: bool,
    /// Starts from a fresh writable layer and vanishes when it stops.
    pub disposable: bool,
    pub privileged: bool,
    pub gpu: bool,
    pub profiles: Vec<String>,
    /// Incus-style config keys passed through (`limits.cpu`, `limits.memory`, ...).
    pub config: BTreeMap<String, String>,
    /// AnKLuMe `persistent:`: name → path inside the machine, backed by a host volume.
    pub persistent: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    /// cloud-init data (`user-data`, `meta-data`, `network-config`), as JSON.
    pub cloud_init: Option<serde_json::Value>,
    /// AnKLuMe provisioning roles and variables: kept, not acted on by moat.
    pub roles: Vec<String>,
    pub vars: serde_json::Value,
    pub weight: u32,
    pub restart: RestartPolicy,
    /// Command to run instead of the image's init/entrypoint.
    pub command: Option<Vec<String>>,
    /// Trust level of the machine's domain (copied here so drivers can apply
    /// the trust rules without the domain at hand).
    pub trust: TrustLevel,
    /// VM kernel: a path, or `auto` (configured, host /boot, fetched). `None` = auto.
    pub kernel: Option<String>,
    /// VM accelerator.
    pub accel: Accel,
    /// Full-VM firmware.
    pub firmware: Firmware,
    /// Full-VM display.
    pub display: Display,
    /// USB devices passed through to a VM.
    pub usb: Vec<UsbDevice>,
    /// Incus cluster member to place the machine on (machine's, else its domain's `target:`).
    pub target: Option<String>,
    /// A template is never started; it serves as the base of clones.
    pub template: bool,
    /// Made outside any project (`moat run`, clones: [`Machine::adhoc`]).
    /// Not part of the file format; the native driver keeps it in its
    /// record, so a plan never prunes such a machine even with no entry in
    /// the state store (a foreground `run --rm` makes none).
    #[serde(skip)]
    pub adhoc: bool,
    pub loc: Option<Loc>,
    /// Where `ip:` was written (for address errors); `None` when no `ip:` was given.
    pub ip_loc: Option<Loc>,
}

impl Machine {
    /// A machine outside any project (`moat run`, clones): a container of the
    /// `native` driver with no network, no limits and nothing AnKLuMe-specific.
    pub fn adhoc(name: &str, image: &str) -> Machine {
        Machine {
            name: name.into(),
            full_name: name.into(),
            domain: String::new(),
            description: String::new(),
            kind: MachineType::Container,
            image: image.into(),
            driver: "native".into(),
            cpus: None,
            memory: None,
            disk: None,
            pids: None,
            network: NetworkMode::None,
            ip: None,
            ip_loc: None,
            ephemeral: true,
            disposable: false,
            privileged: false,
            gpu: false,
            profiles: vec![],
            config: BTreeMap::new(),
            persistent: BTreeMap::new(),
            mounts: vec![],
            cloud_init: None,
            roles: vec![],
            vars: serde_json::Value::Null,
            weight: 1,
            restart: RestartPolicy::No,
            command: None,
            trust: TrustLevel::SemiTrusted,
            kernel: None,
            accel: Accel::Auto,
            firmware: Firmware::Bios,
            display: Display::None,
            usb: Vec::new(),
            target: None,
            template: false,
            adhoc: true,
            loc: None,
        }
    }
}

/// A policy opens a flow between two endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub from: Endpoint,
    pub to: Endpoint,
    pub ports: Ports,
    pub protocol: Protocol,
    pub bidirectional: bool,
    pub description: String,
    pub loc: Option<Loc>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Endpoint {
    Host,
    Domain(String),
    /// Full machine name.
    Machine(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ports {
    All,
    List(Vec<u16>),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Icmp,
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "source")]
pub enum ImageSource {
    /// The host's busybox-static.
    Busybox,
    /// `debian/<suite>`, built with mmdebstrap; `packages:` are added to it.
    Debian {
        suite: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        packages: Vec<String>,
    },
    /// `ubuntu/<suite>`, built with mmdebstrap; `packages:` are added to it.
    Ubuntu {
        suite: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        packages: Vec<String>,
    },
    /// A rootfs tarball (path).
    Tarball { path: String },
    /// A rootfs folder (path).
    Folder { path: String },
    /// An OCI image layout folder.
    OciLayout { path: String },
    /// An `oci-archive` tarball.
    OciArchive { path: String },
    /// A `docker-archive` tarball.
    DockerArchive { path: String },
    /// `oci:REF`, pulled from a registry.
    Oci { reference: String },
    /// A cloud disk image (qcow2/raw) for full VMs.
    CloudImage { path: String },
}

/// Addresses and other allocations, stable across applies (kept in the state store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// Domain name → subnet.
    pub subnets: BTreeMap<String, Ipv4Net>,
    /// Machine full name → address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// Machine full name → small stable number, used in host interface names.
    pub ifnums: BTreeMap<String, u32>,
}

/// A domain's resolved network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedNetwork {
    pub domain: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Host bridge name (<= 15 chars).
    pub bridge: String,
}

/// A machine's resolved network identity (only for `network: domain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedNic {
    pub machine: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// Host-side interface name (veth or tap, <= 15 chars).
    pub host_if: String,
}

/// A project with every allocation made: what the engine and drivers act on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resolved {
    pub project: Project,
    /// Identifies the moat root; part of every host resource name.
    pub root_tag: String,
    pub networks: BTreeMap<String, ResolvedNetwork>,
    /// Machine full name → NIC.
    pub nics: BTreeMap<String, ResolvedNic>,
    pub allocations: Allocations,
}
