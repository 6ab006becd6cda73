//! moat's built-in container runtime (youki's libcontainer) and the per-machine supervisor
