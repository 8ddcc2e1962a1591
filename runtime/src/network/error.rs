//! The error type of the network plumbing: which object and operation failed, and the errno
//! (plus the kernel's extended-ack text when it gave one).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A `NetworkConfig` field that cannot work (bad name, subnet too small, ...).
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),

    /// A subnet string that is not `a.b.c.d/len` with the host bits cleared.
    #[error("invalid subnet {input:?}: {reason}")]
    InvalidSubnet { input: String, reason: String },

    /// A sandbox request that cannot work (IP outside the subnet, bad interface name, ...).
    #[error("invalid sandbox request: {0}")]
    InvalidSandbox(String),

    /// The namespace file is already there: a previous sandbox was not removed.
    #[error("sandbox {path:?} already exists: call remove_sandbox first")]
    SandboxExists { path: PathBuf },

    /// The kernel (or a syscall) refused an operation.
    #[error("{operation}: {errno}{}", kernel_message_suffix(kernel_message.as_deref()))]
    Kernel {
        /// What was being done, naming the object (`create bridge "dlv0"`).
        operation: String,
        /// The errno, as an `io::Error` (its text ends in `(os error N)`).
        errno: io::Error,
        /// Extended-ack text from netlink, when the kernel provided one.
        kernel_message: Option<String>,
    },

    /// The kernel answered something we cannot decode.
    #[error("{operation}: unexpected netlink reply: {reason}")]
    Protocol { operation: String, reason: String },

    /// A helper thread (used for namespace switches) panicked.
    #[error("{operation}: helper thread panicked")]
    ThreadPanicked { operation: String },

    /// An operation failed and undoing its partial work failed too: both are kept.
    #[error("{error}; undoing the partial work also failed: {cleanup}")]
    CleanupFailed { error: Box<NetworkError>, cleanup: Box<NetworkError> },
}

fn kernel_message_suffix(message: Option<&str>) -> String {
    match message {
        Some(text) if !text.is_empty() => format!(" (kernel: {text})"),
        _ => String::new(),
    }
}

impl NetworkError {
    /// The errno behind this error, if it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetworkError::Kernel { errno, .. } => errno.raw_os_error(),
            NetworkError::CleanupFailed { error, .. } => error.errno(),
            _ => None,
        }
    }

    pub(crate) fn kernel(operation: impl Into<String>, errno: io::Error) -> Self {
        NetworkError::Kernel { operation: operation.into(), errno, kernel_message: None }
    }

    pub(crate) fn from_nix(operation: impl Into<String>, errno: nix::errno::Errno) -> Self {
        NetworkError::kernel(operation, io::Error::from_raw_os_error(errno as i32))
    }

    /// Attach the failure of the cleanup that followed this error.
    pub(crate) fn with_cleanup(self, cleanup: Result<(), NetworkError>) -> Self {
        match cleanup {
            Ok(()) => self,
            Err(cleanup) => NetworkError::CleanupFailed { error: Box::new(self), cleanup: Box::new(cleanup) },
        }
    }
}
