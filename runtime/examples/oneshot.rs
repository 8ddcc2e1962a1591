//! Runs one container to completion the way the shim does (libcontainer builder from a bundle,
//! single-threaded, stdout/stderr on pipes, detached init that is our child), for benchmarks
//! and profiles of the create → start → exit path (bench/start).
//!
//! `oneshot run BUNDLE ID STATE_ROOT`: build, start, wait for the init, delete; exits with the
//! container's exit code (128+N when killed by signal N).
//! `oneshot spec ROOTFS NETNS CGROUPS_PATH ARG...`: prints the production `config.json`
//! (`deliverous_runtime::spec::render`, default capabilities and seccomp profile) for ARG...,
//! joining the network namespace file NETNS, so every runtime compared runs the same spec.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use deliverous_runtime::shim;
use deliverous_runtime::spec::{self, InstanceSpec, Process, Resources};
use nix::sys::wait::{waitpid, WaitStatus};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") if args.len() == 4 => run(&args[1], &args[2], &args[3]),
        Some("spec") if args.len() >= 5 => print_spec(&args[1], &args[2], &args[3], &args[4..]),
        _ => Err("usage: oneshot run BUNDLE ID STATE_ROOT | oneshot spec ROOTFS NETNS CGROUPS_PATH ARG...".into()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("oneshot: {msg}");
            ExitCode::from(125)
        }
    }
}

fn print_spec(rootfs: &str, netns: &str, cgroups_path: &str, argv: &[String]) -> Result<u8, String> {
    let instance = InstanceSpec {
        hostname: "dlv-bench".into(),
        process: Process {
            args: argv.to_vec(),
            env: vec![format!("PATH={}", spec::DEFAULT_PATH)],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: vec![],
        },
        rootfs: PathBuf::from(rootfs),
        netns: PathBuf::from(netns),
        cgroups_path: cgroups_path.into(),
        resources: Resources::default(),
        etc_files: vec![],
        capabilities: spec::capabilities(&[], &[])?,
        binds: vec![],
        cgroup_v2: deliverous_runtime::cgroup::unified(),
        userns: None,
    };
    let json = serde_json::to_string_pretty(&spec::render(&instance)).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(0)
}

fn run(bundle: &str, id: &str, state_root: &str) -> Result<u8, String> {
    // As the shim: orphans of the container are ours to reap.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let started = shim::start_container(id, Path::new(bundle), Path::new(state_root))?;
    let (mut container, pid) = (started.container, started.pid);
    // The shim polls the pipes; the benchmarked commands print nothing, so they are only
    // kept open (a write end closed early would give the container EPIPE) and dropped at the end.
    let _pipes = (started.stdout, started.stderr);
    let code = loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => break code as u8,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as u8,
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(format!("waitpid({pid}): {e}")),
        }
    };
    shim::remove::remove_exited(&mut container).map_err(|e| format!("cannot delete container: {e}"))?;
    Ok(code)
}
