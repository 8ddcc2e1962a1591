//! What happened to apps and instances, as a stream: started, exited, unhealthy, restarted,
//! deploy progress. Kept in memory (the most recent [`KEEP`]) and appended to
//! `<data-dir>/events.jsonl` (rotated once at [`FILE_MAX_BYTES`]), so a restarted daemon still
//! shows what came before it. Followers subscribe to a broadcast channel.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept in memory for `deliverous events`.
pub const KEEP: usize = 2000;
/// Size at which the events file is rotated to `events.jsonl.1`.
pub const FILE_MAX_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    AppCreated,
    AppChanged,
    AppRemoved,
    AppStarted,
    AppStopped,
    Scaled,
    InstanceStarted,
    InstanceReady,
    InstanceExited,
    InstanceStopped,
    InstanceUnhealthy,
    InstanceHealthy,
    InstanceRestarting,
    CrashLoop,
    DeployStarted,
    DeployProgress,
    DeployDone,
    DeployFailed,
    RolledBack,
    DaemonStarted,
    DaemonStopping,
    /// An API token was created or removed (the audit trail of remote access).
    TokenCreated,
    TokenRemoved,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AppCreated => "app_created",
            Kind::AppChanged => "app_changed",
            Kind::AppRemoved => "app_removed",
            Kind::AppStarted => "app_started",
            Kind::AppStopped => "app_stopped",
            Kind::Scaled => "scaled",
            Kind::InstanceStarted => "instance_started",
            Kind::InstanceReady => "instance_ready",
            Kind::InstanceExited => "instance_exited",
            Kind::InstanceStopped => "instance_stopped",
            Kind::InstanceUnhealthy => "instance_unhealthy",
            Kind::InstanceHealthy => "instance_healthy",
            Kind::InstanceRestarting => "instance_restarting",
            Kind::CrashLoop => "crash_loop",
            Kind::DeployStarted => "deploy_started",
            Kind::DeployProgress => "deploy_progress",
            Kind::DeployDone => "deploy_done",
            Kind::DeployFailed => "deploy_failed",
            Kind::RolledBack => "rolled_back",
            Kind::DaemonStarted => "daemon_started",
            Kind::DaemonStopping => "daemon_stopping",
            Kind::TokenCreated => "token_created",
            Kind::TokenRemoved => "token_removed",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event, across daemon restarts.
    pub id: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    /// `web.2`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub message: String,
}

struct Ring {
    next_id: u64,
    events: VecDeque<Event>,
    file: Option<std::fs::File>,
    file_len: u64,
}

pub struct Events {
    ring: Mutex<Ring>,
    path: Option<PathBuf>,
    tx: broadcast::Sender<Event>,
}

impl Events {
    /// Events kept in memory only.
    #[cfg(test)]
    pub fn in_memory() -> Self {
        Events::with_file(None)
    }

    /// Events appended to `<dir>/events.jsonl`; the tail of the existing file is loaded.
    pub fn open(dir: &Path) -> Self {
        Events::with_file(Some(dir.join("events.jsonl")))
    }

    fn with_file(path: Option<PathBuf>) -> Self {
        let mut events = VecDeque::new();
        let mut file = None;
        let mut file_len = 0;
        if let Some(path) = &path {
            for p in [rotated(path), path.clone()] {
                let Ok(f) = std::fs::File::open(&p) else { continue };
                for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                    // A torn last line (the daemon died mid-write) is skipped.
                    if let Ok(e) = serde_json::from_str::<Event>(&line) {
                        events.push_back(e);
                        if events.len() > KEEP {
                            events.pop_front();
                        }
                    }
                }
            }
            match std::fs::OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => {
                    file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    file = Some(f);
                }
                Err(e) => tracing::warn!("cannot open {}: {e}; events are kept in memory only", path.display()),
            }
        }
        let next_id = events.back().map_or(1, |e| e.id + 1);
        let (tx, _) = broadcast::channel(1024);
        Events { ring: Mutex::new(Ring { next_id, events, file, file_len }), path, tx }
    }

    /// Records an event and tells the followers.
    pub fn emit(&self, kind: Kind, app: &str, instance: Option<&str>, message: impl Into<String>) {
        let message = message.into();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let event = Event {
            id: ring.next_id,
            time: crate::apps::now(),
            kind,
            app: app.to_string(),
            instance: instance.map(str::to_string),
            message,
        };
        ring.next_id += 1;
        tracing::debug!(kind = %event.kind, app, instance = ?event.instance, "{}", event.message);
        if let (Some(path), Ok(mut line)) = (&self.path, serde_json::to_vec(&event)) {
            line.push(b'\n');
            if ring.file_len + line.len() as u64 > FILE_MAX_BYTES {
                let _ = std::fs::rename(path, rotated(path));
                ring.file = std::fs::OpenOptions::new().create(true).append(true).open(path).ok();
                ring.file_len = 0;
            }
            if let Some(f) = ring.file.as_mut() {
                if f.write_all(&line).is_ok() {
                    ring.file_len += line.len() as u64;
                }
            }
        }
        ring.events.push_back(event.clone());
        if ring.events.len() > KEEP {
            ring.events.pop_front();
        }
        // Sent under the lock, so followers see events in id order.
        let _ = self.tx.send(event);
    }

    /// The kept events with an id above `after`, oldest first, that pass `filter`.
    #[cfg(test)]
    pub fn since(&self, after: u64, filter: impl Fn(&Event) -> bool) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.events.iter().filter(|e| e.id > after && filter(e)).cloned().collect()
    }

    /// The kept events and a receiver of every later one, with no gap and no duplicate between
    /// the two.
    pub fn follow(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        (ring.events.iter().cloned().collect(), rx)
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_a_reopen_with_increasing_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = Events::open(dir.path());
        events.emit(Kind::InstanceStarted, "web", Some("web.1"), "started");
        events.emit(Kind::InstanceExited, "web", Some("web.1"), "exited with code 1");
        drop(events);
        // A torn line, as a crash mid-write leaves.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("events.jsonl"))
            .and_then(|mut f| f.write_all(b"{\"id\":3,\"ti"))
            .expect("append");
        let events = Events::open(dir.path());
        events.emit(Kind::InstanceRestarting, "web", Some("web.1"), "in 100ms");
        let all = events.since(0, |_| true);
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[2].kind, Kind::InstanceRestarting);
        assert_eq!(events.since(2, |e| e.app == "web").len(), 1);
    }

    #[test]
    fn followers_get_later_events_in_order() {
        let events = Events::in_memory();
        events.emit(Kind::AppCreated, "web", None, "created");
        let (past, mut rx) = events.follow();
        events.emit(Kind::AppStarted, "web", None, "started");
        assert_eq!(past.len(), 1);
        let next = rx.try_recv().expect("event");
        assert_eq!((next.id, next.kind), (2, Kind::AppStarted));
    }

    #[test]
    fn the_file_rotates_and_memory_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = Events::open(dir.path());
        let long = "x".repeat(4096);
        for _ in 0..(FILE_MAX_BYTES / 4096 + 10) {
            events.emit(Kind::DeployProgress, "web", None, long.clone());
        }
        assert!(dir.path().join("events.jsonl.1").exists());
        let len = std::fs::metadata(dir.path().join("events.jsonl")).map(|m| m.len()).unwrap_or(0);
        assert!(len < FILE_MAX_BYTES);
        assert!(events.since(0, |_| true).len() <= KEEP);
    }
}
