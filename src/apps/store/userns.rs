//! Host id ranges of apps that run in a user namespace of their own (`--userns`). A range is
//! given to an app name the first time one of its instances needs it and kept for good: files
//! an app's instances write (its named volumes, which outlive the app) are owned by ids of that
//! range, so the same name must find the same range again, across daemon restarts and even
//! after the app is removed and created anew.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS userns_ranges (
    app TEXT PRIMARY KEY,
    host_first INTEGER NOT NULL UNIQUE,
    size INTEGER NOT NULL
);
";

/// The lowest `size`-long range starting in `first..first + count` (in steps of `size`) that
/// none of `taken` starts at; `None` when every one is taken.
pub fn free_range(first: u32, count: u32, size: u32, taken: &[u32]) -> Option<u32> {
    if size == 0 {
        return None;
    }
    // The last id of a range must stay below 4294967295 (`(uid_t)-1`, no id).
    let fits = |start: u64| start + u64::from(size) <= u64::from(u32::MAX);
    (0..count / size).map(|k| u64::from(first) + u64::from(k) * u64::from(size)).take_while(|s| fits(*s)).find_map(
        |start| {
            let start = u32::try_from(start).ok()?;
            (!taken.contains(&start)).then_some(start)
        },
    )
}

impl Store {
    /// App `app`'s host range: `(host_first, size)`, allocated from `first..first + count` on
    /// first use. A range recorded with another size (the daemon's `--userns-range` changed) is
    /// kept: the app's files are owned by it.
    pub fn userns_range(&self, app: &str, first: u32, count: u32, size: u32) -> Result<(u32, u32), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<(u32, u32)> = tx
            .query_row("SELECT host_first, size FROM userns_ranges WHERE app = ?1", params![app], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some(range) = existing {
            return Ok(range);
        }
        let taken: Vec<u32> = tx
            .prepare("SELECT host_first FROM userns_ranges")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let start = free_range(first, count, size, &taken).ok_or(StoreError::UsernsFull { first, count })?;
        tx.execute("INSERT INTO userns_ranges (app, host_first, size) VALUES (?1, ?2, ?3)", params![app, start, size])?;
        tx.commit()?;
        Ok((start, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_the_lowest_free_slot() {
        assert_eq!(free_range(100_000, 65536 * 3, 65536, &[]), Some(100_000));
        assert_eq!(free_range(100_000, 65536 * 3, 65536, &[100_000]), Some(165_536));
        assert_eq!(free_range(100_000, 65536 * 3, 65536, &[165_536, 100_000]), Some(231_072));
        assert_eq!(free_range(100_000, 65536 * 3, 65536, &[100_000, 165_536, 231_072]), None);
        assert_eq!(free_range(u32::MAX - 10, 65536 * 2, 65536, &[]), None, "past the end of the id space");
    }

    #[test]
    fn an_app_keeps_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let web = store.userns_range("web", 1_000_000, 65536 * 2, 65536).unwrap();
        assert_eq!(web, (1_000_000, 65536));
        assert_eq!(store.userns_range("db", 1_000_000, 65536 * 2, 65536).unwrap(), (1_065_536, 65536));
        assert!(matches!(store.userns_range("api", 1_000_000, 65536 * 2, 65536), Err(StoreError::UsernsFull { .. })));
        drop(store);
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(store.userns_range("web", 1_000_000, 65536 * 2, 65536).unwrap(), web, "stable across restarts");
    }
}
