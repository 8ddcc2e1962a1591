//! One instance's life: prepare (IP lease, network namespace, overlay rootfs, bundle), start
//! through a shim, watch until it ends, and free everything it used. Also re-attaches to the
//! shims of a previous daemon and sweeps what a crash left behind.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use deliverous_images::Image;
use deliverous_runtime::network::{veth_name, SandboxPlan};
use deliverous_runtime::shim::protocol::{ExitStatus, Reply, Request};
use deliverous_runtime::{cgroup, rootfs, spec, user, userns, volume};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::{lock, Live, State, Supervisor, SupervisorError};
use crate::apps::store::InstanceRow;
use crate::apps::{self, App, Revision};
use crate::events::Kind;

/// Signal numbers for the names images use in `STOPSIGNAL`.
pub fn parse_signal(name: Option<&str>) -> i32 {
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return libc::SIGTERM;
    };
    if let Ok(n) = name.parse::<i32>() {
        return n;
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    match bare {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "WINCH" => libc::SIGWINCH,
        _ => libc::SIGTERM,
    }
}

fn new_uid() -> String {
    let n: u64 = rand::random();
    format!("{:012x}", n & 0xffff_ffff_ffff)
}

impl Supervisor {
    pub(super) fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let subnet = self.net.config().subnet;
        let first = u32::from(subnet.first_host());
        let last = u32::from(subnet.broadcast());
        // The first host is the bridge (gateway).
        (first + 1..last).map(Ipv4Addr::from)
    }

    /// Starts one instance of `rev` in `slot` and waits until it accepts connections on the
    /// app's port (or the ready timeout passes: it then stays out of rotation until it does).
    pub(super) async fn start_instance(
        self: &Arc<Self>,
        app: &App,
        rev: &Revision,
        image: &Image,
        slot: u32,
    ) -> Result<String, SupervisorError> {
        let uid = self.launch_instance(app, rev, image, slot).await?;
        let ip = lock(&self.live).get(&uid).map(|l| l.row.ip);
        if let Some(ip) = ip {
            self.wait_ready(&uid, SocketAddr::from((ip, rev.spec.port))).await;
        }
        Ok(uid)
    }

    /// Starts one instance of `rev` in `slot`, out of rotation (`Starting`) until someone
    /// decides it is ready.
    pub(super) async fn launch_instance(
        self: &Arc<Self>,
        app: &App,
        rev: &Revision,
        image: &Image,
        slot: u32,
    ) -> Result<String, SupervisorError> {
        let uid = new_uid();
        let began = std::time::Instant::now();
        prime_cgroup_attach();
        let row = self.store.insert_instance(&uid, &app.name, slot, rev.number, self.hosts())?;
        let prepared = {
            let me = self.clone();
            let (row, rev, image) = (row.clone(), rev.clone(), image.clone());
            tokio::task::spawn_blocking(move || me.prepare(&row, &rev, &image)).await
        };
        let prepared = prepared.unwrap_or_else(|join| Err(format!("preparation task failed: {join}")));
        let stop_signal = match prepared {
            Ok(sig) => sig,
            Err(msg) => {
                self.release(&row, false).await;
                return Err(SupervisorError::Instance(format!("cannot prepare instance {}.{slot}: {msg}", app.name)));
            }
        };
        let prepared_at = began.elapsed();
        let pid = match self.spawn_shim(&row).await {
            Ok(pid) => pid,
            Err(msg) => {
                self.release(&row, true).await;
                return Err(SupervisorError::Instance(format!("instance {}.{slot} did not start: {msg}", app.name)));
            }
        };
        let (done_tx, done_rx) = watch::channel(false);
        lock(&self.live).insert(
            uid.clone(),
            Live {
                row: row.clone(),
                state: State::Starting,
                pid: Some(pid),
                stop_requested: false,
                started: std::time::Instant::now(),
                stop_signal,
                stop_grace: self.settings.grace(&rev.spec),
                done: done_rx,
            },
        );
        tracing::info!(app = %app.name, "instance {}.{slot} ({uid}) started, pid {pid}, ip {}", app.name, row.ip);
        self.events.emit(
            Kind::InstanceStarted,
            &app.name,
            Some(&format!("{}.{slot}", app.name)),
            format!("started {uid} (revision {}, pid {pid}, ip {})", rev.number, row.ip),
        );
        self.spawn_watcher(row.clone(), done_tx);
        tracing::debug!(
            app = %app.name,
            "instance {}.{slot} start: prepared (rootfs, spec, network) after {} ms, running after {} ms",
            app.name,
            prepared_at.as_millis(),
            began.elapsed().as_millis()
        );
        Ok(uid)
    }

    /// Blocking: the bind mounts of an app's volumes. A named volume used for the first time is
    /// created with what the image has at its target (owner and mode included), as Docker does.
    fn volume_binds(
        &self,
        rev: &Revision,
        rootfs: &Path,
        uid: &str,
        idmap: Option<&spec::IdMap>,
    ) -> Result<Vec<spec::Bind>, String> {
        let s = &self.settings;
        s.check_host_paths(&rev.spec)?;
        let mut binds = Vec::new();
        for v in &rev.spec.volumes {
            let v = volume::parse(v)?;
            let source = match &v.source {
                volume::Source::Host(path) => path.clone(),
                volume::Source::Named(name) => {
                    let dir = s.volume_dir(name);
                    if !dir.exists() {
                        create_volume(&dir, seed_dir(rootfs, &v.target).as_deref(), uid, idmap)
                            .map_err(|e| format!("creating volume {name}: {e}"))?;
                    }
                    dir
                }
            };
            if let Some(map) = idmap {
                super::userns::make_reachable(&source.join("."), &s.data_dir, map)?;
            }
            binds.push(spec::Bind { source, destination: v.target, read_only: v.read_only });
        }
        Ok(binds)
    }

    /// Blocking: everything an instance needs before its shim runs. Undoes nothing itself: the
    /// caller's `release` removes whatever exists.
    pub(super) fn prepare(&self, row: &InstanceRow, rev: &Revision, image: &Image) -> Result<i32, String> {
        let s = &self.settings;
        let dir = s.instance_dir(&row.uid);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let layers = self.images.layer_dirs(image);
        let idmap = if rev.spec.userns { Some(self.userns_map(&row.app).map_err(|e| e.to_string())?) } else { None };
        let mut idmapped = None;
        if let Some(map) = &idmap {
            super::userns::make_reachable(&dir.join("rootfs"), &s.data_dir, map)?;
            // The instance's root directory and all it writes belong to its root.
            let upper = dir.join("upper");
            std::fs::create_dir_all(&upper).map_err(|e| format!("{}: {e}", upper.display()))?;
            userns::own_as_root(&upper, map).map_err(|e| format!("{}: {e}", upper.display()))?;
            // The image's layers are shared: not chowned, but seen through idmapped mounts
            // where the kernel can. Otherwise they stay host root's: `nobody` inside, readable
            // and executable but not writable in place (see README, --userns).
            idmapped = match userns::mount_overlay_idmapped(&dir, &layers, map) {
                Ok(path) => Some(path),
                Err(e) => {
                    tracing::warn!(app = %row.app, "{e}: the image's files stay host root's (nobody inside)");
                    None
                }
            };
        }
        let rootfs_path = match idmapped {
            Some(path) => path,
            None => rootfs::mount_overlay(&dir, &layers).map_err(|e| e.to_string())?,
        };
        let hostname = format!("{}.{}", row.app, row.slot);
        let passwd = user::read_etc_file(&rootfs_path, "passwd");
        let group = user::read_etc_file(&rootfs_path, "group");
        let who = user::resolve(image.config.user.as_deref(), &passwd, &group).map_err(|e| e.to_string())?;
        if let Some(map) = &idmap {
            let unmapped = std::iter::once(who.uid).chain([who.gid]).chain(who.additional_gids.iter().copied());
            if let Some(id) = unmapped.into_iter().find(|id| map.to_host(*id).is_none()) {
                return Err(format!(
                    "the image's user ({:?}) has id {id}, outside the {} ids of the app's user namespace",
                    image.config.user.as_deref().unwrap_or_default(),
                    map.size
                ));
            }
        }
        let binds = self.volume_binds(rev, &rootfs_path, &row.uid, idmap.as_ref())?;
        let args = spec::command_line(&image.config.entrypoint, &image.config.cmd);
        if args.is_empty() {
            return Err(format!("image {} has neither Entrypoint nor Cmd: nothing to run", rev.image));
        }
        let etc = [
            ("hosts", rootfs::hosts_file(&hostname, Some(row.ip))),
            ("hostname", format!("{hostname}\n")),
            ("resolv.conf", rootfs::resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())),
        ];
        let mut etc_files = Vec::new();
        for (name, content) in etc {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(map) = &idmap {
                // Root inside may rewrite them, as it may without a user namespace.
                userns::own_as_root(&path, map).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let dest: &'static str = match name {
                "hosts" => "/etc/hosts",
                "hostname" => "/etc/hostname",
                _ => "/etc/resolv.conf",
            };
            etc_files.push((path, dest));
        }
        if let Some(map) = &idmap {
            let points = etc_files.iter().map(|(_, dest)| (*dest, false));
            for (dest, dir) in points.chain(binds.iter().map(|b| (b.destination.as_str(), true))) {
                userns::make_mount_point(&rootfs_path, dest, dir, map)
                    .map_err(|e| format!("mount point {dest} in the root filesystem: {e}"))?;
            }
        }
        let instance = spec::InstanceSpec {
            hostname: hostname.clone(),
            process: spec::Process {
                args,
                env: spec::merge_env(&image.config.env, &hostname, rev.spec.port, &rev.spec.env),
                cwd: image.config.working_dir.clone().filter(|w| w.starts_with('/')).unwrap_or_else(|| "/".into()),
                uid: who.uid,
                gid: who.gid,
                additional_gids: who.additional_gids,
            },
            rootfs: rootfs_path,
            netns: s.netns_path(&row.uid),
            cgroups_path: s.cgroups_path(&row.uid),
            resources: spec::Resources {
                memory_bytes: rev.spec.memory,
                cpus: rev.spec.cpus,
                cpu_weight: rev.spec.cpu_weight.map(u64::from),
                pids: Some(i64::from(rev.spec.pids.unwrap_or(apps::DEFAULT_PIDS))),
            },
            etc_files,
            cgroup_v2: cgroup::unified(),
            binds,
            capabilities: spec::capabilities(&rev.spec.cap_add, &rev.spec.cap_drop)
                .map_err(|e| format!("app capabilities: {e}"))?,
            userns: idmap,
        };
        let config = serde_json::to_vec_pretty(&spec::render(&instance)).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("config.json"), config).map_err(|e| format!("config.json: {e}"))?;
        let netns = s.netns_path(&row.uid);
        if let Some(parent) = netns.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let veth = veth_name(&self.net.config().veth_prefix, &row.uid);
        if idmap.is_some() {
            // The container makes its own network namespace (owned by its user namespace);
            // its shim plugs it between build and start, as the plan says.
            SandboxPlan { network: self.net.config().clone(), ns_path: netns, veth, ip: row.ip }.save(&dir)?;
        } else {
            self.net.create_sandbox(&netns, &veth, row.ip).map_err(|e| e.to_string())?;
        }
        Ok(parse_signal(image.config.stop_signal.as_deref()))
    }

    /// `deliverous shim …` for the prepared instance `row`, with what every shim gets: its
    /// bundle, state root, log, control socket, exit file and cgroup; stdout piped for its
    /// report, its own process group (a ^C to a foreground daemon must not reach instances).
    pub(super) fn shim_command(&self, row: &InstanceRow) -> Result<tokio::process::Command, String> {
        let s = &self.settings;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find our own binary: {e}"))?;
        let socket = s.shim_socket(&row.uid);
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let dir = s.instance_dir(&row.uid);
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("shim")
            .arg("--id")
            .arg(&row.uid)
            .arg("--bundle")
            .arg(&dir)
            .arg("--state-root")
            .arg(s.container_root())
            .arg("--log")
            .arg(dir.join("log"))
            .arg("--socket")
            .arg(&socket)
            .arg("--exit-file")
            .arg(dir.join("exit.json"))
            .arg("--cgroups-path")
            .arg(s.cgroups_path(&row.uid))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false);
        Ok(cmd)
    }

    /// Runs `deliverous shim …` for the prepared instance; returns the container's pid.
    async fn spawn_shim(&self, row: &InstanceRow) -> Result<i32, String> {
        let s = &self.settings;
        let mut cmd = self.shim_command(row)?;
        cmd.arg("--log-max-bytes").arg(s.log_max_bytes.to_string()).arg("--log-keep").arg(s.log_keep.to_string());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run the shim: {e}"))?;
        let stdout = child.stdout.take().ok_or("shim has no stdout")?;
        // Reap the shim whenever it exits, so it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), BufReader::new(stdout).read_line(&mut line)).await;
        match read {
            Err(_) => Err("the shim did not report within 60 s".into()),
            Ok(Err(e)) => Err(format!("reading the shim's report: {e}")),
            Ok(Ok(_)) => match line.trim().split_once(' ') {
                Some(("ok", pid)) => pid.parse().map_err(|_| format!("shim reported a bad pid {pid:?}")),
                Some(("error", msg)) => Err(msg.to_string()),
                _ => Err(format!("the shim exited without a report ({:?})", line.trim())),
            },
        }
    }

    /// Polls the instance's port until it accepts a TCP connection, then puts it in rotation.
    async fn wait_ready(self: &Arc<Self>, uid: &str, addr: SocketAddr) {
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        if !self.probe_ready(uid, addr, Some(deadline)).await {
            tracing::warn!("instance {uid} does not accept connections on {addr} yet; keeping it out of rotation");
            let me = self.clone();
            let uid = uid.to_string();
            tokio::spawn(async move { me.probe_ready(&uid, addr, None).await });
        }
    }

    /// Connects to `addr` with backoff until it accepts (the instance goes into rotation), the
    /// instance is no longer starting, or `deadline` passes (then `false`).
    async fn probe_ready(
        self: &Arc<Self>,
        uid: &str,
        addr: SocketAddr,
        deadline: Option<tokio::time::Instant>,
    ) -> bool {
        // Every millisecond for the first 50 ms (a small app listens a few milliseconds after
        // its exec, and every millisecond there is time to its first request), every few
        // milliseconds until two seconds (most apps are up by then, and each miss costs one
        // refused SYN), then backing off; after the deadline, a slow background poll.
        let max_delay = if deadline.is_some() { Duration::from_millis(200) } else { Duration::from_secs(1) };
        let began = tokio::time::Instant::now();
        let (eager_until, fast_until) = (began + Duration::from_millis(50), began + Duration::from_secs(2));
        let mut delay = Duration::from_millis(if deadline.is_some() { 1 } else { 3 });
        loop {
            let starting = lock(&self.live).get(uid).map(|l| l.state == State::Starting).unwrap_or(false);
            if !starting {
                return true;
            }
            let attempt = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await;
            if let Ok(Ok(_)) = attempt {
                let ready = lock(&self.live).get_mut(uid).filter(|l| l.state == State::Starting).map(|l| {
                    l.state = State::Ready;
                    (l.row.app.clone(), l.row.slot)
                });
                self.publish_routes();
                if let Some((app, slot)) = ready {
                    self.events.emit(
                        Kind::InstanceReady,
                        &app,
                        Some(&format!("{app}.{slot}")),
                        format!("{uid} accepts connections on {addr}: in rotation"),
                    );
                }
                self.watch_health(uid);
                return true;
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return false;
            }
            tokio::time::sleep(delay).await;
            let now = tokio::time::Instant::now();
            if now >= fast_until {
                delay = (delay * 2).min(max_delay);
            } else if now >= eager_until {
                delay = Duration::from_millis(3);
            }
        }
    }

    /// Waits on the shim until the instance ends, then frees everything and lets the app
    /// converge again if nobody asked for the stop.
    fn spawn_watcher(self: &Arc<Self>, row: InstanceRow, done: watch::Sender<bool>) {
        let me = self.clone();
        tokio::spawn(async move {
            let socket = me.settings.shim_socket(&row.uid);
            let exit = wait_exit(&socket).await;
            let exit = match exit {
                Some(e) => Some(e),
                // The shim is gone without a word: it may have written the exit file first.
                None => read_exit_file(&me.settings.instance_dir(&row.uid).join("exit.json")),
            };
            let shim_lost = exit.is_none();
            let (requested, uptime) = {
                let mut live = lock(&me.live);
                let requested = live.get(&row.uid).map(|l| l.stop_requested).unwrap_or(true);
                let uptime = live.get(&row.uid).map(|l| l.started.elapsed()).unwrap_or_default();
                if let Some(l) = live.get_mut(&row.uid) {
                    l.state = State::Stopping;
                }
                (requested, uptime)
            };
            me.publish_routes();
            if let Some(e) = &exit {
                tracing::info!(app = %row.app, "instance {}.{} ({}) ended: {}", row.app, row.slot, row.uid, e.reason());
            }
            me.release(&row, shim_lost).await;
            lock(&me.live).remove(&row.uid);
            me.after_exit(&row, exit, requested, uptime);
            // After `after_exit`: whoever waits on `done` finds the exit recorded.
            let _ = done.send(true);
        });
    }

    /// Stops an instance (its stop signal, then SIGKILL after the grace period) and waits until
    /// everything it used is gone.
    pub(super) async fn stop_instance(self: &Arc<Self>, uid: &str) {
        let (mut done, signal, grace, app, addr) = {
            let mut live = lock(&self.live);
            let Some(l) = live.get_mut(uid) else { return };
            l.stop_requested = true;
            let was_routed = l.state == State::Ready;
            l.state = State::Stopping;
            (l.done.clone(), l.stop_signal, l.stop_grace, l.row.app.clone(), was_routed.then_some(l.row.ip))
        };
        self.publish_routes();
        // Out of rotation now; what it is serving may finish before it is signalled.
        if let Some(ip) = addr {
            let drain = self.store.app(&app).ok().flatten().map(|a| a.spec.routing.drain_timeout());
            let drain = drain.unwrap_or(Duration::from_millis(crate::apps::DEFAULT_DRAIN_TIMEOUT_MS));
            let left = self.routes.drain(ip.into(), drain).await;
            if left > 0 {
                tracing::warn!(app = %app, "instance {uid} still had {left} requests in flight at the end of its drain timeout");
            }
        }
        let socket = self.settings.shim_socket(uid);
        let req = Request::Stop { signal, timeout_ms: grace.as_millis() as u64 };
        if let Err(e) = send_request(&socket, &req, None).await {
            tracing::debug!("stop {uid}: {e}");
        }
        let timed_out = tokio::time::timeout(grace + Duration::from_secs(20), done.wait_for(|d| *d)).await.is_err();
        if timed_out {
            tracing::error!("instance {uid} did not stop in time; forcing cleanup");
            let row = lock(&self.live).get(uid).map(|l| l.row.clone());
            if let Some(row) = row {
                self.release(&row, true).await;
                lock(&self.live).remove(uid);
            }
        }
    }

    /// Frees an instance's resources: processes (if `force`), cgroup, rootfs mount, network
    /// namespace and veth, directories, socket, IP lease. Idempotent.
    pub(super) async fn release(self: &Arc<Self>, row: &InstanceRow, force: bool) {
        let me = self.clone();
        let row2 = row.clone();
        let result = tokio::task::spawn_blocking(move || me.release_blocking(&row2, force)).await;
        match result {
            Ok(errors) => {
                for e in errors {
                    tracing::warn!("cleaning up instance {}: {e}", row.uid);
                }
            }
            Err(e) => tracing::error!("cleanup task of {} failed: {e}", row.uid),
        }
        if let Err(e) = self.store.delete_instance(&row.uid) {
            tracing::error!("cannot forget instance {}: {e}", row.uid);
        }
    }

    fn release_blocking(&self, row: &InstanceRow, force: bool) -> Vec<String> {
        let s = &self.settings;
        let mut errors = Vec::new();
        let cgroups_path = s.cgroups_path(&row.uid);
        if force || !cgroup::dirs(&cgroups_path).is_empty() {
            if let Err(e) = cgroup::kill_and_remove(&cgroups_path) {
                errors.push(format!("cgroup {cgroups_path}: {e}"));
            }
        }
        let state = s.container_root().join(&row.uid);
        if state.exists() {
            if let Err(e) = std::fs::remove_dir_all(&state) {
                errors.push(format!("{}: {e}", state.display()));
            }
        }
        let dir = s.instance_dir(&row.uid);
        let unmounted = match rootfs::unmount_overlay(&dir) {
            Ok(()) => true,
            Err(e) => {
                errors.push(e.to_string());
                false
            }
        };
        if let Err(e) =
            self.net.remove_sandbox(&s.netns_path(&row.uid), &veth_name(&self.net.config().veth_prefix, &row.uid))
        {
            errors.push(e.to_string());
        }
        // Never delete through a mount point that is still there.
        if unmounted && !is_mounted(&dir.join("rootfs")) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("{}: {e}", dir.display()));
                }
            }
        }
        let _ = std::fs::remove_file(s.shim_socket(&row.uid));
        errors
    }

    /// At start-up: re-attach to the shims of instances that still run, free what is left of
    /// the others, then converge every app.
    pub async fn recover(self: &Arc<Self>) -> Result<(), SupervisorError> {
        self.load_slots()?;
        for row in self.store.instances()? {
            if row.slot == super::run::RUN_SLOT {
                // A one-off instance's client was attached to the previous daemon: it is gone.
                tracing::info!(
                    "one-off instance {} lost its client; removing it",
                    super::run::run_name(&row.app, &row.uid)
                );
                self.release(&row, true).await;
                continue;
            }
            let socket = self.settings.shim_socket(&row.uid);
            let state = send_request(&socket, &Request::State, Some(Duration::from_secs(2))).await;
            match state {
                Ok(Reply { ok: true, exit: None, pid, .. }) => {
                    let app = self.store.app(&row.app)?;
                    let rev = self.store.revision(&row.app, row.revision)?;
                    let (Some(app), Some(rev)) = (app, rev) else {
                        self.release(&row, true).await;
                        continue;
                    };
                    let stop_signal = self
                        .image_for(&rev)
                        .map(|i| parse_signal(i.config.stop_signal.as_deref()))
                        .unwrap_or(libc::SIGTERM);
                    let (done_tx, done_rx) = watch::channel(false);
                    // One that accepts goes straight back into rotation: the proxy must not
                    // lose it while this daemon starts.
                    let addr = SocketAddr::from((row.ip, app.spec.port));
                    let accepts = matches!(
                        tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await,
                        Ok(Ok(_))
                    );
                    lock(&self.live).insert(
                        row.uid.clone(),
                        Live {
                            row: row.clone(),
                            state: if accepts { State::Ready } else { State::Starting },
                            pid,
                            stop_requested: false,
                            started: std::time::Instant::now(),
                            stop_signal,
                            stop_grace: self.settings.grace(&rev.spec),
                            done: done_rx,
                        },
                    );
                    tracing::info!("re-attached to instance {}.{} ({})", row.app, row.slot, row.uid);
                    self.spawn_watcher(row.clone(), done_tx);
                    if accepts {
                        // Checked again from scratch: the previous daemon's probe results
                        // went with it.
                        self.watch_health(&row.uid);
                    } else {
                        let me = self.clone();
                        tokio::spawn(async move { me.wait_ready(&row.uid, addr).await });
                    }
                }
                _ => {
                    tracing::info!("instance {}.{} ({}) did not survive; cleaning up", row.app, row.slot, row.uid);
                    self.release(&row, true).await;
                    self.events.emit(
                        Kind::InstanceExited,
                        &row.app,
                        Some(&format!("{}.{}", row.app, row.slot)),
                        format!("{} did not survive the daemon's absence (host reboot or crash); cleaned up", row.uid),
                    );
                }
            }
        }
        self.sweep_orphans();
        self.publish_routes();
        for app in self.store.apps()? {
            let me = self.clone();
            tokio::spawn(async move { me.resume_or_converge(&app.name).await });
        }
        Ok(())
    }

    /// Instance directories and namespaces that no record owns: left by a crash between
    /// creating them and recording the instance.
    fn sweep_orphans(&self) {
        let s = &self.settings;
        let mut known: std::collections::HashSet<String> = lock(&self.live).keys().cloned().collect();
        if let Ok(rows) = self.store.instances() {
            known.extend(rows.into_iter().map(|r| r.uid));
        }
        // An instance leaves traces in several places, created in turn; a crash can stop
        // anywhere between them, so every place is a source of leftovers.
        let parent_cgroups = cgroup::dirs(&format!("/{}", s.cgroup_parent));
        let mut places = vec![s.data_dir.join("instances"), s.run_dir.join("netns"), s.container_root()];
        places.extend(parent_cgroups);
        let mut orphans = std::collections::BTreeSet::new();
        for place in &places {
            let Ok(entries) = std::fs::read_dir(place) else { continue };
            for entry in entries.flatten() {
                let uid = entry.file_name().to_string_lossy().to_string();
                if is_instance_uid(&uid) && !known.contains(&uid) {
                    orphans.insert(uid);
                }
            }
        }
        // Veths carry a shortened uid: those matching no instance we know of are left over. Only
        // links named exactly like ours, never the bridge, and enslaved to our bridge if at all.
        let config = self.net.config();
        let prefix = &config.veth_prefix;
        let known_veths: std::collections::HashSet<String> =
            known.iter().chain(orphans.iter()).map(|uid| veth_name(prefix, uid)).collect();
        let veth_len = veth_name(prefix, "000000000000").len();
        if let Ok(links) = std::fs::read_dir("/sys/class/net") {
            for link in links.flatten() {
                let name = link.file_name().to_string_lossy().to_string();
                let ours = name.len() == veth_len
                    && name != config.bridge
                    && name.strip_prefix(prefix.as_str()).is_some_and(|rest| !rest.is_empty() && is_hex(rest))
                    && std::fs::read_link(link.path().join("master"))
                        .map_or(true, |m| m.file_name().is_some_and(|b| b.to_string_lossy() == config.bridge));
                if ours && !known_veths.contains(&name) {
                    tracing::info!("sweeping leftover veth {name}");
                    if let Err(e) = self.net.remove_sandbox(&s.run_dir.join("netns").join(".none"), &name) {
                        tracing::warn!("sweeping veth {name}: {e}");
                    }
                }
            }
        }
        for uid in orphans {
            tracing::info!("sweeping leftover instance {uid}");
            let row = InstanceRow {
                uid: uid.clone(),
                app: String::new(),
                slot: 0,
                revision: 0,
                ip: Ipv4Addr::UNSPECIFIED,
                created_at: String::new(),
            };
            for e in self.release_blocking(&row, true) {
                tracing::warn!("sweeping {uid}: {e}");
            }
        }
    }

    /// At shutdown: instances keep running under their shims. When none is left, the host
    /// objects (bridge, nft table, cgroup parent) go too.
    pub fn shutdown(&self) {
        if self.live_count() == 0 && self.store.instances().map(|i| i.is_empty()).unwrap_or(false) {
            if let Err(e) = self.net.teardown() {
                tracing::warn!("removing host network: {e}");
            }
            cgroup::remove_empty(&format!("/{}", self.settings.cgroup_parent));
        } else {
            tracing::info!("{} instances keep running; they will be re-attached at the next start", self.live_count());
        }
    }
}

/// Instance uids are 12 lowercase hex digits (see `new_uid`).
fn is_instance_uid(name: &str) -> bool {
    name.len() == 12 && is_hex(name)
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let target = path.to_string_lossy();
    info.lines().any(|l| l.split_whitespace().nth(4) == Some(target.as_ref()))
}

pub(super) fn read_exit_file(path: &Path) -> Option<ExitStatus> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Sends one request to a shim and reads its reply (waiting at most `timeout` if given).
pub async fn send_request(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<Reply, String> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await.map_err(|e| e.to_string())?;
        if reply.is_empty() {
            return Err("the shim closed the connection".to_string());
        }
        serde_json::from_str::<Reply>(&reply).map_err(|e| format!("bad reply from shim: {e}"))
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, exchange).await.map_err(|_| "shim did not answer in time".to_string())?,
        None => exchange.await,
    }
}

async fn wait_exit(socket: &Path) -> Option<ExitStatus> {
    send_request(socket, &Request::Wait, None).await.ok().and_then(|r| r.exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals() {
        assert_eq!(parse_signal(None), libc::SIGTERM);
        assert_eq!(parse_signal(Some("SIGQUIT")), libc::SIGQUIT);
        assert_eq!(parse_signal(Some("quit")), libc::SIGQUIT);
        assert_eq!(parse_signal(Some("9")), 9);
        assert_eq!(parse_signal(Some("SIGWHATEVER")), libc::SIGTERM);
    }
}

/// The image's directory at `target` inside `rootfs`, if there is one reached without any
/// symlink: the image is untrusted, and a symlink there could point at the host's files.
fn seed_dir(rootfs: &Path, target: &str) -> Option<std::path::PathBuf> {
    let mut path = rootfs.to_path_buf();
    for component in Path::new(target).components().skip(1) {
        path.push(component);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_dir() {
            return None;
        }
    }
    Some(path)
}

/// Makes volume directory `dir`, seeded from `seed` (the image's content at the mount point) if
/// there is one. Built aside and renamed into place: a volume directory is complete or
/// absent, and of two instances creating it at once one wins, the other uses the winner's.
/// For an instance in a user namespace (`idmap`), the volume is owned by the ids its owners
/// map to.
fn create_volume(dir: &Path, seed: Option<&Path>, uid: &str, idmap: Option<&spec::IdMap>) -> std::io::Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}-{uid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)?;
    let seeded = match seed {
        Some(seed) => volume::copy_up(seed, &tmp),
        None => Ok(()),
    };
    let seeded = seeded.and_then(|()| match idmap {
        Some(map) => deliverous_runtime::userns::shift_tree(&tmp, map),
        None => Ok(()),
    });
    let result = seeded.and_then(|()| match std::fs::rename(&tmp, dir) {
        Err(_) if dir.is_dir() => std::fs::remove_dir_all(&tmp),
        other => other,
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod volume_tests {
    use super::*;

    #[test]
    fn a_volume_is_never_seeded_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("var/lib/app")).unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("data")).unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("var/link")).unwrap();
        assert_eq!(seed_dir(&rootfs, "/var/lib/app"), Some(rootfs.join("var/lib/app")));
        assert_eq!(seed_dir(&rootfs, "/data"), None, "a symlink to the host's /etc");
        assert_eq!(seed_dir(&rootfs, "/var/link/ssl"), None, "a symlink on the way");
        assert_eq!(seed_dir(&rootfs, "/missing"), None);
    }
}

/// Starts the cgroup attach lock's RCU wait as an instance start begins, so that the shim's
/// cgroup writes, milliseconds later, wait only for what is left of it (see
/// `deliverous_runtime::cgroup::prime_attach`; the shim primes too, later). One at a time: a
/// burst of starts shares one grace period.
fn prime_cgroup_attach() {
    static PRIMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if PRIMING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    tokio::task::spawn_blocking(|| {
        deliverous_runtime::cgroup::prime_attach_blocking();
        PRIMING.store(false, std::sync::atomic::Ordering::Release);
    });
}
