//! What libcontainer is handed to create a container from a bundle: the bundle itself, or, when
//! its `config.json` has a seccomp profile we can precompile, a copy of the config without
//! `linux.seccomp` (under `<bundle>/launch/`) plus an executor that loads the precompiled
//! program. The bundle's own `config.json` stays a complete OCI spec (other runtimes, `exec`).

use std::path::{Path, PathBuf};

use libcontainer::workload::default::DefaultExecutor;
use oci_spec::runtime::LinuxSeccomp;
use serde_json::Value;

use crate::seccomp_bpf::{self, FilteredExecutor};

/// Directory (inside the bundle) of the config libcontainer reads when the filter is ours.
pub const LAUNCH_DIR: &str = "launch";

/// Where compiled seccomp programs are cached for containers whose libcontainer state is under
/// `state_root`: next to it (`<run>/seccomp/`), so the state root holds containers only (the
/// crash sweep and its checks read every entry there as one).
pub fn seccomp_cache(state_root: &Path) -> PathBuf {
    state_root.parent().unwrap_or(state_root).join("seccomp")
}

/// The bundle libcontainer builds from, and the executor that runs the container's process.
pub struct Launch {
    pub bundle: PathBuf,
    pub executor: Option<FilteredExecutor>,
}

/// Prepares the launch of `bundle`, precompiled programs cached in `cache` (see
/// [`seccomp_bpf::cached`]). Errors name the file and what is wrong with it; a profile that
/// cannot be compiled fails the start (it never runs unfiltered).
pub fn prepare(bundle: &Path, cache: &Path) -> Result<Launch, String> {
    let as_is = Launch { bundle: bundle.to_path_buf(), executor: None };
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut config: Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: not a valid JSON document: {e}", path.display()))?;
    let Some(profile) = config.pointer("/linux/seccomp").filter(|v| !v.is_null()) else {
        return Ok(as_is);
    };
    // Without no_new_privs, libcontainer loads the filter early, while the init still holds
    // CAP_SYS_ADMIN: a later load would be refused. Leave such specs to libcontainer.
    if config.pointer("/process/noNewPrivileges") != Some(&Value::Bool(true)) {
        return Ok(as_is);
    }
    // A relative bind-mount source is relative to the bundle's directory: keep such specs where
    // they are.
    if config["mounts"].as_array().into_iter().flatten().any(relative_bind) {
        return Ok(as_is);
    }
    let parsed: LinuxSeccomp = serde_json::from_value(profile.clone())
        .map_err(|e| format!("{}: linux.seccomp is not a valid OCI seccomp profile: {e}", path.display()))?;
    if let Err(why) = seccomp_bpf::precompilable(&parsed) {
        tracing::debug!("{}: seccomp profile left to libcontainer: {why}", path.display());
        return Ok(as_is);
    }
    let program = seccomp_bpf::for_profile(&parsed, cache).map_err(|e| format!("{}: {e}", path.display()))?;

    if let Some(linux) = config.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("seccomp");
    }
    // A relative root is relative to the bundle the config came from, not to the launch copy.
    if let Some(root) = config.pointer_mut("/root/path") {
        if let Some(p) = root.as_str().filter(|p| !p.starts_with('/')) {
            *root = Value::String(bundle.join(p).to_string_lossy().into_owned());
        }
    }
    let dir = bundle.join(LAUNCH_DIR);
    let copy = dir.join("config.json");
    let bytes = serde_json::to_vec(&config).map_err(|e| format!("{}: {e}", copy.display()))?;
    // A bundle started again (a restart, a benchmark loop) already has this very copy: leave
    // it. Rewriting truncates the file, and freeing its block costs a synchronous discard on a
    // file system mounted with `discard` (milliseconds on our VMs' root ext4).
    if std::fs::read(&copy).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(&copy, bytes).map_err(|e| format!("{}: {e}", copy.display()))?;
    }
    Ok(Launch { bundle: dir, executor: Some(FilteredExecutor::new(program, Box::new(DefaultExecutor {}))) })
}

fn relative_bind(mount: &Value) -> bool {
    let bind = mount["type"] == "bind"
        || mount["options"].as_array().into_iter().flatten().any(|o| o == "bind" || o == "rbind");
    bind && mount["source"].as_str().is_some_and(|s| !s.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle(config: &Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec(config).unwrap()).unwrap();
        dir
    }

    fn config() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["/bin/true"], "cwd": "/", "noNewPrivileges": true},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"seccomp": crate::seccomp::profile(&[])},
        })
    }

    #[test]
    fn a_precompilable_profile_moves_out_of_the_launch_config() {
        let b = bundle(&config());
        let cache = tempfile::tempdir().unwrap();
        let launch = prepare(b.path(), cache.path()).unwrap();
        assert_eq!(launch.bundle, b.path().join(LAUNCH_DIR));
        assert!(launch.executor.is_some());
        let copy: Value = serde_json::from_slice(&std::fs::read(launch.bundle.join("config.json")).unwrap()).unwrap();
        assert!(copy.pointer("/linux/seccomp").is_none());
        assert_eq!(copy["root"]["path"], b.path().join("rootfs").to_string_lossy().as_ref());
        assert_eq!(copy["process"], config()["process"]);
        // The bundle's own config is untouched.
        let own: Value = serde_json::from_slice(&std::fs::read(b.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(own, config());
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1, "one cached program");
    }

    #[test]
    fn an_unchanged_launch_copy_is_not_rewritten_and_a_stale_one_is() {
        let b = bundle(&config());
        let cache = tempfile::tempdir().unwrap();
        let copy = prepare(b.path(), cache.path()).unwrap().bundle.join("config.json");
        let first = std::fs::metadata(&copy).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        prepare(b.path(), cache.path()).unwrap();
        assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), first, "same content: left alone");
        // A stale or torn copy (the bundle's config changed, a crash mid-write) is replaced.
        let mut changed = config();
        changed["process"]["args"] = json!(["/bin/false"]);
        std::fs::write(b.path().join("config.json"), serde_json::to_vec(&changed).unwrap()).unwrap();
        prepare(b.path(), cache.path()).unwrap();
        let copied: Value = serde_json::from_slice(&std::fs::read(&copy).unwrap()).unwrap();
        assert_eq!(copied["process"]["args"], json!(["/bin/false"]));
        std::fs::write(&copy, b"{\"ociVersion\"").unwrap();
        prepare(b.path(), cache.path()).unwrap();
        let copied: Value = serde_json::from_slice(&std::fs::read(&copy).unwrap()).unwrap();
        assert_eq!(copied["process"]["args"], json!(["/bin/false"]));
    }

    #[test]
    fn other_specs_go_to_libcontainer_as_they_are() {
        let cache = tempfile::tempdir().unwrap();
        let mut no_seccomp = config();
        no_seccomp["linux"] = json!({});
        let mut no_nnp = config();
        no_nnp["process"]["noNewPrivileges"] = json!(false);
        let mut flags = config();
        flags["linux"]["seccomp"]["flags"] = json!(["SECCOMP_FILTER_FLAG_LOG"]);
        let mut relative_bind = config();
        relative_bind["mounts"] = json!([{"destination": "/data", "source": "data", "options": ["rbind"]}]);
        for c in [no_seccomp, no_nnp, flags, relative_bind] {
            let b = bundle(&c);
            let launch = prepare(b.path(), cache.path()).unwrap();
            assert_eq!(launch.bundle, b.path(), "{c}");
            assert!(launch.executor.is_none());
            assert!(!b.path().join(LAUNCH_DIR).exists());
        }
    }

    #[test]
    fn a_broken_profile_fails_the_start_with_the_file_named() {
        let cache = tempfile::tempdir().unwrap();
        let mut c = config();
        c["linux"]["seccomp"]["defaultAction"] = json!("SCMP_ACT_SOMETIMES");
        let b = bundle(&c);
        let err = prepare(b.path(), cache.path()).err().unwrap();
        assert!(err.contains("config.json") && err.contains("seccomp"), "{err}");
        std::fs::write(b.path().join("config.json"), "{").unwrap();
        let err = prepare(b.path(), cache.path()).err().unwrap();
        assert!(err.contains("not a valid JSON"), "{err}");
    }
}
