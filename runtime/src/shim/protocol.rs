//! The shim's control protocol: one JSON object per line over its unix socket, a reply per
//! request. `wait` and `stop` reply only once the container has exited.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The container's pid and whether it still runs.
    State,
    /// Send a signal to the container's init.
    Signal { signal: i32 },
    /// Send `signal`, and SIGKILL everything left after `timeout_ms`; replies at exit.
    Stop { signal: i32, timeout_ms: u64 },
    /// Replies at exit.
    Wait,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
}

/// How an instance ended; also written to the exit file so it survives the shim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitStatus {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    #[serde(default)]
    pub oom: bool,
    pub finished_at: String,
}

impl ExitStatus {
    /// `exited 0`, `killed by signal 9`, `oom`: what an operator reads in `app show`.
    pub fn reason(&self) -> String {
        super::reason::exit_reason(self.oom, self.signal, self.code)
    }
}
