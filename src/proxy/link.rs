//! The daemon's side of the proxy process. The proxy runs as its own process (`deliverous proxy
//! --control …`, the same binary), so that a daemon that crashes, restarts or is upgraded drops
//! no request: the proxy serves on with the last route table it got, and the next daemon
//! re-attaches to it through its control socket.
//!
//! The daemon holds a copy of every listening socket (bound by itself, or taken from the proxy
//! it re-attached to). The sockets therefore never close while a proxy is replaced or restarted:
//! connections wait in the accept queue instead of being refused. Replacing a proxy (another
//! binary after an upgrade, other settings, or `daemon --upgrade`) starts the new one on the
//! same sockets with the current table, then retires the old one, which stops accepting and
//! finishes what it has.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use super::cli::{FIRST_INHERITED_FD, INHERITED_LISTENERS};
use super::control::{self, ListenerDesc, Request};
use super::{ProxyOptions, RouteConfig};

/// How long a starting proxy may take to say it serves.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Control requests that should be instant.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the daemon wants its proxy.
pub struct LinkConfig {
    pub run_dir: PathBuf,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    pub threads: usize,
    /// Further `deliverous proxy` flags (TLS, trusted proxies, timeouts, logs).
    pub args: Vec<String>,
    /// Replace a running proxy even when it runs this binary with these settings.
    pub replace: bool,
    /// Listening sockets from systemd socket activation.
    pub activated: Vec<(ListenerDesc, OwnedFd)>,
}

pub struct ProxyLink {
    cfg: LinkConfig,
    control: PathBuf,
    fingerprint: String,
    /// The newest route table and its generation.
    latest: watch::Sender<(u64, Arc<RouteConfig>)>,
    /// The newest generation the proxy has.
    delivered: watch::Sender<u64>,
    /// Serialises starting and replacing the proxy with pushing tables to it.
    held: tokio::sync::Mutex<Vec<(ListenerDesc, OwnedFd)>>,
    pid: AtomicU32,
    /// This daemon started the proxy (none was running).
    started_here: bool,
    replace_pending: AtomicBool,
    /// Tables are held back until the daemon has re-attached every instance: a table built
    /// half-way would take live instances out of rotation.
    started: watch::Sender<bool>,
    pub http_addrs: Vec<SocketAddr>,
    pub https_addrs: Vec<SocketAddr>,
}

fn fingerprint(cfg: &LinkConfig) -> String {
    format!("http={:?};https={:?};threads={};args={:?}", cfg.http, cfg.https, cfg.threads, cfg.args)
}

impl ProxyLink {
    /// Re-attaches to the proxy already serving under the run dir, or starts one on freshly
    /// bound sockets. A proxy that should be replaced (other binary or settings) is replaced by
    /// [`ProxyLink::finish_start`], once the daemon has rebuilt the route table.
    pub async fn start(cfg: LinkConfig) -> anyhow::Result<Arc<ProxyLink>> {
        let control = cfg.run_dir.join("proxy.sock");
        let fingerprint = fingerprint(&cfg);
        let (latest, _) = watch::channel((0, Arc::new(RouteConfig::default())));
        let (delivered, _) = watch::channel(0);
        let mut link = ProxyLink {
            control,
            fingerprint,
            latest,
            delivered,
            held: tokio::sync::Mutex::new(Vec::new()),
            pid: AtomicU32::new(0),
            started_here: false,
            replace_pending: AtomicBool::new(false),
            started: watch::channel(false).0,
            http_addrs: Vec::new(),
            https_addrs: Vec::new(),
            cfg,
        };
        let running = control::call(&link.control, &Request::Hello, CALL_TIMEOUT).await.ok().and_then(|a| a.hello);
        let (held, child) = match running {
            Some(hello) => {
                let path = link.control.clone();
                let held = tokio::task::spawn_blocking(move || control::take_listeners(&path, CALL_TIMEOUT))
                    .await?
                    .context("cannot take the running proxy's listening sockets")?;
                let same = hello.exe == control::exe_identity() && hello.fingerprint == link.fingerprint;
                link.replace_pending.store(link.cfg.replace || !same, Ordering::Relaxed);
                tracing::info!(pid = hello.pid, "re-attached to the running proxy");
                link.pid.store(hello.pid, Ordering::Relaxed);
                (held, None)
            }
            None => {
                let _ = std::fs::remove_file(&link.control);
                let held = link.listeners_for(Vec::new())?;
                let (pid, child) = link.spawn(&held).await?;
                link.pid.store(pid, Ordering::Relaxed);
                link.started_here = true;
                (held, Some(child))
            }
        };
        for (d, _) in &held {
            let list = if d.https { &mut link.https_addrs } else { &mut link.http_addrs };
            if !list.contains(&d.addr) {
                list.push(d.addr);
            }
        }
        *link.held.get_mut() = held;
        let link = Arc::new(link);
        let pid = link.pid.load(Ordering::Relaxed);
        tokio::spawn(link.clone().watch_process(pid, child));
        tokio::spawn(link.clone().push_routes());
        Ok(link)
    }

    /// Replaces a re-attached proxy that runs another binary or other settings (or any, with
    /// `replace`). Call it once the route table is complete: the new proxy starts with it.
    pub async fn finish_start(self: &Arc<Self>) -> anyhow::Result<()> {
        let replaced = match self.replace_pending.swap(false, Ordering::Relaxed) {
            true => self.replace().await,
            false => Ok(()),
        };
        self.started.send_replace(true);
        replaced
    }

    /// The sockets the proxy should serve: those held (or activated) that are still wanted, and
    /// freshly bound ones for the rest.
    fn listeners_for(&self, held: Vec<(ListenerDesc, OwnedFd)>) -> anyhow::Result<Vec<(ListenerDesc, OwnedFd)>> {
        let mut out: Vec<(ListenerDesc, OwnedFd)> = Vec::new();
        let want = |d: &ListenerDesc| {
            if d.https {
                self.cfg.https.iter().any(|a| same_addr(*a, d.addr))
            } else {
                self.cfg.http.iter().any(|a| same_addr(*a, d.addr))
            }
        };
        for (d, fd) in
            held.into_iter().chain(self.cfg.activated.iter().filter_map(|(d, fd)| Some((*d, fd.try_clone().ok()?))))
        {
            // The same socket may come twice (from the running proxy and from systemd).
            if want(&d) && !out.iter().any(|(o, fd2)| *o == d && socket_id(fd2) == socket_id(&fd)) {
                out.push((d, fd));
            }
        }
        let missing = |addrs: &[SocketAddr], https: bool, have: &[(ListenerDesc, OwnedFd)]| -> Vec<SocketAddr> {
            addrs
                .iter()
                .copied()
                .filter(|a| !have.iter().any(|(d, _)| d.https == https && same_addr(*a, d.addr)))
                .collect()
        };
        let options = ProxyOptions {
            http: missing(&self.cfg.http, false, &out),
            https: missing(&self.cfg.https, true, &out),
            threads: self.cfg.threads,
            ..Default::default()
        };
        for l in super::bind_listeners(&options)? {
            out.push((ListenerDesc { addr: l.addr, https: l.https }, OwnedFd::from(l.socket)));
        }
        Ok(out)
    }

    /// Starts a proxy process on `listeners` with the newest route table; returns when it
    /// serves (or with the reason it cannot).
    async fn spawn(&self, listeners: &[(ListenerDesc, OwnedFd)]) -> anyhow::Result<(u32, tokio::process::Child)> {
        let (generation, config) = self.latest.borrow().clone();
        let routes = self.cfg.run_dir.join("proxy-routes.json");
        let tmp = self.cfg.run_dir.join("proxy-routes.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&*config)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &routes)?;
        let descs: Vec<ListenerDesc> = listeners.iter().map(|l| l.0).collect();
        // Out of the way of descriptors 3.. (where the child wants them) until the fork.
        let mut high = Vec::with_capacity(listeners.len());
        for (_, fd) in listeners {
            // SAFETY: fcntl duplicating a descriptor we own; the result is owned below.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
            if n < 0 {
                bail!("cannot duplicate a listening socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: `n` was just created for us.
            high.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) });
        }
        let raw: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg0("deliverous")
            .arg("proxy")
            .arg("--control")
            .arg(&self.control)
            .arg("--routes")
            .arg(&routes)
            .arg("--pid-file")
            .arg(self.cfg.run_dir.join("proxy.pid"))
            .arg("--fingerprint")
            .arg(&self.fingerprint)
            .args(&self.cfg.args)
            .env(INHERITED_LISTENERS, serde_json::to_string(&descs)?)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: a terminal's Ctrl-C for the daemon does not reach the proxy.
                libc::setsid();
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, FIRST_INHERITED_FD + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("cannot start the proxy process")?;
        drop(high);
        let stdout = child.stdout.take().context("no pipe from the proxy")?;
        let mut line = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line)).await;
        let answer: Option<serde_json::Value> = serde_json::from_str(line.trim()).ok();
        match (read, answer) {
            (Ok(Ok(_)), Some(v)) if v["ready"] == true => {
                let pid = v["pid"].as_u64().unwrap_or(0) as u32;
                self.delivered.send_replace(generation);
                tracing::info!(pid, "proxy started");
                Ok((pid, child))
            }
            (_, Some(v)) if v["error"].is_string() => {
                let _ = child.wait().await;
                bail!("{}", v["error"].as_str().unwrap_or_default())
            }
            (Err(_), _) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!("the proxy did not start within {START_TIMEOUT:?}")
            }
            _ => {
                let status = child.wait().await;
                bail!("the proxy exited during start-up ({status:?}); see the log above")
            }
        }
    }

    /// Starts a new proxy on the same sockets with the current table, then retires the old one.
    async fn replace(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut held = self.held.lock().await;
        let old = self.pid.load(Ordering::Relaxed);
        // Connected before the new proxy takes the control socket's path.
        let old_conn = tokio::net::UnixStream::connect(&self.control).await.ok();
        let listeners = self.listeners_for(std::mem::take(&mut *held))?;
        let spawned = self.spawn(&listeners).await;
        *held = listeners;
        let (pid, child) = spawned?;
        self.pid.store(pid, Ordering::Relaxed);
        tokio::spawn(self.clone().watch_process(pid, Some(child)));
        if let Some(mut conn) = old_conn {
            use tokio::io::AsyncWriteExt;
            let mut line = serde_json::to_vec(&Request::Retire)?;
            line.push(b'\n');
            if let Err(e) = conn.write_all(&line).await {
                tracing::warn!(pid = old, "cannot retire the previous proxy: {e}");
            }
            let mut answer = String::new();
            let _ = tokio::time::timeout(CALL_TIMEOUT, tokio::io::BufReader::new(conn).read_line(&mut answer)).await;
        }
        tracing::info!(old, new = pid, "proxy replaced; the previous one finishes its open connections");
        Ok(())
    }

    /// Restarts the proxy if it dies (a crash, or killed): the sockets stayed open in the daemon,
    /// so clients waited instead of being refused.
    async fn watch_process(self: Arc<Self>, mut pid: u32, mut child: Option<tokio::process::Child>) {
        loop {
            match child.take() {
                Some(mut child) => {
                    let status = child.wait().await;
                    if self.pid.load(Ordering::Relaxed) != pid {
                        return;
                    }
                    tracing::error!(pid, "the proxy exited ({status:?}); starting a new one");
                }
                None => loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if self.pid.load(Ordering::Relaxed) != pid {
                        return;
                    }
                    if !alive(pid) {
                        tracing::error!(pid, "the proxy is gone; starting a new one");
                        break;
                    }
                },
            }
            let mut delay = Duration::from_millis(100);
            loop {
                let mut held = self.held.lock().await;
                if self.pid.load(Ordering::Relaxed) != pid {
                    return;
                }
                let listeners = std::mem::take(&mut *held);
                let spawned = self.spawn(&listeners).await;
                *held = listeners;
                match spawned {
                    Ok((new, c)) => {
                        self.pid.store(new, Ordering::Relaxed);
                        (pid, child) = (new, Some(c));
                        break;
                    }
                    Err(e) => {
                        drop(held);
                        tracing::error!("cannot restart the proxy: {e:#}; again in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }

    /// Sends each new table to the proxy, again after a failure.
    async fn push_routes(self: Arc<Self>) {
        if self.started.subscribe().wait_for(|s| *s).await.is_err() {
            return;
        }
        let mut rx = self.latest.subscribe();
        let mut failures = 0u32;
        loop {
            let (generation, config) = rx.borrow_and_update().clone();
            if generation > *self.delivered.borrow() {
                let held = self.held.lock().await;
                // A proxy started meanwhile got the newest table at its start.
                if generation > *self.delivered.borrow() {
                    let request = Request::Routes { config: (*config).clone() };
                    match control::call(&self.control, &request, CALL_TIMEOUT).await {
                        Ok(_) => {
                            failures = 0;
                            self.delivered.send_replace(generation);
                        }
                        Err(e) => {
                            failures += 1;
                            if failures == 1 || failures % 50 == 0 {
                                tracing::warn!("cannot send the route table to the proxy: {e}; retrying");
                            }
                            drop(held);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
                drop(held);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Swaps in a new route table (sent to the proxy in the background, newest wins).
    pub fn publish(&self, config: RouteConfig) {
        self.latest.send_modify(|(generation, c)| {
            *generation += 1;
            *c = Arc::new(config);
        });
    }

    /// Waits (at most `timeout`) until the proxy has the newest table; false if it did not.
    pub async fn synced(&self, timeout: Duration) -> bool {
        let target = self.latest.borrow().0;
        let mut delivered = self.delivered.subscribe();
        let reached = matches!(tokio::time::timeout(timeout, delivered.wait_for(|d| *d >= target)).await, Ok(Ok(_)));
        reached
    }

    /// Waits until the proxy has the newest table (so `ip` gets no new requests), then until no
    /// request to `ip` is in flight, or `timeout`. Returns how many were still in flight.
    pub async fn drain(&self, ip: IpAddr, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let target = self.latest.borrow().0;
        let mut delivered = self.delivered.subscribe();
        if tokio::time::timeout_at(deadline, delivered.wait_for(|d| *d >= target)).await.is_err() {
            tracing::warn!(%ip, "the proxy did not take the new route table in time");
            return 0;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let request = Request::Drain { ip, timeout_ms: left.as_millis() as u64 };
        match control::call(&self.control, &request, left + CALL_TIMEOUT).await {
            Ok(a) => a.left.unwrap_or(0),
            Err(e) => {
                tracing::warn!(%ip, "cannot drain through the proxy: {e}");
                0
            }
        }
    }

    /// The proxy's metrics (Prometheus text).
    pub async fn metrics(&self) -> String {
        match control::call(&self.control, &Request::Metrics, CALL_TIMEOUT).await {
            Ok(a) => a.text.unwrap_or_default(),
            Err(e) => format!("# the proxy did not answer: {e}\n"),
        }
    }

    /// Requests sent to each backend so far (empty if the proxy does not answer).
    pub async fn backend_requests(&self) -> Vec<control::BackendCount> {
        control::call(&self.control, &Request::Backends, CALL_TIMEOUT).await.map(|a| a.backends).unwrap_or_default()
    }

    /// Stops the proxy (it finishes its open connections first): for a daemon that stops with
    /// no instance left to serve. With instances, the proxy outlives the daemon as they do.
    pub async fn stop(&self) {
        let _held = self.held.lock().await;
        // No respawn: the watcher sees another PID.
        let pid = self.pid.swap(0, Ordering::Relaxed);
        if let Err(e) = control::call(&self.control, &Request::Retire, CALL_TIMEOUT).await {
            tracing::warn!(pid, "cannot stop the proxy: {e}");
        }
    }

    /// Whether this daemon started the proxy (rather than re-attaching to a running one).
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// [`ProxyLink::stop`] without an async runtime (blocking, a second at most).
    pub fn stop_now(&self) {
        use std::io::Write;
        let pid = self.pid.swap(0, Ordering::Relaxed);
        let sent = std::os::unix::net::UnixStream::connect(&self.control).and_then(|mut s| {
            s.set_write_timeout(Some(Duration::from_secs(1)))?;
            let mut line = serde_json::to_vec(&Request::Retire).map_err(std::io::Error::other)?;
            line.push(b'\n');
            s.write_all(&line)
        });
        if let Err(e) = sent {
            tracing::warn!(pid, "cannot stop the proxy: {e}");
        }
    }

    /// PID of the proxy process serving now.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }
}

/// `0.0.0.0:80` given, `0.0.0.0:80` bound; port 0 matches any port.
fn same_addr(wanted: SocketAddr, bound: SocketAddr) -> bool {
    wanted.ip() == bound.ip() && (wanted.port() == 0 || wanted.port() == bound.port())
}

/// The socket's identity (device and inode in sockfs), the same through every duplicate.
fn socket_id(fd: &OwnedFd) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::from(fd.try_clone().ok()?);
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `pid` runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}
