//! Reading instance logs for `deliverous logs`: the files the shims write (`TS STREAM TEXT` per
//! line, rotated as `log.1`, `log.2`, …), merged across an app's instances in time order, and
//! followed as they grow, rotate, and as instances come and go.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

/// One line of an instance's log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogLine {
    /// RFC 3339 UTC with microseconds, as the shim wrote it (sorts as text).
    pub ts: String,
    /// Instance name, `web.2`.
    pub instance: String,
    /// `stdout`, `stderr` or `shim`.
    pub stream: String,
    pub text: String,
}

/// An instance whose log to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub instance: String,
    /// The current log file (`<instance dir>/log`); rotated ones are `log.1`, `log.2`, ….
    pub path: PathBuf,
}

/// `10m`, `2h`, `30s`, `1d` before `now`, or an RFC 3339 time.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let bad = || format!("invalid --since {text:?}: expected a duration such as 30s, 10m, 2h, 1d or an RFC 3339 time");
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().map_err(|_| bad())?;
    let span = match unit {
        "s" => Duration::try_seconds(n),
        "m" => Duration::try_minutes(n),
        "h" => Duration::try_hours(n),
        "d" => Duration::try_days(n),
        _ => None,
    }
    .ok_or_else(bad)?;
    // Further back than a date can go is no time at all; `now - span` would panic.
    now.checked_sub_signed(span).ok_or_else(bad)
}

fn parse_line(instance: &str, raw: &str) -> Option<LogLine> {
    let (ts, rest) = raw.split_once(' ')?;
    let (stream, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(LogLine {
        ts: ts.to_string(),
        instance: instance.to_string(),
        stream: stream.to_string(),
        text: text.to_string(),
    })
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    p.into()
}

/// Every line the sources hold (rotated files included), from `since` on (RFC 3339 UTC with
/// microseconds, as the shim writes: compared as text), merged in time order; the last `tail`
/// of them if given.
pub fn history(sources: &[Source], since: Option<&str>, tail: Option<usize>) -> Vec<LogLine> {
    let mut lines = Vec::new();
    for source in sources {
        let mut files: Vec<PathBuf> = (1..=64).map(|n| rotated(&source.path, n)).take_while(|p| p.exists()).collect();
        files.reverse();
        files.push(source.path.clone());
        for file in files {
            let Ok(f) = File::open(&file) else { continue };
            for raw in BufReader::new(f).lines().map_while(Result::ok) {
                if let Some(line) = parse_line(&source.instance, &raw) {
                    if since.is_none_or(|s| line.ts.as_str() >= s) {
                        lines.push(line);
                    }
                }
            }
        }
    }
    lines.sort_by(|a, b| a.ts.cmp(&b.ts));
    if let Some(n) = tail {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    lines
}

/// Follows sources as they grow. Each file is read from where the last read stopped; when the
/// shim rotates it, the rest of the old file (same inode, now `log.1`) is read before the new
/// one, so no line is lost.
#[derive(Default)]
pub struct Follower {
    open: HashMap<String, (File, PathBuf, Vec<u8>)>,
}

impl Follower {
    /// Starts at the current end of each source (what `history` already returned).
    pub fn start_at_end(&mut self, sources: &[Source]) {
        for s in sources {
            if let Ok(mut f) = File::open(&s.path) {
                let _ = f.seek(SeekFrom::End(0));
                self.open.insert(s.instance.clone(), (f, s.path.clone(), Vec::new()));
            }
        }
    }

    /// New lines since the last poll; `sources` is the current set of instances (new ones are
    /// read from their start, gone ones are dropped after a last read).
    pub fn poll(&mut self, sources: &[Source]) -> Vec<LogLine> {
        for s in sources {
            if !self.open.contains_key(&s.instance) {
                if let Ok(f) = File::open(&s.path) {
                    self.open.insert(s.instance.clone(), (f, s.path.clone(), Vec::new()));
                }
            }
        }
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (instance, (file, path, pending)) in self.open.iter_mut() {
            read_lines(file, pending, instance, &mut out);
            let current = std::fs::metadata(&*path).map(|m| m.ino()).ok();
            let ours = file.metadata().map(|m| m.ino()).ok();
            if current.is_some() && current != ours {
                // Rotated: the old file is drained above; continue with the new one.
                if let Ok(f) = File::open(&*path) {
                    *file = f;
                    read_lines(file, pending, instance, &mut out);
                }
            }
            if !sources.iter().any(|s| &s.instance == instance) {
                gone.push(instance.clone());
            }
        }
        for instance in gone {
            self.open.remove(&instance);
        }
        out.sort_by(|a, b| a.ts.cmp(&b.ts));
        out
    }
}

fn read_lines(file: &mut File, pending: &mut Vec<u8>, instance: &str, out: &mut Vec<LogLine>) {
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).is_err() {
        return;
    }
    pending.extend_from_slice(&buf);
    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
        let raw: Vec<u8> = pending.drain(..=end).collect();
        if let Some(line) = parse_line(instance, String::from_utf8_lossy(&raw[..raw.len() - 1]).as_ref()) {
            out.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, lines: &[&str]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn since_takes_durations_and_times() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_since("10m", now).unwrap().to_rfc3339(), "2026-01-01T11:50:00+00:00");
        assert_eq!(parse_since("1d", now).unwrap().to_rfc3339(), "2025-12-31T12:00:00+00:00");
        assert_eq!(parse_since("2026-01-01T11:00:00Z", now).unwrap().to_rfc3339(), "2026-01-01T11:00:00+00:00");
        for bad in ["", "10", "m", "10y", "-5m", "99999999999d", "9223372036854775807s"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn history_merges_instances_and_rotated_files_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a-log"), dir.path().join("b-log"));
        write(&rotated(&a, 1), &["2026-01-01T00:00:01.000000Z stdout a1"]);
        write(&a, &["2026-01-01T00:00:03.000000Z stdout a3", "2026-01-01T00:00:05.000000Z stderr a5 with spaces"]);
        write(&b, &["2026-01-01T00:00:02.000000Z stdout b2", "2026-01-01T00:00:04.000000Z shim b4"]);
        let sources = [Source { instance: "web.1".into(), path: a }, Source { instance: "web.2".into(), path: b }];
        let texts =
            |lines: Vec<LogLine>| lines.into_iter().map(|l| format!("{} {}", l.instance, l.text)).collect::<Vec<_>>();
        assert_eq!(
            texts(history(&sources, None, None)),
            ["web.1 a1", "web.2 b2", "web.1 a3", "web.2 b4", "web.1 a5 with spaces"]
        );
        assert_eq!(texts(history(&sources, None, Some(2))), ["web.2 b4", "web.1 a5 with spaces"]);
        assert_eq!(
            texts(history(&sources, Some("2026-01-01T00:00:04.000000Z"), None)),
            ["web.2 b4", "web.1 a5 with spaces"]
        );
    }

    #[test]
    fn following_survives_rotation_and_new_instances() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a-log");
        write(&a, &["2026-01-01T00:00:01.000000Z stdout old"]);
        let mut sources = vec![Source { instance: "web.1".into(), path: a.clone() }];
        let mut follower = Follower::default();
        follower.start_at_end(&sources);
        assert!(follower.poll(&sources).is_empty());
        // A line, then a rotation with a line left in the old file, then lines in the new one.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
        writeln!(f, "2026-01-01T00:00:02.000000Z stdout two").unwrap();
        assert_eq!(follower.poll(&sources).iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["two"]);
        writeln!(f, "2026-01-01T00:00:03.000000Z stdout three").unwrap();
        std::fs::rename(&a, rotated(&a, 1)).unwrap();
        write(&a, &["2026-01-01T00:00:04.000000Z stdout four"]);
        let b = dir.path().join("b-log");
        write(&b, &["2026-01-01T00:00:05.000000Z stdout new instance"]);
        sources.push(Source { instance: "web.2".into(), path: b });
        let texts: Vec<String> = follower.poll(&sources).into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["three", "four", "new instance"]);
    }
}
