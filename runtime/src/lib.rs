//! Runs OCI containers for one host: turns an image config + instance settings into a runtime
//! spec, mounts overlay root filesystems, plumbs the network, and runs each container under a
//! small single-threaded shim (libcontainer must not run inside a multi-threaded daemon).
//! Knows nothing of apps, the API or the proxy.

pub mod cgroup;
pub mod exec;
pub mod network;
pub mod rootfs;
pub mod seccomp;
pub mod seccomp_bpf;
pub mod shim;
pub mod spec;
pub mod user;
pub mod userns;
pub mod volume;
