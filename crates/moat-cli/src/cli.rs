//! The command-line definition. Kept apart from the code that runs commands so
//! the man page and shell completions are generated from this one source.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub const DEFAULT_ROOT: &str = "/var/lib/moat";

#[derive(Parser, Debug)]
#[command(
    name = "moat",
    version,
    about = "Isolated compartments (domains) of containers and VMs on one Linux host",
    long_about = "moat turns one Linux machine into isolated compartments: each domain is its own \
network, firewalled from every other domain, holding containers, VMs and microVMs. Describe them in \
moat.yml (or an AnKLuMe project folder) and run `moat apply`.",
    after_help = "Exit codes: 0 success, 1 an operation failed, 2 invalid project or usage, \
3 another apply holds the lock, 4 no such machine or object."
)]
pub struct Cli {
    /// Project file or folder (default: ./moat.yml, else ./anklume.yml)
    #[arg(short = 'f', long = "file", global = true, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// moat root: state, images and machines live here; every host resource name derives from it
    #[arg(long, global = true, env = "MOAT_ROOT", default_value = DEFAULT_ROOT, value_name = "DIR")]
    pub root: PathBuf,

    /// Less output on stderr (errors only)
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// More output on stderr (each host command)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Colour: auto (when stderr/stdout is a terminal and NO_COLOR is unset), always, never
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    /// Run in-process even when the root's daemon is running
    #[arg(long, global = true)]
    pub no_daemon: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the project files and print every problem found
    Validate(JsonArg),
    /// Show what `apply` would change (firewall, networks, images, machines)
    Plan(PlanArgs),
    /// Make the host match the project
    Apply(ApplyArgs),
    /// Show domains, machines and their state
    #[command(visible_alias = "ls")]
    Status(JsonArg),
    /// Delete machines (or whole domains) that moat created
    Destroy(DestroyArgs),
    /// Write a commented starter project
    Init(InitArgs),
    /// Start a machine
    Start(MachineArg),
    /// Stop a machine
    Stop(StopArgs),
    /// Stop then start a machine
    Restart(StopArgs),
    /// Run a command in a running machine; exits with the command's status
    Exec(ExecArgs),
    /// Open a shell in a running machine
    Shell(MachineArg),
    /// Show a machine's output
    Logs(LogsArgs),
    /// Run an image in a new machine, like `docker run`
    Run(RunArgs),
    /// Copy a machine in constant time (a new writable layer over the same image)
    Clone(CloneArgs),
    /// Manage snapshots of a machine's writable layer
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Manage images
    #[command(subcommand)]
    Image(ImageCmd),
    /// Guest kernels for microVMs (fetch, ls)
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// Convert another tool's configuration folder into a moat project
    #[command(subcommand)]
    Import(crate::import::ImportCmd),
    /// Attach to a full VM's serial console, an Incus machine's console, or the terminal of a container started with `run -t` (Ctrl-] leaves); or open a VM's display (--gui)
    Console(ConsoleArgs),
    /// Inspect domain networks and the firewall
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Serve the HTTP/JSON API on the root's socket (foreground), reconcile continuously
    Daemon(crate::daemon::DaemonArgs),
    /// Print the daemon's events as JSON lines
    Events(crate::daemon::EventsArgs),
    /// Print shell completions to stdout
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout
    Man,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct JsonArg {
    /// Machine-readable JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Machine-readable JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Only this domain
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Plan deletion of orphans (what moat created that the project no longer declares)
    #[arg(long)]
    pub prune: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Also delete orphans (resources moat created that the project no longer declares)
    #[arg(long)]
    pub prune: bool,
    /// Only this domain
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Print the plan and stop
    #[arg(long)]
    pub dry_run: bool,
    /// Machine operations run in parallel, at most this many at once
    #[arg(long, short = 'j', default_value_t = 4, value_name = "N")]
    pub jobs: usize,
    /// If another apply holds the lock, wait up to this many seconds instead of failing
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u64>,
    /// Machine-readable JSON report on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    /// Machine full name (`<domain>-<machine>`)
    #[arg(conflicts_with_all = ["domain", "all"])]
    pub machine: Option<String>,
    /// Every machine and the network of this domain
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Everything this root created (machines, networks, firewall)
    #[arg(long)]
    pub all: bool,
    /// Also machines marked `ephemeral: false`
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Folder to write moat.yml into (default: the current folder)
    pub dir: Option<PathBuf>,
    /// Overwrite an existing moat.yml
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct MachineArg {
    /// Machine full name (`<domain>-<machine>`)
    pub machine: String,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Machine full name (`<domain>-<machine>`)
    pub machine: String,
    /// Seconds to wait for a clean shutdown before killing
    #[arg(long, short = 't', default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Machine full name (`<domain>-<machine>`)
    pub machine: String,
    /// Allocate a terminal
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Keep stdin open and stream the output (implied by -t)
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Command and arguments
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Machine full name (`<domain>-<machine>`)
    pub machine: String,
    /// Keep printing new output (-F: -f is the global --file)
    #[arg(short = 'F', long)]
    pub follow: bool,
    /// Only the last N lines
    #[arg(short = 'n', long)]
    pub tail: Option<usize>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Remove the machine when it stops
    #[arg(long)]
    pub rm: bool,
    /// Start in the background and print the machine's name
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Domain to attach the machine to (none: no network)
    #[arg(long)]
    pub domain: Option<String>,
    /// Machine name (default: generated)
    #[arg(long)]
    pub name: Option<String>,
    /// Allocate a terminal (with -d: attach to it later with `moat console NAME`)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Driver: `native` (container, default) or `qemu` (the image as a microVM)
    #[arg(long)]
    pub driver: Option<String>,
    /// Image name or source (busybox, debian/bookworm, oci:REF, ...)
    pub image: String,
    /// Command and arguments (default: the image's)
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ConsoleArgs {
    /// Machine full name (`<domain>-<machine>`) of a running `type: vm` or Incus machine, or of a container started with `moat run -t [-d]`
    pub machine: String,
    /// Open the SPICE display (`display: spice`) with remote-viewer, or print its URI
    #[arg(long)]
    pub gui: bool,
    /// With --gui: only print the `spice+unix://` URI
    #[arg(long, requires = "gui")]
    pub print: bool,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    pub source: String,
    pub new: String,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a machine's writable layer
    Create {
        machine: String,
        name: Option<String>,
    },
    /// List a machine's snapshots
    Ls {
        machine: String,
        #[arg(long)]
        json: bool,
    },
    /// Bring a machine back to a snapshot
    Restore { machine: String, name: String },
    /// Delete a snapshot
    Rm { machine: String, name: String },
}

#[derive(Subcommand, Debug)]
pub enum KernelCmd {
    /// Download Debian's kernel package, unpack it and extract a PVH-bootable vmlinux
    Fetch {
        /// Package (its versioned dependency is fetched)
        #[arg(long, default_value = "linux-image-amd64")]
        package: String,
    },
    /// List fetched kernels
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List images
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Build an image from a source (busybox, debian/<suite>, ubuntu/<suite>)
    Build {
        /// Source, e.g. busybox or debian/bookworm
        source: String,
        /// Name to store it under (default: the source)
        #[arg(long)]
        name: Option<String>,
        /// Make a bootable VM disk (kernel, cloud-init, bootloader) for `type: vm` machines
        #[arg(long)]
        vm: bool,
    },
    /// Import an image (rootfs tarball or folder, OCI layout, oci-archive, docker-archive, oci:REF)
    Import {
        /// Path or oci:REF
        source: String,
        /// Name to store it under
        #[arg(long)]
        name: String,
        /// What the path holds (default: detected)
        #[arg(long, value_enum)]
        kind: Option<ImportKind>,
    },
    /// Remove an image
    Rm { name: String },
    /// Remove layers no image or machine uses
    Gc,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum ImportKind {
    Tarball,
    Folder,
    OciLayout,
    OciArchive,
    DockerArchive,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Print the nftables ruleset moat would apply
    Rules,
    /// Show bridges, addresses, attached machines and rule counters
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
