//! The keys each map of the format accepts, and the one table of fields that
//! are accepted but not yet acted on by any driver.

/// One accepted key. `moat_only` keys are ignored (with a warning) in AnKLuMe
/// projects: they are moat's additions to AnKLuMe's format.
pub(crate) struct Key {
    pub name: &'static str,
    pub moat_only: bool,
}

const fn b(name: &'static str) -> Key {
    Key {
        name,
        moat_only: false,
    }
}
const fn m(name: &'static str) -> Key {
    Key {
        name,
        moat_only: true,
    }
}

pub(crate) const TOP: &[Key] = &[
    b("schema_version"),
    b("defaults"),
    b("addressing"),
    b("nesting"),
    b("resource_policy"),
    b("gpu_policy"),
    b("ai_access_policy"),
    m("project"),
    m("description"),
    m("images"),
    m("cloud_init_templates"),
    m("reconcile"),
    m("incus"),
    m("domains"),
    m("policies"),
];

pub(crate) const DEFAULTS: &[Key] = &[
    b("os_image"),
    b("trust_level"),
    m("image"),
    m("driver"),
    m("cpus"),
    m("memory"),
    m("disk"),
    m("pids"),
];

pub(crate) const ADDRESSING: &[Key] = &[b("base"), b("zone_step")];

pub(crate) const DRIVER_DEFAULTS: &[Key] = &[m("container"), m("vm"), m("microvm")];

pub(crate) const DOMAIN: &[Key] = &[
    b("description"),
    b("trust_level"),
    b("enabled"),
    b("ephemeral"),
    b("profiles"),
    b("machines"),
    m("subnet"),
    m("egress"),
    m("dhcp"),
    m("target"),
    m("cloud_init"),
    m("incus"),
];

pub(crate) const PROFILE: &[Key] = &[b("description"), b("config"), b("devices")];

pub(crate) const MACHINE: &[Key] = &[
    b("description"),
    b("type"),
    b("os_image"),
    b("ip"),
    b("gpu"),
    b("config"),
    b("persistent"),
    b("roles"),
    b("vars"),
    b("weight"),
    b("ephemeral"),
    b("profiles"),
    b("gui"),
    b("workspace"),
    m("image"),
    m("driver"),
    m("cpus"),
    m("memory"),
    m("disk"),
    m("pids"),
    m("network"),
    m("disposable"),
    m("privileged"),
    m("restart"),
    m("command"),
    m("cloud_init"),
    m("mounts"),
    m("kernel"),
    m("accel"),
    m("firmware"),
    m("display"),
    m("usb"),
    m("target"),
    m("template"),
    m("incus"),
];

pub(crate) const POLICY: &[Key] = &[
    b("from"),
    b("to"),
    b("ports"),
    b("protocol"),
    b("bidirectional"),
    b("description"),
];

pub(crate) const POLICIES_TOP: &[Key] = &[b("policies")];

pub(crate) const IMAGE: &[Key] = &[
    m("source"),
    m("suite"),
    m("path"),
    m("reference"),
    m("packages"),
];

/// `incus:` in a domain: existing Incus objects it adopts.
pub(crate) const INCUS_DOMAIN: &[Key] = &[m("project"), m("network"), m("gateway")];

/// `incus:` in a machine: the existing instance it adopts.
pub(crate) const INCUS_MACHINE: &[Key] = &[m("instance")];

pub(crate) const INCUS: &[Key] = &[
    m("url"),
    m("socket"),
    m("client_cert"),
    m("client_key"),
    m("server_cert"),
];

pub(crate) const USB: &[Key] = &[m("vendor"), m("product")];

pub(crate) const MOUNT: &[Key] = &[m("source"), m("target"), m("readonly")];

pub(crate) const CLOUD_INIT: &[Key] = &[
    m("user-data"),
    m("meta-data"),
    m("network-config"),
    m("template"),
];

/// Fields moat accepts but no driver acts on yet: key → what happens instead.
///
/// The loader prints ONE warning per key present in a project (at its first
/// place, with how many places use it). A driver that starts acting on a field
/// removes its line here; nothing else needs to change.
pub const NOT_ACTED_ON: &[(&str, &str)] = &[
    (
        "roles",
        "AnKLuMe provisioning roles are kept, but moat runs no provisioning",
    ),
    (
        "vars",
        "provisioning variables are kept, but moat runs no provisioning",
    ),
    (
        "weight",
        "resource weights are not turned into CPU or memory shares",
    ),
    ("gpu", "no GPU is passed to machines"),
    ("gui", "no display is forwarded from machines"),
    ("workspace", "no desktop workspace placement"),
    (
        "persistent",
        "no persistent volumes are created; use `mounts:` for host folders",
    ),
    ("disk", "disk sizes are not enforced"),
    (
        "profiles",
        "profile `config:` and `devices:` are not applied to machines",
    ),
    (
        "config",
        "Incus config keys other than limits.cpu and limits.memory are not applied",
    ),
    (
        "nesting",
        "instance names are never prefixed by nesting level",
    ),
    (
        "resource_policy",
        "no automatic CPU/memory split between machines",
    ),
    ("gpu_policy", "no GPU sharing policy is enforced"),
    ("ai_access_policy", "no AI access switching is enforced"),
];
