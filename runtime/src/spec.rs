//! Turns an image's configuration plus an instance's settings into an OCI runtime spec
//! (`config.json`). Pure: no I/O, so every rule here is unit-tested.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::seccomp;

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

/// Every capability the kernel knows (as of Linux 6.x), for validating `cap_add`/`cap_drop`.
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// `net_admin`, `NET_ADMIN` or `CAP_NET_ADMIN` → `CAP_NET_ADMIN`; `all` → `ALL`. Errors name
/// the unknown capability.
pub fn normalize_capability(name: &str) -> Result<String, String> {
    let upper = name.trim().to_ascii_uppercase();
    if upper == "ALL" {
        return Ok(upper);
    }
    let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
    if ALL_CAPABILITIES.contains(&full.as_str()) {
        Ok(full)
    } else {
        Err(format!(
            "unknown capability {name:?}: expected a name such as NET_ADMIN or SYS_PTRACE (see capabilities(7))"
        ))
    }
}

/// Docker's default set, minus `drop`, plus `add` (both normalised; `ALL` means every one).
/// Adding wins over dropping, as with `docker run --cap-drop ALL --cap-add NET_BIND_SERVICE`.
pub fn capabilities(add: &[String], drop: &[String]) -> Result<Vec<String>, String> {
    let add: Vec<String> = add.iter().map(|c| normalize_capability(c)).collect::<Result<_, _>>()?;
    let drop: Vec<String> = drop.iter().map(|c| normalize_capability(c)).collect::<Result<_, _>>()?;
    let mut caps: Vec<String> = if drop.iter().any(|c| c == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPABILITIES.iter().filter(|c| !drop.iter().any(|d| d == *c)).map(|c| c.to_string()).collect()
    };
    if add.iter().any(|c| c == "ALL") {
        caps = ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    } else {
        for c in add {
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
    }
    Ok(caps)
}

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
    /// Relative CPU weight under contention, cgroup v2 units: 1 to 10000, default 100.
    pub cpu_weight: Option<u64>,
    pub pids: Option<i64>,
}

/// A host directory mounted at `destination` inside the instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
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
    /// Capabilities of the process (bounding, effective, permitted), e.g. from [`capabilities`].
    pub capabilities: Vec<String>,
    /// Directories bind-mounted into the instance (volumes), after everything else.
    pub binds: Vec<Bind>,
    /// The host runs the unified cgroup v2 hierarchy (`cgroup::unified()`), not v1.
    pub cgroup_v2: bool,
    /// A user namespace of its own, container ids mapped to this host range. The instance
    /// then also gets a network namespace of its own (owned by that user namespace, which a
    /// pre-made one joined by path cannot be), configured from outside after `build()`: `netns`
    /// is where the shim binds it.
    pub userns: Option<IdMap>,
}

/// Container uids and gids `0..size` are host ids `host_first..host_first + size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_first: u32,
    pub size: u32,
}

impl IdMap {
    /// The host id of container id `id`, if it is mapped.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.size).then(|| self.host_first + id)
    }
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
    let caps = &spec.capabilities;
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
    if let Some(weight) = spec.resources.cpu_weight {
        if spec.cgroup_v2 {
            // Written as is: libcontainer would convert v1 shares with a curve, not exactly.
            resources["unified"] = json!({"cpu.weight": weight.clamp(1, 10_000).to_string()});
        } else {
            // v1 shares: 1024 is the default weight of 100.
            let shares = (weight * 1024 / 100).clamp(2, 262_144);
            match resources.get_mut("cpu").and_then(Value::as_object_mut) {
                Some(cpu) => {
                    cpu.insert("shares".into(), json!(shares));
                }
                None => resources["cpu"] = json!({"shares": shares}),
            }
        }
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
    for bind in &spec.binds {
        let mut options = vec!["rbind", "rprivate", "nosuid", "nodev"];
        if bind.read_only {
            options.push("ro");
        }
        mounts
            .push(json!({"destination": bind.destination, "type": "bind", "source": bind.source, "options": options}));
    }
    let mut namespaces =
        vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "uts"}), json!({"type": "mount"})];
    match &spec.userns {
        None => namespaces.push(json!({"type": "network", "path": spec.netns})),
        Some(_) => {
            namespaces.push(json!({"type": "user"}));
            namespaces.push(json!({"type": "network"}));
        }
    }
    let mut value = json!({
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
            "namespaces": namespaces,
            "cgroupsPath": spec.cgroups_path,
            "resources": resources,
            "seccomp": seccomp::profile(&spec.capabilities),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    });
    if let Some(map) = &spec.userns {
        let mapping = json!([{"containerID": 0, "hostID": map.host_first, "size": map.size}]);
        value["linux"]["uidMappings"] = mapping.clone();
        value["linux"]["gidMappings"] = mapping;
    }
    value
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
            resources: Resources { memory_bytes: Some(128 << 20), cpus: Some(0.5), cpu_weight: None, pids: None },
            etc_files: vec![("/tmp/hosts".into(), "/etc/hosts")],
            capabilities: DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            cgroup_v2: false,
            binds: vec![],
            userns: None,
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

    #[test]
    fn volumes_are_bind_mounts_read_only_when_asked() {
        let mut s = sample();
        s.binds = vec![
            Bind { source: "/data/volumes/db".into(), destination: "/var/lib/db".into(), read_only: false },
            Bind { source: "/srv/shared".into(), destination: "/shared".into(), read_only: true },
        ];
        let v = render(&s);
        let mounts = v["mounts"].as_array().unwrap();
        let db = mounts.iter().find(|m| m["destination"] == "/var/lib/db").unwrap();
        assert_eq!(db["options"], json!(["rbind", "rprivate", "nosuid", "nodev"]));
        let shared = mounts.iter().find(|m| m["destination"] == "/shared").unwrap();
        assert_eq!(shared["options"], json!(["rbind", "rprivate", "nosuid", "nodev", "ro"]));
    }

    #[test]
    fn cpu_weight_is_shares_on_v1_and_cpu_weight_on_v2() {
        let mut s = sample();
        s.resources.cpu_weight = Some(500);
        let v1 = render(&s);
        assert_eq!(v1["linux"]["resources"]["cpu"]["shares"], 5120);
        assert_eq!(v1["linux"]["resources"]["cpu"]["quota"], 50_000, "the quota stays");
        assert!(v1["linux"]["resources"].get("unified").is_none());
        s.cgroup_v2 = true;
        let v2 = render(&s);
        assert_eq!(v2["linux"]["resources"]["unified"]["cpu.weight"], "500");
        assert!(v2["linux"]["resources"]["cpu"].get("shares").is_none());
        s.resources.cpu_weight = Some(1);
        s.cgroup_v2 = false;
        assert_eq!(render(&s)["linux"]["resources"]["cpu"]["shares"], 10);
    }

    #[test]
    fn capability_sets_start_from_docker_defaults() {
        let caps = capabilities(&[], &[]).unwrap();
        assert_eq!(caps, DEFAULT_CAPABILITIES.map(String::from).to_vec());
        let caps = capabilities(&["net_admin".into()], &["CAP_NET_RAW".into(), "mknod".into()]).unwrap();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_NET_RAW".to_string()) && !caps.contains(&"CAP_MKNOD".to_string()));
        assert_eq!(caps.len(), 13);
        let caps = capabilities(&["NET_BIND_SERVICE".into()], &["all".into()]).unwrap();
        assert_eq!(caps, vec!["CAP_NET_BIND_SERVICE".to_string()]);
        assert_eq!(capabilities(&["ALL".into()], &[]).unwrap().len(), ALL_CAPABILITIES.len());
        let err = capabilities(&["CAP_FLY".into()], &[]).unwrap_err();
        assert!(err.contains("CAP_FLY"), "{err}");
    }

    #[test]
    fn the_spec_carries_the_capabilities_and_a_seccomp_filter() {
        let mut s = sample();
        s.capabilities = vec!["CAP_KILL".into()];
        let v = render(&s);
        assert_eq!(v["process"]["capabilities"]["effective"], json!(["CAP_KILL"]));
        assert!(v["process"]["capabilities"].get("ambient").is_none());
        assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    }

    #[test]
    fn a_user_namespace_maps_ids_and_brings_its_own_network_namespace() {
        let mut s = sample();
        let v = render(&s);
        assert_eq!(v["linux"]["namespaces"][4], json!({"type": "network", "path": "/run/deliverous/netns/x"}));
        assert!(v["linux"].get("uidMappings").is_none());
        s.userns = Some(IdMap { host_first: 1_000_000, size: 65536 });
        let v = render(&s);
        let namespaces = v["linux"]["namespaces"].as_array().unwrap();
        assert!(namespaces.contains(&json!({"type": "user"})));
        assert!(namespaces.contains(&json!({"type": "network"})), "a new one, not joined by path: {namespaces:?}");
        let map = json!([{"containerID": 0, "hostID": 1_000_000, "size": 65536}]);
        assert_eq!(v["linux"]["uidMappings"], map);
        assert_eq!(v["linux"]["gidMappings"], map);
        let spec: oci_spec::runtime::Spec = serde_json::from_value(v).expect("valid spec");
        assert!(spec.linux().as_ref().and_then(|l| l.uid_mappings().as_ref()).is_some());
        let m = IdMap { host_first: 1_000_000, size: 65536 };
        assert_eq!((m.to_host(0), m.to_host(65535), m.to_host(65536)), (Some(1_000_000), Some(1_065_535), None));
    }
}
