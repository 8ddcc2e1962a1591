//! Removing a container whose init has exited. libcontainer's `delete` builds a cgroup manager
//! to remove the cgroup, and on cgroup v1 that reads `/proc/self/mountinfo` once per controller
//! (a dozen times, each through a freshly mounted, verified procfs): a millisecond or two of the
//! time from exit to gone. The plain case (stopped, no poststop hooks, no Intel RDT, cgroupfs)
//! needs only the cgroup directories and the state directory removed: done here with one read
//! of the mount table. Anything else goes through libcontainer.

use libcontainer::config::YoukiConfig;
use libcontainer::container::{Container, ContainerStatus};

use crate::cgroup;

/// Removes `container` (its processes, cgroup and state directory) once its init has exited;
/// containers in any other state are force-deleted by libcontainer.
pub fn remove_exited(container: &mut Container) -> Result<(), String> {
    let plain = container.refresh_status().is_ok()
        && container.status() == ContainerStatus::Stopped
        && !container.systemd()
        && container.intel_rdt_dir().is_none()
        && container.clean_up_intel_rdt_subdirectory().is_none();
    let config = if plain { YoukiConfig::load(&container.root).ok() } else { None };
    let Some(config) = config.filter(|c| c.hooks.as_ref().is_none_or(|h| h.poststop().is_none())) else {
        return container.delete(true).map_err(|e| e.to_string());
    };
    let path = config.cgroup_path.to_string_lossy();
    cgroup::kill_and_remove(&path).map_err(|e| format!("cannot remove cgroup {path}: {e}"))?;
    match std::fs::remove_dir_all(&container.root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot remove container state {}: {e}", container.root.display()))
        }
        _ => Ok(()),
    }
}
