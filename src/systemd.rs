//! The three small systemd protocols the daemon speaks, without libsystemd: readiness and status
//! notifications (`sd_notify`: one datagram to `$NOTIFY_SOCKET`), socket activation (listening
//! sockets handed over from fd 3 on, described by `$LISTEN_PID`/`$LISTEN_FDS`/`$LISTEN_FDNAMES`),
//! and journald's stream protocol (`$JOURNAL_STREAM`: our stderr goes to the journal, which
//! timestamps lines itself and reads `<N>` syslog priority prefixes).
//!
//! The environment is read once, in `deliverous daemon`'s `main` before any thread exists, and
//! the variables are removed so that the shims and the proxy the daemon spawns do not mistake
//! themselves for the service.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::Duration;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

// ---------------------------------------------------------------------------------------------
// sd_notify

/// Where notifications go: a filesystem path or a Linux abstract socket name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends `READY=1`, `STATUS=…`, `STOPPING=1` and watchdog pings to the service manager. Without
/// `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads and removes `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Call it before
    /// any thread is started (it changes the environment).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(name);
        }
        let target = socket.and_then(parse_target);
        let watchdog = match target {
            Some(_) => watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()),
            None => None,
        };
        Notifier { target, watchdog }
    }

    /// How often to send `WATCHDOG=1` (half the manager's `WatchdogSec`), if it asked for pings.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) in one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        let sent = match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                socket.send_to_addr(state.as_bytes(), &SocketAddr::from_abstract_name(name)?)?
            }
        };
        if sent != state.len() {
            return Err(io::Error::other(format!("notification truncated: sent {sent} of {} bytes", state.len())));
        }
        Ok(())
    }

    /// [`Notifier::notify`], logging a failure instead of returning it: a service manager that
    /// cannot be told is no reason to stop serving.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!("cannot notify the service manager ({:?}): {e}", state.lines().next().unwrap_or(""));
        }
    }
}

/// `@name` is an abstract socket; an absolute path is a file; anything else is not for us.
fn parse_target(value: OsString) -> Option<Target> {
    use std::os::unix::ffi::OsStringExt;
    let bytes = value.into_vec();
    match bytes.first() {
        Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
        Some(b'/') => Some(Target::Path(PathBuf::from(OsString::from_vec(bytes)))),
        _ => None,
    }
}

/// Half of `WATCHDOG_USEC` (systemd's advice), when `WATCHDOG_PID` is absent or names us.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

// ---------------------------------------------------------------------------------------------
// Socket activation

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors")]
    BadCount(String),
    #[error("LISTEN_FDNAMES names {names} descriptors but LISTEN_FDS passes {fds}")]
    NameCount { names: usize, fds: usize },
    #[error("socket-activated descriptor {fd} is not open: {source}")]
    Closed { fd: RawFd, source: nix::Error },
    #[error("socket-activated {name:?} (fd {fd}) is not a listening {expected} socket: {found}")]
    WrongKind { name: String, fd: RawFd, expected: &'static str, found: String },
    #[error("cannot inspect socket-activated {name:?} (fd {fd}): {source}")]
    Inspect { name: String, fd: RawFd, source: io::Error },
}

/// The listening sockets systemd passed us, by name (`FileDescriptorName=`; systemd names
/// unnamed ones after their socket unit). Take the ones you serve; [`Activation::remaining`]
/// tells which were left unused.
#[derive(Debug, Default)]
pub struct Activation {
    fds: Vec<(String, OwnedFd)>,
}

impl Activation {
    /// Reads and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`; the descriptors are
    /// marked close-on-exec. No activation (or one meant for another process): no sockets.
    /// Call it before any thread is started and before anything opens a file.
    pub fn from_env() -> Result<Activation, ActivationError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let count = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
        let passed = parse_listen_env(pid.as_deref(), count.as_deref(), names.as_deref(), std::process::id())?;
        let mut fds = Vec::with_capacity(passed.len());
        for (fd, name) in passed {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|source| ActivationError::Closed { fd, source })?;
            // SAFETY: `fd` is open (F_SETFD succeeded) and, by the activation protocol, was
            // passed to this process (LISTEN_PID is ours) for it to own; nothing else in the
            // process refers to descriptors 3.. this early, so ownership is not shared.
            fds.push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        Ok(Activation { fds })
    }

    /// The passed unix stream listener named `name`, if there is one. It is left blocking.
    pub fn take_unix(&mut self, name: &str) -> Result<Option<UnixListener>, ActivationError> {
        let Some(index) = self.fds.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (name, fd) = self.fds.remove(index);
        check_kind(&name, &fd, "unix stream", |d| d == socket2::Domain::UNIX)?;
        Ok(Some(UnixListener::from(fd)))
    }

    /// Every passed TCP listener named `name` (a socket unit may listen on several addresses,
    /// all under its one name). They are left blocking.
    pub fn take_tcp(&mut self, name: &str) -> Result<Vec<std::net::TcpListener>, ActivationError> {
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for (n, fd) in std::mem::take(&mut self.fds) {
            if n == name {
                taken.push((n, fd));
            } else {
                kept.push((n, fd));
            }
        }
        self.fds = kept;
        let mut listeners = Vec::with_capacity(taken.len());
        for (n, fd) in taken {
            check_kind(&n, &fd, "TCP", |d| d == socket2::Domain::IPV4 || d == socket2::Domain::IPV6)?;
            listeners.push(std::net::TcpListener::from(fd));
        }
        Ok(listeners)
    }

    /// Names of the sockets nobody took (each once), in the order they were passed.
    pub fn remaining(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.fds.iter().filter(|(n, _)| seen.insert(n.clone())).map(|(n, _)| n.clone()).collect()
    }
}

/// The descriptors and names the environment passes to process `me`. Pure, for tests.
fn parse_listen_env(
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(Vec::new());
    }
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| ActivationError::BadCount(count.to_string()))?;
    let n_usize = n as usize;
    let names: Vec<String> = match names {
        Some(text) => {
            let names: Vec<String> = text.split(':').map(str::to_string).collect();
            if names.len() != n_usize {
                return Err(ActivationError::NameCount { names: names.len(), fds: n_usize });
            }
            names
        }
        // What sd_listen_fds_with_names reports without names.
        None => vec!["unknown".to_string(); n_usize],
    };
    Ok((LISTEN_FDS_START..LISTEN_FDS_START + n).zip(names).collect())
}

fn check_kind(
    name: &str,
    fd: &OwnedFd,
    expected: &'static str,
    domain_ok: impl Fn(socket2::Domain) -> bool,
) -> Result<(), ActivationError> {
    let socket = socket2::SockRef::from(fd);
    let inspect = |source| ActivationError::Inspect { name: name.to_string(), fd: fd.as_raw_fd(), source };
    let domain = socket.domain().map_err(inspect)?;
    let kind = socket.r#type().map_err(inspect)?;
    let listening = socket.is_listener().map_err(inspect)?;
    if !domain_ok(domain) || kind != socket2::Type::STREAM || !listening {
        return Err(ActivationError::WrongKind {
            name: name.to_string(),
            fd: fd.as_raw_fd(),
            expected,
            found: format!("{domain:?} {kind:?}{}", if listening { " listener" } else { " (not listening)" }),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// journald

/// Whether our stderr is the journal stream systemd connected (`$JOURNAL_STREAM` is
/// `<st_dev>:<st_ino>` of that stream; a redirected stderr no longer matches).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(libc::STDERR_FILENO) else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// The syslog priority journald reads from a `<N>` line prefix.
pub fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

/// Log lines for journald: `<N>target: message fields`, no timestamp (the journal adds its own)
/// and no colour. Continuation lines of a multi-line message keep the priority.
pub struct JournalFormat;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = syslog_priority(*event.metadata().level());
        let mut fields = String::new();
        ctx.field_format().format_fields(tracing_subscriber::fmt::format::Writer::new(&mut fields), event)?;
        let mut spans = String::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                spans.push_str(span.name());
                spans.push_str(": ");
            }
        }
        let target = event.metadata().target();
        for line in fields.split('\n') {
            writeln!(writer, "<{priority}>{target}: {spans}{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_targets_are_paths_or_abstract_names() {
        assert_eq!(parse_target("/run/systemd/notify".into()), Some(Target::Path("/run/systemd/notify".into())));
        assert_eq!(parse_target("@dlv-notify".into()), Some(Target::Abstract(b"dlv-notify".to_vec())));
        assert_eq!(parse_target("relative".into()), None);
        assert_eq!(parse_target("".into()), None);
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("dlv-notify-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let notifier = Notifier { target: Some(Target::Abstract(name.into_bytes())), watchdog: None };
        notifier.notify("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 128];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        // Without a target nothing is sent and nothing fails.
        Notifier::default().notify("READY=1").unwrap();
    }

    #[test]
    fn watchdog_pings_at_half_the_deadline_and_only_for_us() {
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn listen_env_names_descriptors_from_3() {
        assert_eq!(parse_listen_env(None, None, None, 7).unwrap(), vec![]);
        // Meant for another process (a parent that did not clean up): ignored.
        assert_eq!(parse_listen_env(Some("8"), Some("2"), None, 7).unwrap(), vec![]);
        assert_eq!(
            parse_listen_env(Some("7"), Some("3"), Some("api:http:http"), 7).unwrap(),
            vec![(3, "api".into()), (4, "http".into()), (5, "http".into())]
        );
        assert_eq!(parse_listen_env(Some("7"), Some("1"), None, 7).unwrap(), vec![(3, "unknown".into())]);
        assert!(matches!(
            parse_listen_env(Some("7"), Some("2"), Some("api"), 7),
            Err(ActivationError::NameCount { names: 1, fds: 2 })
        ));
        assert!(matches!(parse_listen_env(Some("7"), Some("-1"), None, 7), Err(ActivationError::BadCount(_))));
        assert!(matches!(parse_listen_env(Some("7"), Some("many"), None, 7), Err(ActivationError::BadCount(_))));
    }

    #[test]
    fn taking_sockets_checks_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("api.sock")).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut activation = Activation {
            fds: vec![
                ("api".into(), OwnedFd::from(unix)),
                ("http".into(), OwnedFd::from(tcp)),
                ("https".into(), OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap())),
            ],
        };
        assert!(matches!(activation.take_unix("http"), Err(ActivationError::WrongKind { .. })));
        assert_eq!(activation.remaining(), vec!["api", "https"]);
        assert!(activation.take_unix("api").unwrap().is_some());
        assert!(activation.take_unix("api").unwrap().is_none());
        assert_eq!(activation.take_tcp("https").unwrap().len(), 1);
        assert!(activation.take_tcp("https").unwrap().is_empty());
        assert!(activation.remaining().is_empty());
    }

    #[test]
    fn journal_stream_is_recognized_by_device_and_inode() {
        assert!(journal_stream_matches("64769:1234", 64769, 1234));
        assert!(!journal_stream_matches("64769:1234", 64769, 1235));
        assert!(!journal_stream_matches("garbage", 64769, 1234));
        assert_eq!(syslog_priority(tracing::Level::ERROR), 3);
        assert_eq!(syslog_priority(tracing::Level::WARN), 4);
        assert_eq!(syslog_priority(tracing::Level::INFO), 6);
        assert_eq!(syslog_priority(tracing::Level::DEBUG), 7);
    }
}
