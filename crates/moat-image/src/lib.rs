//! Image store: content-addressed layers, per-machine writable layers (overlayfs / btrfs), image sources
