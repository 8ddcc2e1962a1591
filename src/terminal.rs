//! Whether output may carry terminal escape sequences (colours, cursor moves for redrawn
//! progress bars): only on a terminal that can show them, and never when the user set
//! `NO_COLOR` (any non-empty value, <https://no-color.org>) or `TERM=dumb`.

use std::ffi::OsStr;
use std::io::IsTerminal;

/// For stderr, which carries progress bars and log lines.
pub fn stderr_escapes() -> bool {
    escapes_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// The decision, apart from the environment (for tests).
pub fn escapes_allowed(is_terminal: bool, no_color: Option<&OsStr>, term: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty()) && term != Some(OsStr::new("dumb"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_only_on_terminals_without_no_color() {
        let set = |s: &'static str| Some(OsStr::new(s));
        assert!(escapes_allowed(true, None, set("xterm-256color")));
        assert!(escapes_allowed(true, None, None));
        // An empty NO_COLOR is unset, per the convention.
        assert!(escapes_allowed(true, set(""), set("xterm")));
        assert!(!escapes_allowed(true, set("1"), set("xterm")));
        assert!(!escapes_allowed(true, set("false"), set("xterm")));
        assert!(!escapes_allowed(true, None, set("dumb")));
        assert!(!escapes_allowed(false, None, set("xterm")));
    }
}
