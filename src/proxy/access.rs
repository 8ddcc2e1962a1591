//! The access log: one JSON line per request, appended to a file. Each thread buffers its lines
//! and writes them in batches (a single `write` on an `O_APPEND` file, so lines from different
//! threads never interleave), at most a second late.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static LOG: OnceLock<File> = OnceLock::new();

/// A batch is written once it reaches this size, or after [`MAX_DELAY`].
const BATCH: usize = 32 * 1024;
const MAX_DELAY: Duration = Duration::from_secs(1);

thread_local! {
    static BUFFER: RefCell<(Vec<u8>, Option<Instant>)> = const { RefCell::new((Vec::new(), None)) };
}

/// Opens (creating it, mode 0640) the file every later line goes to. Once per process.
pub fn open(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
    let _ = LOG.set(file);
    Ok(())
}

pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// Adds a line (written by `f`, without its newline) to this thread's batch.
pub fn line(f: impl FnOnce(&mut Vec<u8>)) {
    let Some(file) = LOG.get() else { return };
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        let (buf, since) = &mut *b;
        f(buf);
        buf.push(b'\n');
        let first = *since.get_or_insert_with(Instant::now);
        if buf.len() >= BATCH || first.elapsed() >= MAX_DELAY {
            write_out(file, buf);
            *since = None;
        }
    });
}

/// Writes this thread's batch now; workers call it on a timer.
pub fn flush() {
    let Some(file) = LOG.get() else { return };
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        let (buf, since) = &mut *b;
        if !buf.is_empty() {
            write_out(file, buf);
        }
        *since = None;
    });
}

fn write_out(mut file: &File, buf: &mut Vec<u8>) {
    if let Err(e) = file.write_all(buf) {
        tracing::warn!("access log: {e}");
    }
    buf.clear();
}

/// Appends `s` as a JSON string literal.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut tmp = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\\c\nd");
        assert_eq!(String::from_utf8_lossy(&out), r#""a\"b\\c\u000ad""#);
    }
}
