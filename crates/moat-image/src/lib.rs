//! Image store: content-addressed layers, images (ordered layers + run config), and per-machine
//! root filesystems (overlayfs writable layer over the shared read-only layers).
//!
//! Data flow: an [`ImageSource`](moat_core::model::ImageSource) is turned by `sources` (busybox,
//! mmdebstrap, tar, folder) or `oci` / `pull` (OCI layout, oci-archive, docker-archive,
//! registry) into layers unpacked under `<root>/images/layers/` and an [`Image`] manifest
//! ([`store`]). [`MachineFs`] stacks an image's layers under a machine's own writable layer and
//! mounts the result; the runtime gets that folder and the image's [`ImageConfig`].
//! See docs/images.md for the layout and the clone/snapshot/disposable mechanics.

pub mod btrfs;
pub mod error;
pub mod layer;
pub mod machine;
pub mod oci;
pub mod progress;
pub mod pull;
pub mod sources;
pub mod store;

pub use error::{ImageError, Result};
pub use machine::{Backend, MachineFs, MachineFsState, OverlaySpec, SnapshotInfo};
pub use progress::{NoProgress, Progress, StderrProgress};
pub use store::{describe_source, GcReport, Image, ImageConfig, ImageStore, LayerInfo};
