//! The `deliverous` daemon as a subprocess with its own data/run dirs and kernel object names,
//! plus the CLI pointed at its socket. Dropping a [`Daemon`] removes its apps, stops it, and then
//! sweeps (with a warning per item) whatever still carries its unique names: such leftovers are
//! leaks of the product, made visible in the test output.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{free_port, leaks, run_with_timeout, send_signal, tail, unique_hex, Registry};

/// Log filter for test daemons (and their shims, which inherit it): the daemon's own debug
/// lines, libcontainer only when something goes wrong.
const DAEMON_LOG: &str = "info,deliverous=debug,libcontainer=warn,libcgroups=error,libcontainer::seccomp=error";
const BINARY: &str = env!("CARGO_BIN_EXE_deliverous");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const CLI_TIMEOUT: Duration = Duration::from_secs(180);

/// The per-daemon unique names. Everything contains `dlv` (the leaks tool's convention) and,
/// except the 2-hex-digit veth prefix, the random `id`.
#[derive(Debug, Clone)]
pub struct DaemonNames {
    /// 6 random hex digits shared by the names below.
    pub id: String,
    /// Temp dir holding `data/`, `run/` and `daemon.log`.
    pub dir: PathBuf,
    /// `dlvt<id>`.
    pub bridge: String,
    /// `10.A.B.0/24`, A in 200..=250.
    pub subnet: String,
    /// `dlv<2 hex>`.
    pub veth_prefix: String,
    /// `dlv-test-<id>`.
    pub cgroup_parent: String,
    /// `dlv_test_<id>`.
    pub nft_table: String,
}

impl DaemonNames {
    fn generate(dir: PathBuf, id: String) -> DaemonNames {
        DaemonNames {
            bridge: format!("dlvt{id}"),
            subnet: pick_subnet(),
            veth_prefix: pick_veth_prefix(),
            cgroup_parent: format!("dlv-test-{id}"),
            nft_table: format!("dlv_test_{id}"),
            dir,
            id,
        }
    }

    /// Whether a line (of the leaks tool, a path, a command line) names one of our objects.
    pub fn matches(&self, text: &str) -> bool {
        text.contains(&self.id)
            || text.contains(self.dir.to_str().unwrap_or("\u{0}"))
            || text
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-')
                .any(|word| word.starts_with(&self.veth_prefix) && word.len() > self.veth_prefix.len())
    }

    /// The lines of [`leaks`] that concern this daemon (other tests may run in parallel).
    pub fn leaks(&self) -> String {
        leaks().lines().filter(|line| self.matches(line)).collect::<Vec<_>>().join("\n")
    }
}

/// What a CLI invocation printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// How to start a test daemon beyond the defaults ([`Daemon::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Extra `deliverous daemon` flags.
    pub args: Vec<String>,
    /// Extra environment variables of the daemon.
    pub env: Vec<(String, String)>,
    /// Start it through `systemd-socket-activate`, which holds the API socket (named `api`) and
    /// starts the daemon on the first connection, passing the socket.
    pub socket_activate: bool,
    /// More sockets `systemd-socket-activate` listens on and passes: (address, descriptor name).
    pub also_activate: Vec<(String, String)>,
    /// Start it inside this network namespace (a `/run/netns/NAME` file).
    pub netns: Option<PathBuf>,
    /// The proxy's address, instead of `127.0.0.1:<free port>`.
    pub http_listen: Option<String>,
    /// Set `JOURNAL_STREAM` to the daemon log file's `dev:ino`, as systemd does when stderr is
    /// the journal: the daemon then writes journald's format into it.
    pub journal_stream: bool,
}

pub struct Daemon {
    child: Option<Child>,
    names: DaemonNames,
    http_listen: String,
    registry_addr: String,
    extra_args: Vec<String>,
    options: DaemonOptions,
    log: PathBuf,
    /// `None` once kept on purpose (mounts could not be removed): never delete through a mount.
    dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `deliverous daemon` with fresh dirs and names, and waits until `app ls` works.
    pub fn start(registry: &Registry) -> Daemon {
        Daemon::start_with_args(registry, &[])
    }

    /// Like [`Daemon::start`] with extra `deliverous daemon` flags (kept across restarts).
    pub fn start_with_args(registry: &Registry, extra_args: &[&str]) -> Daemon {
        Daemon::start_with(
            registry,
            DaemonOptions { args: extra_args.iter().map(|s| s.to_string()).collect(), ..Default::default() },
        )
    }

    /// Like [`Daemon::start`], started as `options` say (kept across restarts).
    pub fn start_with(registry: &Registry, options: DaemonOptions) -> Daemon {
        let id = unique_hex(6);
        let dir =
            tempfile::Builder::new().prefix(&format!("dlv-test-{id}-")).tempdir().expect("create daemon temp dir");
        let names = DaemonNames::generate(dir.path().to_path_buf(), id);
        let mut daemon = Daemon {
            child: None,
            http_listen: options.http_listen.clone().unwrap_or_else(|| format!("127.0.0.1:{}", free_port())),
            registry_addr: registry.addr().to_string(),
            extra_args: options.args.clone(),
            options,
            log: names.dir.join("daemon.log"),
            names,
            dir: Some(dir),
        };
        // From here on a panic drops `daemon`, which cleans up what was started.
        daemon.spawn();
        daemon.wait_ready();
        daemon
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, once: &[&str]) {
        assert!(self.child.is_none(), "daemon already running");
        let n = &self.names;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open daemon log");
        let _ = std::io::Write::write_all(
            &mut log,
            format!("=== harness: starting deliverous daemon (bridge {}, subnet {}) ===\n", n.bridge, n.subnet)
                .as_bytes(),
        );
        let mut env: Vec<(String, String)> = vec![
            ("DELIVEROUS_AUTH_FILE".into(), self.auth_file().to_string_lossy().into_owned()),
            ("DOCKER_CONFIG".into(), self.names.dir.join("docker").to_string_lossy().into_owned()),
            ("RUST_BACKTRACE".into(), "1".into()),
            ("DELIVEROUS_LOG".into(), std::env::var("DELIVEROUS_LOG").unwrap_or_else(|_| DAEMON_LOG.into())),
        ];
        env.extend(self.options.env.iter().cloned());
        if self.options.journal_stream {
            use std::os::unix::fs::MetadataExt;
            let meta = log.metadata().expect("stat daemon log");
            env.push(("JOURNAL_STREAM".into(), format!("{}:{}", meta.dev(), meta.ino())));
        }
        let mut cmd = if self.options.socket_activate {
            // It binds the socket before the daemon exists: the run dir must be there. It passes
            // the daemon only the environment it is told to (-E), besides PATH, HOME and TERM.
            std::fs::create_dir_all(self.run_dir()).expect("create run dir");
            let mut cmd = Command::new("systemd-socket-activate");
            cmd.arg("-l").arg(self.socket());
            let mut names = vec!["api".to_string()];
            for (addr, name) in &self.options.also_activate {
                cmd.arg("-l").arg(addr);
                names.push(name.clone());
            }
            cmd.arg(format!("--fdname={}", names.join(":")));
            for (k, v) in &env {
                cmd.arg(format!("--setenv={k}={v}"));
            }
            cmd.arg(BINARY);
            cmd
        } else {
            Command::new(BINARY)
        };
        cmd.arg("daemon")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .args(["--http-listen", &self.http_listen])
            .args(["--bridge", &n.bridge])
            .args(["--subnet", &n.subnet])
            .args(["--veth-prefix", &n.veth_prefix])
            .args(["--cgroup-parent", &n.cgroup_parent])
            .args(["--nft-table", &n.nft_table])
            .args(&self.extra_args)
            .args(once)
            .envs(env);
        if let Some(netns) = &self.options.netns {
            super::netns::enter_in_child(&mut cmd, netns);
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("dup log fd")).stderr(log);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot start {BINARY} daemon: {e}")));
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let socket = self.socket();
        let mut last = String::from("api socket not created yet");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "deliverous daemon exited during start-up with {status}\n--- daemon log ---\n{}",
                        self.log_tail(50)
                    );
                }
            }
            if socket.exists() {
                match run_with_timeout(&mut self.command(&["app", "ls"]), Duration::from_secs(5)) {
                    Ok(out) if out.status.success() => return,
                    Ok(out) => {
                        last = format!(
                            "`app ls` exited with {}: {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    }
                    Err(e) => last = format!("`app ls`: {e}"),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "deliverous daemon not ready within {READY_TIMEOUT:?} ({last}; socket {})\n--- daemon log ---\n{}",
                    socket.display(),
                    self.log_tail(50)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `deliverous --host … ARGS` command, to run with other stdio than [`Daemon::cli`]'s.
    pub fn command(&self, args: &[&str]) -> Command {
        let host = format!("unix:{}", self.socket().display());
        let mut cmd = Command::new(BINARY);
        cmd.arg("--host")
            .arg(&host)
            .args(args)
            .env("DELIVEROUS_HOST", &host)
            .env("DELIVEROUS_AUTH_FILE", self.auth_file())
            .env("DOCKER_CONFIG", self.names.dir.join("docker"))
            .env("NO_COLOR", "1");
        cmd
    }

    /// Runs `deliverous --host unix:<sock> ARGS...` (also with `DELIVEROUS_HOST` set).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let out = run_with_timeout(&mut self.command(args), CLI_TIMEOUT).unwrap_or_else(|e| {
            panic!("deliverous {}: {e}\n--- daemon log ---\n{}", args.join(" "), self.log_tail(50))
        });
        CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Like [`Daemon::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.success(),
            "`deliverous {}` failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- daemon log ---\n{}",
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr,
            self.log_tail(30)
        );
        out.stdout
    }

    /// Parses the stdout of a `--json` command (`cli_json(&["app", "show", "web", "--json"])`).
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let stdout = self.cli_ok(args);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("`deliverous {}` printed no JSON ({e}):\n{stdout}", args.join(" ")))
    }

    /// `127.0.0.1:PORT` of the HTTP proxy.
    pub fn proxy_addr(&self) -> &str {
        &self.http_listen
    }

    /// The registry the daemon's test images live in (`127.0.0.1:PORT`).
    pub fn registry_addr(&self) -> &str {
        &self.registry_addr
    }

    pub fn names(&self) -> &DaemonNames {
        &self.names
    }

    pub fn data_dir(&self) -> PathBuf {
        self.names.dir.join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.names.dir.join("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("api.sock")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// A file of an instance's cgroup: `/sys/fs/cgroup/<parent>/<id>/<file>` on cgroup v2,
    /// `/sys/fs/cgroup/<v1_controller>/<parent>/<id>/<file>` on v1.
    pub fn cgroup_file(&self, instance_id: &str, v1_controller: &str, file: &str) -> PathBuf {
        let base = if super::cgroup_v2() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            Path::new("/sys/fs/cgroup").join(v1_controller)
        };
        base.join(&self.names.cgroup_parent).join(instance_id).join(file)
    }

    /// The registry credentials file of this daemon (and of its CLI): never the host's.
    pub fn auth_file(&self) -> PathBuf {
        self.names.dir.join("auth.json")
    }

    /// PID of the shim of instance `instance_id` (`deliverous shim --id <id> ...`).
    pub fn shim_pid(&self, instance_id: &str) -> Option<u32> {
        super::pids_where(|argv| {
            argv.get(1).is_some_and(|a| a == "shim") && argv.windows(2).any(|w| w[0] == "--id" && w[1] == instance_id)
        })
        .first()
        .copied()
    }

    /// PID of the proxy process the daemon started (it outlives the daemon), if it runs.
    pub fn proxy_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.run_dir().join("proxy.pid")).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// PID of the daemon process, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the daemon (a crash): instances and anything else it spawned are left alone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the daemon and waits up to 15 s (then SIGKILL). Returns how it exited.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        send_signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    eprintln!(
                        "harness: deliverous daemon (pid {}) ignored SIGTERM for {STOP_TIMEOUT:?}; SIGKILL",
                        child.id()
                    );
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// Stops the daemon if it runs (SIGTERM) and starts it again with the same dirs, names and
    /// flags; waits until it answers. After [`Daemon::kill9`] it just starts it.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
        self.wait_ready();
    }

    /// Upgrades in place: starts a new daemon with the same dirs, names and flags plus
    /// `--upgrade`; the running one hands over to it and exits. Waits for both.
    pub fn upgrade(&mut self) {
        let mut old = self.child.take().expect("a daemon to upgrade");
        self.spawn_with(&["--upgrade"]);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match old.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "the old daemon exited with {status}\n{}", self.log_tail(50));
                    break;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = old.kill();
                    let _ = old.wait();
                    panic!("the old daemon did not exit after handing over\n{}", self.log_tail(50));
                }
            }
        }
        self.wait_ready();
    }

    /// Simulates a host reboot: the daemon is stopped (SIGTERM, as at shutdown), every process
    /// it started (shims, containers) is SIGKILLed by PID, and what a reboot takes away goes:
    /// the run dir's contents (a tmpfs), mounts (instances' overlays, netns bind mounts), the
    /// instances' cgroups, the bridge, the veths and the nft table. The data dir stays. Then a
    /// new daemon starts on the same dirs, names and flags; this waits until it answers.
    pub fn reboot(&mut self) {
        self.terminate();
        QUIET.with(|q| q.set(true));
        kill_processes(&self.names);
        unmount_under(&self.names.dir);
        remove_links(&self.names);
        remove_netns(&self.names);
        remove_nft_table(&self.names.nft_table);
        remove_cgroups(&self.names.cgroup_parent);
        QUIET.with(|q| q.set(false));
        let remaining = mounts_under(&self.names.dir);
        assert!(remaining.is_empty(), "reboot simulation: mounts survive: {remaining:?}");
        if let Ok(entries) = std::fs::read_dir(self.run_dir()) {
            for entry in entries.flatten() {
                let path = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if let Err(e) = removed {
                    panic!("reboot simulation: cannot remove {}: {e}", path.display());
                }
            }
        }
        let mut log = std::fs::OpenOptions::new().append(true).open(&self.log).expect("open daemon log");
        let _ = std::io::Write::write_all(&mut log, b"=== harness: simulated host reboot ===\n");
        self.spawn();
        self.wait_ready();
    }

    /// Starts `deliverous ARGS...` (e.g. `events --follow`) with stdout piped, without waiting;
    /// the caller kills it (by its PID, through [`Child::kill`]) when done.
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run deliverous {}: {e}", args.join(" ")))
    }

    /// Best effort, through the product itself: remove every app so that what remains after the
    /// daemon stops is a leak, not an app that was meant to outlive the daemon.
    fn remove_apps(&self) {
        if self.child.is_none() || !self.socket().exists() {
            return;
        }
        let Ok(out) = run_with_timeout(&mut self.command(&["app", "ls", "--json"]), Duration::from_secs(20)) else {
            return;
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return;
        };
        let list = match &value {
            serde_json::Value::Array(items) => items.clone(),
            serde_json::Value::Object(map) => map.get("apps").and_then(|v| v.as_array()).cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        for item in list {
            let name = match &item {
                serde_json::Value::String(s) => s.clone(),
                other => match other.get("name").and_then(|n| n.as_str()) {
                    Some(s) => s.to_string(),
                    None => continue,
                },
            };
            match run_with_timeout(&mut self.command(&["app", "rm", &name]), Duration::from_secs(60)) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "harness: teardown `app rm {name}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("harness: teardown `app rm {name}`: {e}"),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        self.remove_apps();
        self.terminate();
        if panicking {
            eprintln!(
                "--- deliverous daemon log {} (last 50 lines) ---\n{}\n--- end of daemon log ---",
                self.log.display(),
                self.log_tail(50)
            );
        }
        let clean = safety_net(&self.names);
        if let Some(dir) = self.dir.take() {
            if clean {
                if let Err(e) = dir.close() {
                    eprintln!("harness: could not remove {}: {e}", self.names.dir.display());
                }
            } else {
                let path = dir.keep();
                eprintln!(
                    "harness: WARNING: mounts remain under {}; kept it (never delete through a mount)",
                    path.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names

/// `10.A.B.0/24` with A in 200..=250: unique within this process (counter mixed with the pid),
/// and skipping subnets that an interface on the machine already uses.
fn pick_subnet() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPACE: u32 = 51 * 256;
    let in_use = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let base = std::process::id().wrapping_mul(2_654_435_761) % SPACE;
    for _ in 0..SPACE {
        let n = (base + NEXT.fetch_add(1, Ordering::Relaxed) * 97) % SPACE;
        let (a, b) = (200 + n / 256, n % 256);
        if !in_use.contains(&format!("10.{a}.{b}.")) {
            return format!("10.{a}.{b}.0/24");
        }
    }
    panic!("no free 10.200-250.x.0/24 subnet")
}

/// `dlv` + 2 hex digits, used by no link on the machine nor by another daemon of this process.
fn pick_veth_prefix() -> String {
    static USED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
    let used = used.get_or_insert_with(HashSet::new);
    let links = list_links();
    for _ in 0..1024 {
        let prefix = format!("dlv{}", unique_hex(2));
        if !used.contains(&prefix) && !links.iter().any(|l| l.starts_with(&prefix)) {
            used.insert(prefix.clone());
            return prefix;
        }
    }
    panic!("no free dlvXX veth prefix")
}

fn list_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Safety net

thread_local! {
    /// Set while [`Daemon::reboot`] removes things on purpose: they are not leaks.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn warn(what: &str) {
    if !QUIET.with(|q| q.get()) {
        eprintln!("harness: WARNING: safety net removed leftover {what}");
    }
}

/// Removes what carries `names` after the daemon stopped. Returns false if mounts remain under
/// the temp dir (then it must not be deleted).
fn safety_net(names: &DaemonNames) -> bool {
    kill_processes(names);
    unmount_under(&names.dir);
    remove_links(names);
    remove_netns(names);
    remove_nft_table(&names.nft_table);
    remove_cgroups(&names.cgroup_parent);
    mounts_under(&names.dir).is_empty()
}

/// The daemon's veths and its bridge.
fn remove_links(names: &DaemonNames) {
    for link in list_links() {
        // Deleting one end of a veth pair deletes the other: check it still exists.
        if link.starts_with(&names.veth_prefix)
            && Path::new("/sys/class/net").join(&link).exists()
            && run(&["ip", "link", "del", &link])
        {
            warn(&format!("veth {link}"));
        }
    }
    if Path::new("/sys/class/net").join(&names.bridge).exists() && run(&["ip", "link", "del", &names.bridge]) {
        warn(&format!("bridge {}", names.bridge));
    }
}

/// Runs a command quietly; true if it succeeded.
fn run(argv: &[&str]) -> bool {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    match run_with_timeout(&mut cmd, Duration::from_secs(20)) {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!("harness: `{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Err(e) => {
            eprintln!("harness: `{}`: {e}", argv.join(" "));
            false
        }
    }
}

/// PIDs whose command line mentions the temp dir or whose cgroup is under the cgroup parent.
fn our_processes(names: &DaemonNames) -> Vec<(u32, String)> {
    let me = std::process::id();
    let dir = names.dir.to_string_lossy().into_owned();
    let cgroup = format!("/{}", names.cgroup_parent);
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || pid <= 1 {
            continue;
        }
        let base = entry.path();
        let stat = std::fs::read_to_string(base.join("stat")).unwrap_or_default();
        if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
            continue; // a zombie is already dead; its parent reaps it
        }
        let cmdline = std::fs::read(base.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
            .unwrap_or_default();
        let cgroups = std::fs::read_to_string(base.join("cgroup")).unwrap_or_default();
        let in_our_cgroup = cgroups
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .any(|path| path.split('/').any(|c| c == names.cgroup_parent) || path.contains(&cgroup));
        if cmdline.contains(&dir) || in_our_cgroup {
            found.push((pid, cmdline));
        }
    }
    found
}

fn kill_processes(names: &DaemonNames) {
    // Containers may be in a frozen v1 freezer cgroup: thaw first, or SIGKILL waits forever.
    for dir in cgroup_dirs(&names.cgroup_parent) {
        let state = dir.join("freezer.state");
        if std::fs::read_to_string(&state).is_ok_and(|s| s.trim() != "THAWED") {
            let _ = std::fs::write(&state, "THAWED");
        }
    }
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = our_processes(names);
        if procs.is_empty() {
            return;
        }
        for (pid, cmdline) in &procs {
            if seen.insert(*pid) {
                warn(&format!("process {pid} ({cmdline})"));
            }
            send_signal(*pid, libc::SIGKILL);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "harness: WARNING: processes survive SIGKILL: {:?}",
                procs.iter().map(|p| p.0).collect::<Vec<_>>()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mount points under `dir` (included), in /proc/self/mountinfo order.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unmount_under(dir: &Path) {
    for _round in 0..5 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        // Deepest first; among equals, the later (stacked on top) first.
        mounts.reverse();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for mount in mounts {
            let Ok(c_path) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: c_path is a valid NUL-terminated path; umount2 does not retain it.
            let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
            if rc == 0 {
                warn(&format!("mount {}", mount.display()));
            }
        }
    }
}

fn remove_netns(names: &DaemonNames) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(&names.id) && run(&["ip", "netns", "delete", &name]) {
            warn(&format!("netns {name}"));
        }
    }
}

fn remove_nft_table(table: &str) {
    let Ok(out) = run_with_timeout(Command::new("nft").args(["list", "tables"]), Duration::from_secs(20)) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, name] = words[..] {
            if name == table && run(&["nft", "delete", "table", family, name]) {
                warn(&format!("nft table {family} {name}"));
            }
        }
    }
}

/// Directories named like (or containing) `parent` in every cgroup hierarchy, to depth 4.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, parent: &str, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_string_lossy().contains(parent) {
                found.push(path);
            } else if depth < 4 {
                walk(&path, depth + 1, parent, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 1, parent, &mut found);
    found
}

fn remove_cgroups(parent: &str) {
    fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&entry.path())?;
            }
        }
        // cgroupfs: rmdir works on a dir with control files but no children and no tasks.
        std::fs::remove_dir(dir)
    }
    for dir in cgroup_dirs(parent) {
        let mut result = rmdir_tree(&dir);
        for _ in 0..20 {
            if result.is_ok() {
                break;
            }
            // A just-killed task may take a moment to leave the cgroup.
            std::thread::sleep(Duration::from_millis(100));
            result = rmdir_tree(&dir);
        }
        match result {
            Ok(()) => warn(&format!("cgroup {}", dir.display())),
            Err(e) => eprintln!("harness: WARNING: cannot remove cgroup {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
