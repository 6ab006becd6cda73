//! QMP client (owned by the full-VM work; placeholder).
