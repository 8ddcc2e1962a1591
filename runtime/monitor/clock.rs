//! UTC timestamps in RFC 3339 (`2026-11-25T00:13:07.123456Z`) from the system clock, without a
//! date library: the monitor stays std-only.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, with microseconds: the instance log's line prefix.
pub fn now_micros() -> String {
    let (secs, nanos) = since_epoch();
    format(secs, nanos / 1_000, 6)
}

/// Now, with milliseconds: an exit status's `finished_at`.
pub fn now_millis() -> String {
    let (secs, nanos) = since_epoch();
    format(secs, nanos / 1_000_000, 3)
}

fn since_epoch() -> (u64, u32) {
    // A clock before 1970 is a broken clock; the epoch is as good a stamp as any then.
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| (d.as_secs(), d.subsec_nanos())).unwrap_or((0, 0))
}

/// `secs` since the epoch plus a fraction of `digits` digits, as `YYYY-MM-DDThh:mm:ss.fZ`.
pub fn format(secs: u64, fraction: u32, digits: usize) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{fraction:0digits$}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}
