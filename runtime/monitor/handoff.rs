//! What the shim hands the monitor when it execs it: the instance's settings and the
//! descriptors it keeps open across the exec, as environment variables (the command line stays
//! the shim's, so `ps` and the tools that look for `deliverous shim --id …` still find it).

use std::ffi::OsString;
use std::path::PathBuf;

/// One instance's monitor settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// Container id, for the final `shim-finish`.
    pub id: String,
    /// libcontainer's state root, for the final `shim-finish`.
    pub state_root: PathBuf,
    pub log: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// The control socket's path (removed at the end; the bound socket is `listener`).
    pub socket: PathBuf,
    pub exit_file: PathBuf,
    /// The container's cgroup, to read OOM kills from and to kill every process of.
    pub cgroups_path: String,
    /// The container's init, our child.
    pub pid: i32,
    /// Read ends of the container's stdout and stderr pipes, when they go to the log.
    pub stdout_fd: Option<i32>,
    pub stderr_fd: Option<i32>,
    /// The bound, listening control socket.
    pub listener_fd: i32,
    /// An `O_PATH` descriptor of the `deliverous` binary that started us (the one that can
    /// delete the container, even once an upgrade replaced the file).
    pub exe_fd: i32,
}

const PREFIX: &str = "DLV_SHIM_";

impl Handoff {
    /// The environment that carries this hand-off.
    pub fn to_env(&self) -> Vec<(String, OsString)> {
        let opt = |v: Option<i32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        [
            ("ID", OsString::from(&self.id)),
            ("STATE_ROOT", self.state_root.clone().into_os_string()),
            ("LOG", self.log.clone().into_os_string()),
            ("LOG_MAX_BYTES", self.log_max_bytes.to_string().into()),
            ("LOG_KEEP", self.log_keep.to_string().into()),
            ("SOCKET", self.socket.clone().into_os_string()),
            ("EXIT_FILE", self.exit_file.clone().into_os_string()),
            ("CGROUPS_PATH", OsString::from(&self.cgroups_path)),
            ("PID", self.pid.to_string().into()),
            ("STDOUT_FD", opt(self.stdout_fd).into()),
            ("STDERR_FD", opt(self.stderr_fd).into()),
            ("LISTENER_FD", self.listener_fd.to_string().into()),
            ("EXE_FD", self.exe_fd.to_string().into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{PREFIX}{k}"), v))
        .collect()
    }

    /// Reads the hand-off from `var` (the process environment, in the monitor).
    pub fn from_env(var: impl Fn(&str) -> Option<OsString>) -> Result<Handoff, String> {
        let raw = |k: &str| var(&format!("{PREFIX}{k}")).ok_or_else(|| format!("{PREFIX}{k} is not set"));
        let text =
            |k: &str| raw(k)?.into_string().map_err(|v| format!("{PREFIX}{k} is not UTF-8: {}", v.to_string_lossy()));
        let num = |k: &str| -> Result<i64, String> {
            let v = text(k)?;
            v.parse().map_err(|_| format!("{PREFIX}{k}: expected a number, found {v:?}"))
        };
        let fd = |k: &str| -> Result<Option<i32>, String> {
            if text(k)? == "-" {
                return Ok(None);
            }
            num(k).and_then(|n| {
                i32::try_from(n).ok().filter(|n| *n >= 0).map(Some).ok_or(format!("{PREFIX}{k}: bad descriptor {n}"))
            })
        };
        let required = |k: &str| fd(k)?.ok_or(format!("{PREFIX}{k} is required"));
        Ok(Handoff {
            id: text("ID")?,
            state_root: raw("STATE_ROOT")?.into(),
            log: raw("LOG")?.into(),
            log_max_bytes: u64::try_from(num("LOG_MAX_BYTES")?).map_err(|_| "LOG_MAX_BYTES is negative")?,
            log_keep: u32::try_from(num("LOG_KEEP")?).map_err(|_| "LOG_KEEP is out of range")?,
            socket: raw("SOCKET")?.into(),
            exit_file: raw("EXIT_FILE")?.into(),
            cgroups_path: text("CGROUPS_PATH")?,
            pid: i32::try_from(num("PID")?).ok().filter(|p| *p > 0).ok_or("PID is not a process id")?,
            stdout_fd: fd("STDOUT_FD")?,
            stderr_fd: fd("STDERR_FD")?,
            listener_fd: required("LISTENER_FD")?,
            exe_fd: required("EXE_FD")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn round_trips_through_the_environment() {
        let h = Handoff {
            id: "web-1-abc".into(),
            state_root: "/run/deliverous/containers".into(),
            log: "/var/lib/deliverous/instances/x/log".into(),
            log_max_bytes: 10 << 20,
            log_keep: 3,
            socket: "/run/deliverous/shims/x.sock".into(),
            exit_file: "/var/lib/deliverous/instances/x/exit.json".into(),
            cgroups_path: "/deliverous/x".into(),
            pid: 4242,
            stdout_fd: Some(7),
            stderr_fd: None,
            listener_fd: 9,
            exe_fd: 10,
        };
        let env: HashMap<String, OsString> = h.to_env().into_iter().collect();
        assert_eq!(Handoff::from_env(|k| env.get(k).cloned()), Ok(h));
    }

    #[test]
    fn refuses_a_broken_handoff() {
        assert!(Handoff::from_env(|_| None).unwrap_err().contains("DLV_SHIM_ID is not set"));
        let bad_pid = |k: &str| Some(OsString::from(if k.ends_with("PID") { "0" } else { "1" }));
        assert!(Handoff::from_env(bad_pid).is_err());
        let bad_fd = |k: &str| Some(OsString::from(if k.ends_with("LISTENER_FD") { "-" } else { "1" }));
        assert!(Handoff::from_env(bad_fd).unwrap_err().contains("LISTENER_FD is required"));
    }
}
