//! What follows an instance's exit that nobody asked for: whether its slot gets a replacement
//! (the app's restart policy), when (exponential backoff, reset only by a stable run), and what
//! the operator sees of it (exit reasons, restart counts, crash loops). The decisions are pure
//! functions; the supervisor applies them.

use std::time::{Duration, Instant};

use deliverous_runtime::shim::protocol::ExitStatus;
use serde::{Deserialize, Serialize};

use crate::apps::RestartPolicy;

/// The first replacement waits this long; each further quick crash doubles it.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two replacements by default (the daemon's `--restart-max-delay`
/// defaults to the same 30s).
#[cfg(test)]
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// An instance that ran this long was stable: its crash starts a new backoff from
/// [`FIRST_DELAY`].
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Quick crashes in a row after which a slot is in a crash loop.
pub const CRASH_LOOP_AFTER: u32 = 3;

/// How an instance ended, as data: `{"code":1}`, `{"signal":"SIGKILL"}`, `{"oom":true}`, or
/// `{"lost":true}` when its shim vanished without saying.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReason {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

impl ExitReason {
    pub fn of(status: Option<&ExitStatus>) -> ExitReason {
        match status {
            None => ExitReason { lost: true, ..ExitReason::default() },
            Some(s) if s.oom => ExitReason { oom: true, signal: s.signal.map(signal_name), ..ExitReason::default() },
            Some(s) => match s.signal {
                Some(sig) => ExitReason { signal: Some(signal_name(sig)), ..ExitReason::default() },
                None => ExitReason { code: Some(s.code.unwrap_or(-1)), ..ExitReason::default() },
            },
        }
    }

    /// Whether `on-failure` replaces the instance: anything but a clean exit 0.
    pub fn is_failure(&self) -> bool {
        self.code != Some(0) || self.signal.is_some() || self.oom || self.lost
    }

    /// `exit 1`, `signal 9`, `oom`, `shim lost`: the short form `app show` has always had in
    /// `restarts.last_exit` (and the shim writes in its log).
    pub fn short(&self) -> String {
        if self.oom {
            "oom".into()
        } else if let Some(sig) = &self.signal {
            match signal_number(sig) {
                Some(n) => format!("signal {n}"),
                None => sig.clone(),
            }
        } else if self.lost {
            "shim lost".into()
        } else {
            format!("exit {}", self.code.unwrap_or(-1))
        }
    }

    /// `exited with code 1`, `killed by SIGKILL`, `killed by the OOM killer (memory limit)`.
    pub fn describe(&self) -> String {
        if self.oom {
            "killed by the OOM killer (memory limit)".into()
        } else if let Some(sig) = &self.signal {
            format!("killed by {sig}")
        } else if self.lost {
            "its shim vanished (exit status unknown)".into()
        } else {
            format!("exited with code {}", self.code.unwrap_or(-1))
        }
    }
}

/// `SIGKILL` for 9; the number for signals without a common name.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

/// 9 for `SIGKILL`, 64 for `signal 64`.
fn signal_number(name: &str) -> Option<i32> {
    if let Some(n) = name.strip_prefix("signal ") {
        return n.parse().ok();
    }
    (1..=64).find(|n| signal_name(*n) == name)
}

/// Whether the policy wants a replacement for an instance that ended this way.
pub fn wants_replacement(policy: RestartPolicy, reason: &ExitReason) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => reason.is_failure(),
        RestartPolicy::Never => false,
    }
}

/// 100 ms, doubling per consecutive quick crash, capped at `max` (never below the first delay).
pub fn restart_delay(consecutive: u32, max: Duration) -> Duration {
    FIRST_DELAY.saturating_mul(1u32 << consecutive.min(16)).min(max.max(FIRST_DELAY))
}

/// After an instance that ran for `uptime` crashed, with `consecutive` quick crashes before it
/// in its slot: the new count of quick crashes and the wait before the replacement. Only a
/// stable run resets the count; time spent waiting between crashes does not.
pub fn next_backoff(consecutive: u32, uptime: Duration, max: Duration) -> (u32, Duration) {
    let consecutive = if uptime >= STABLE_AFTER { 0 } else { consecutive };
    (consecutive.saturating_add(1), restart_delay(consecutive, max))
}

/// The last exit of a slot's instance, as `app show` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotExit {
    pub reason: ExitReason,
    /// `exited with code 1`
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

/// What the supervisor remembers of one app slot's exits; kept in the state database, so a
/// restarted daemon neither forgets the counts nor refills a slot the policy keeps empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotHistory {
    /// Quick crashes in a row (see [`next_backoff`]).
    pub consecutive: u32,
    /// Replacements made for this slot.
    pub restarts: u32,
    pub last_exit: Option<SlotExit>,
    /// The restart policy left the slot empty; an operator action brings it back.
    pub held: bool,
    /// A replacement is due then; until then converging leaves the slot empty.
    #[serde(skip)]
    pub not_before: Option<Instant>,
}

impl SlotHistory {
    pub fn crash_looping(&self) -> bool {
        self.consecutive >= CRASH_LOOP_AFTER
    }

    /// Whether converging must leave the slot empty for now.
    pub fn waiting(&self, now: Instant) -> bool {
        self.held || self.not_before.is_some_and(|t| t > now)
    }
}

/// A slot whose instance exited and was not (yet) replaced, as `app show` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ExitedSlot {
    /// `web.2`
    pub name: String,
    pub slot: u32,
    /// `restarting` (backing off) or `exited` (the restart policy keeps it empty).
    pub state: &'static str,
    pub restarts: u32,
    pub crash_loop: bool,
    pub last_exit: Option<SlotExit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Option<i32>, signal: Option<i32>, oom: bool) -> ExitStatus {
        ExitStatus { code, signal, oom, finished_at: "t".into() }
    }

    #[test]
    fn the_schedule_doubles_from_100ms_and_caps_at_30s() {
        let delays: Vec<u64> = (0..6).map(|n| restart_delay(n, MAX_DELAY).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200]);
        assert_eq!(restart_delay(8, MAX_DELAY), Duration::from_millis(25_600));
        assert_eq!(restart_delay(9, MAX_DELAY), MAX_DELAY);
        assert_eq!(restart_delay(u32::MAX, MAX_DELAY), MAX_DELAY);
        // The daemon's own cap.
        let cap = Duration::from_secs(1);
        assert_eq!(restart_delay(3, cap), Duration::from_millis(800));
        assert_eq!(restart_delay(4, cap), cap);
        assert_eq!(restart_delay(2, Duration::ZERO), FIRST_DELAY);
    }

    #[test]
    fn quick_crashes_grow_the_backoff_and_only_a_stable_run_resets_it() {
        let quick = Duration::from_millis(50);
        let mut n = 0;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (next, delay) = next_backoff(n, quick, MAX_DELAY);
            n = next;
            seen.push(delay.as_millis());
        }
        assert_eq!(seen, [100, 200, 400, 800]);
        assert!(SlotHistory { consecutive: n, ..Default::default() }.crash_looping());
        // Running 9 s is not stable: the backoff goes on growing.
        let (n2, delay) = next_backoff(n, Duration::from_secs(9), MAX_DELAY);
        assert_eq!((n2, delay), (5, Duration::from_millis(1600)));
        // A replacement that ran 10 s was stable: back to the first delay.
        let (n3, delay) = next_backoff(n2, STABLE_AFTER, MAX_DELAY);
        assert_eq!((n3, delay), (1, FIRST_DELAY));
        assert!(!SlotHistory { consecutive: n3, ..Default::default() }.crash_looping());
    }

    #[test]
    fn exit_reasons_and_policies() {
        let clean = ExitReason::of(Some(&status(Some(0), None, false)));
        let failed = ExitReason::of(Some(&status(Some(3), None, false)));
        let killed = ExitReason::of(Some(&status(None, Some(9), false)));
        let oom = ExitReason::of(Some(&status(None, Some(9), true)));
        let lost = ExitReason::of(None);
        assert_eq!(serde_json::to_string(&clean).unwrap(), r#"{"code":0}"#);
        assert_eq!(serde_json::to_string(&killed).unwrap(), r#"{"signal":"SIGKILL"}"#);
        assert_eq!(serde_json::to_value(&oom).unwrap()["oom"], true);
        assert_eq!(serde_json::to_string(&lost).unwrap(), r#"{"lost":true}"#);
        assert_eq!(failed.describe(), "exited with code 3");
        assert_eq!(killed.describe(), "killed by SIGKILL");
        assert_eq!(signal_name(64), "signal 64");
        assert_eq!(
            (killed.short(), oom.short(), failed.short(), lost.short()),
            ("signal 9".into(), "oom".into(), "exit 3".into(), "shim lost".into())
        );
        let odd = ExitReason::of(Some(&status(None, Some(64), false)));
        assert_eq!(odd.short(), "signal 64");
        // What the database keeps reads back the same (but the pending time, which is the
        // daemon's own).
        let h = SlotHistory {
            consecutive: 2,
            restarts: 5,
            last_exit: Some(SlotExit { reason: oom.clone(), message: oom.describe(), at: "t".into() }),
            held: true,
            not_before: None,
        };
        let back: SlotHistory = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        for r in [&failed, &killed, &oom, &lost] {
            assert!(r.is_failure(), "{r:?}");
            assert!(wants_replacement(RestartPolicy::OnFailure, r));
        }
        assert!(!clean.is_failure());
        assert!(!wants_replacement(RestartPolicy::OnFailure, &clean));
        assert!(wants_replacement(RestartPolicy::Always, &clean));
        assert!(!wants_replacement(RestartPolicy::Never, &failed));
    }

    #[test]
    fn a_slot_waits_while_held_or_backing_off() {
        let now = Instant::now();
        assert!(!SlotHistory::default().waiting(now));
        assert!(SlotHistory { held: true, ..Default::default() }.waiting(now));
        let later = SlotHistory { not_before: Some(now + Duration::from_secs(1)), ..Default::default() };
        assert!(later.waiting(now));
        assert!(!later.waiting(now + Duration::from_secs(2)));
    }
}
