//! The instance log: one line per line the container wrote, prefixed by a UTC timestamp and the
//! stream (`stdout`, `stderr`, or `shim` for the shim's own messages), rotated by size.
//! Written by the monitor (and by the shim before it hands over); read by the daemon's `logs`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

/// Lines longer than this are split, so one runaway write cannot grow memory unbounded.
pub const MAX_LINE: usize = 16 * 1024;

pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl LogWriter {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter { path, file: Some(file), size, max_bytes, keep })
    }

    pub fn line(&mut self, stream: &str, text: &[u8]) {
        let stamp = super::clock::now_micros();
        let mut record = Vec::with_capacity(text.len() + 40);
        record.extend_from_slice(stamp.as_bytes());
        record.push(b' ');
        record.extend_from_slice(stream.as_bytes());
        record.push(b' ');
        record.extend_from_slice(text);
        record.push(b'\n');
        if self.max_bytes > 0 && self.size + record.len() as u64 > self.max_bytes && self.size > 0 {
            self.rotate();
        }
        if let Some(f) = self.file.as_mut() {
            // A full disk must not stop the instance: the line is lost, the app runs on.
            if f.write_all(&record).is_ok() {
                self.size += record.len() as u64;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
        }
        if self.keep > 0 {
            let _ = std::fs::rename(&self.path, self.numbered(1));
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
        self.file = OpenOptions::new().create(true).append(true).truncate(false).open(&self.path).ok();
        self.size = 0;
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }
}

/// Splits a pipe's bytes into lines, keeping an incomplete tail for the next read.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Feeds bytes; calls `emit` for each complete (or over-long) line.
    pub fn feed(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.pending[start..].iter().position(|b| *b == b'\n') {
            emit(&self.pending[start..start + pos]);
            start += pos + 1;
        }
        while self.pending.len() - start >= MAX_LINE {
            emit(&self.pending[start..start + MAX_LINE]);
            start += MAX_LINE;
        }
        self.pending.drain(..start);
    }

    /// At end of stream, whatever is left is a last line.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_reads() {
        let mut buf = LineBuffer::default();
        let mut out: Vec<String> = Vec::new();
        buf.feed(b"hel", |l| out.push(String::from_utf8_lossy(l).into()));
        buf.feed(b"lo\nwor", |l| out.push(String::from_utf8_lossy(l).into()));
        buf.feed(b"ld\n\nx", |l| out.push(String::from_utf8_lossy(l).into()));
        buf.finish(|l| out.push(String::from_utf8_lossy(l).into()));
        assert_eq!(out, vec!["hello", "world", "", "x"]);
    }

    #[test]
    fn overlong_lines_are_split() {
        let mut buf = LineBuffer::default();
        let mut n = 0;
        buf.feed(&vec![b'a'; MAX_LINE * 2 + 5], |_| n += 1);
        assert_eq!(n, 2);
    }

    #[test]
    fn rotates_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut w = LogWriter::open(path.clone(), 200, 2).expect("open");
        for i in 0..20 {
            w.line("stdout", format!("line {i} with some padding text").as_bytes());
        }
        assert!(path.exists());
        assert!(dir.path().join("log.1").exists());
        assert!(dir.path().join("log.2").exists());
        assert!(!dir.path().join("log.3").exists());
        assert!(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) <= 200);
        let last = std::fs::read_to_string(&path).expect("read");
        assert!(last.trim_end().ends_with("line 19 with some padding text"));
    }
}
