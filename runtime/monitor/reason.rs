//! How an instance ended, in the words an operator reads (`app show`, the log's last line):
//! one wording for the monitor and for the runtime crate's `protocol::ExitStatus`.

/// `oom`, `signal 9`, `exit 0`.
pub fn exit_reason(oom: bool, signal: Option<i32>, code: Option<i32>) -> String {
    if oom {
        "oom".to_string()
    } else if let Some(sig) = signal {
        format!("signal {sig}")
    } else {
        format!("exit {}", code.unwrap_or(-1))
    }
}
