//! Turns an image's configuration plus an instance's settings into an OCI runtime spec
//! (`config.json`). Pure: no I/O, so every rule here is unit-tested.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

/// The default search path when neither the image nor the app sets `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set: what an unprivileged service may need, nothing more.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: [&str; 6] =
    ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger", "/proc/interrupts"];

/// The process an instance runs, as resolved from image and app.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resource limits of one instance; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    /// Number of CPUs worth of time per period (0.5 = half a core).
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
}

/// Everything the spec needs about one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub hostname: String,
    pub process: Process,
    /// Absolute path of the mounted root filesystem.
    pub rootfs: PathBuf,
    /// Bind-mounted network namespace file the container joins.
    pub netns: PathBuf,
    /// cgroup path, e.g. `/deliverous/3f2a…`.
    pub cgroups_path: String,
    pub resources: Resources,
    /// Host files bind-mounted over `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`.
    pub etc_files: Vec<(PathBuf, &'static str)>,
}

/// CPU period used with `--cpus`: 100 ms, as Docker does.
const CPU_PERIOD: u64 = 100_000;

/// Builds the environment: defaults, then the image's, then the instance's own (`HOSTNAME`,
/// `PORT`), then the app's, each overriding the previous on the same key, in a stable order.
pub fn merge_env(image_env: &[String], hostname: &str, port: u16, app_env: &BTreeMap<String, String>) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        if !values.contains_key(k) {
            order.push(k.to_string());
        }
        values.insert(k.to_string(), v.to_string());
    };
    set("PATH", DEFAULT_PATH);
    for entry in image_env {
        match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => set(k, v),
            _ => {}
        }
    }
    set("HOSTNAME", hostname);
    set("PORT", &port.to_string());
    for (k, v) in app_env {
        set(k, v);
    }
    order.into_iter().map(|k| format!("{k}={}", values[&k])).collect()
}

/// Entrypoint + Cmd, as Docker combines them. An empty result means the image has nothing to run.
pub fn command_line(entrypoint: &[String], cmd: &[String]) -> Vec<String> {
    entrypoint.iter().chain(cmd.iter()).cloned().collect()
}

/// Renders the OCI runtime spec. Resource limits (rlimits) are inherited from the daemon, as
/// with Docker: raising them needs CAP_SYS_RESOURCE, which a daemon may not have.
pub fn render(spec: &InstanceSpec) -> Value {
    let caps: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    let mut resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "pids": {"limit": spec.resources.pids.unwrap_or(4096)},
    });
    if let Some(bytes) = spec.resources.memory_bytes {
        // Swap equal to memory: the instance gets no swap on top of its limit.
        resources["memory"] = json!({"limit": bytes, "swap": bytes});
    }
    if let Some(cpus) = spec.resources.cpus {
        let quota = (cpus * CPU_PERIOD as f64).round().max(1000.0) as i64;
        resources["cpu"] = json!({"quota": quota, "period": CPU_PERIOD});
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for (source, destination) in &spec.etc_files {
        mounts.push(
            json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind", "rprivate"]}),
        );
    }
    json!({
        "ociVersion": "1.0.2",
        "hostname": spec.hostname,
        "root": {"path": spec.rootfs, "readonly": false},
        "process": {
            "terminal": false,
            "user": {"uid": spec.process.uid, "gid": spec.process.gid, "additionalGids": spec.process.additional_gids},
            "args": spec.process.args,
            "env": spec.process.env,
            "cwd": spec.process.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
        },
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": spec.netns},
            ],
            "cgroupsPath": spec.cgroups_path,
            "resources": resources,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InstanceSpec {
        InstanceSpec {
            hostname: "web.1".into(),
            process: Process {
                args: vec!["/bin/sh".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                additional_gids: vec![],
            },
            rootfs: "/var/lib/deliverous/instances/x/rootfs".into(),
            netns: "/run/deliverous/netns/x".into(),
            cgroups_path: "/deliverous/x".into(),
            resources: Resources { memory_bytes: Some(128 << 20), cpus: Some(0.5), pids: None },
            etc_files: vec![("/tmp/hosts".into(), "/etc/hosts")],
        }
    }

    #[test]
    fn env_layers_override_in_order() {
        let app: BTreeMap<String, String> =
            [("GREETING".to_string(), "hi".to_string()), ("PATH".to_string(), "/app".to_string())].into();
        let env = merge_env(&["PATH=/bin".into(), "A=1".into(), "broken".into(), "PORT=1".into()], "web.1", 8080, &app);
        assert_eq!(env, vec!["PATH=/app", "A=1", "PORT=8080", "HOSTNAME=web.1", "GREETING=hi"]);
    }

    #[test]
    fn command_joins_entrypoint_and_cmd() {
        assert_eq!(command_line(&["/app".into()], &["-v".into()]), vec!["/app", "-v"]);
        assert!(command_line(&[], &[]).is_empty());
    }

    #[test]
    fn rendered_spec_is_valid_oci() {
        let value = render(&sample());
        let spec: oci_spec::runtime::Spec = serde_json::from_value(value).expect("valid spec");
        let linux = spec.linux().as_ref().expect("linux section");
        let res = linux.resources().as_ref().expect("resources");
        assert_eq!(res.memory().as_ref().and_then(|m| m.limit()), Some(128 << 20));
        assert_eq!(res.cpu().as_ref().and_then(|c| c.quota()), Some(50_000));
        assert_eq!(res.pids().as_ref().map(|p| p.limit()), Some(4096));
        assert_eq!(spec.hostname().as_deref(), Some("web.1"));
        let caps = spec
            .process()
            .as_ref()
            .and_then(|p| p.capabilities().as_ref())
            .and_then(|c| c.effective().as_ref())
            .map(|c| c.len());
        assert_eq!(caps, Some(14));
    }

    #[test]
    fn tiny_cpu_share_is_floored() {
        let mut s = sample();
        s.resources.cpus = Some(0.001);
        assert_eq!(render(&s)["linux"]["resources"]["cpu"]["quota"], 1000);
    }
}
