//! The SQLite store of desired state: apps, their immutable revisions, and the instances the
//! supervisor created (with their IP leases), so a restarted daemon finds everything again.

mod deploys;
mod userns;

pub use deploys::{Deploy, DeployState};

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::{now, App, AppSpec, Revision};

mod tokens;
pub use tokens::TokenRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database holds an unreadable record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("no free IP address left in the instance subnet")]
    SubnetFull,
    #[error(
        "no free user namespace range left in {first}..{} (daemon flag --userns-range): widen it",
        u64::from(*first) + u64::from(*count)
    )]
    UsernsFull { first: u32, count: u32 },
}

/// An instance as persisted: enough to re-attach to its shim or clean up after it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    pub uid: String,
    pub app: String,
    pub slot: u32,
    pub revision: u32,
    pub ip: Ipv4Addr,
    pub created_at: String,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    instances INTEGER NOT NULL,
    running INTEGER NOT NULL,
    revision INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    image TEXT NOT NULL,
    digest TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app, number)
);
CREATE TABLE IF NOT EXISTS instances (
    uid TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    slot INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    ip TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    slot INTEGER NOT NULL,
    history TEXT NOT NULL,
    PRIMARY KEY (app, slot)
);
";

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(deploys::SCHEMA)?;
        conn.execute_batch(tokens::SCHEMA)?;
        conn.execute_batch(userns::SCHEMA)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent: it has its own
        // transactions. Keep serving.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a new app; `Ok(false)` if the name is taken.
    pub fn create_app(&self, name: &str, spec: &AppSpec, instances: u32) -> Result<bool, StoreError> {
        let t = now();
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO apps (name, spec, instances, running, revision, created_at, updated_at) VALUES (?1, ?2, ?3, 0, NULL, ?4, ?4)",
            params![name, serde_json::to_string(spec)?, instances, t],
        )?;
        Ok(n == 1)
    }

    pub fn app(&self, name: &str) -> Result<Option<App>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, spec, instances, running, revision, created_at, updated_at FROM apps WHERE name = ?1",
        )?;
        let row = stmt.query_row(params![name], row_to_raw).optional()?;
        row.map(raw_to_app).transpose()
    }

    pub fn apps(&self) -> Result<Vec<App>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, spec, instances, running, revision, created_at, updated_at FROM apps ORDER BY name",
        )?;
        let rows = stmt.query_map([], row_to_raw)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(raw_to_app).collect()
    }

    pub fn update_app(&self, app: &App) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE apps SET spec = ?2, instances = ?3, running = ?4, revision = ?5, updated_at = ?6 WHERE name = ?1",
            params![app.name, serde_json::to_string(&app.spec)?, app.instances, app.running, app.revision, now()],
        )?;
        Ok(())
    }

    pub fn delete_app(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM apps WHERE name = ?1", params![name])? == 1)
    }

    /// Returns the app's latest revision if it has exactly this image digest and spec, else
    /// records a new one. Revisions are never modified.
    pub fn revision_for(&self, app: &str, image: &str, digest: &str, spec: &AppSpec) -> Result<Revision, StoreError> {
        let conn = self.conn();
        let latest = conn
            .query_row(
                "SELECT number, image, digest, spec, created_at FROM revisions WHERE app = ?1 ORDER BY number DESC LIMIT 1",
                params![app],
                revision_row,
            )
            .optional()?
            .map(raw_to_revision)
            .transpose()?;
        if let Some(latest) = &latest {
            if latest.digest == digest && &latest.spec == spec {
                return Ok(latest.clone());
            }
        }
        let number = latest.map(|l| l.number + 1).unwrap_or(1);
        let created_at = now();
        conn.execute(
            "INSERT INTO revisions (app, number, image, digest, spec, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![app, number, image, digest, serde_json::to_string(spec)?, created_at],
        )?;
        Ok(Revision { number, image: image.to_string(), digest: digest.to_string(), spec: spec.clone(), created_at })
    }

    pub fn revision(&self, app: &str, number: u32) -> Result<Option<Revision>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT number, image, digest, spec, created_at FROM revisions WHERE app = ?1 AND number = ?2",
                params![app, number],
                revision_row,
            )
            .optional()?;
        row.map(raw_to_revision).transpose()
    }

    /// Forgets all but the `keep` newest revisions of `app` (kept for rollback), never the app's
    /// current revision nor one an instance still runs. Returns the image digests of those
    /// forgotten.
    pub fn prune_revisions(&self, app: &str, keep: u32) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let doomed = "FROM revisions WHERE app = ?1
               AND number NOT IN (SELECT number FROM revisions WHERE app = ?1 ORDER BY number DESC LIMIT ?2)
               AND number NOT IN (SELECT revision FROM instances WHERE app = ?1)
               AND number IS NOT (SELECT revision FROM apps WHERE name = ?1)";
        let digests = {
            let mut stmt = tx.prepare(&format!("SELECT digest {doomed}"))?;
            let rows = stmt.query_map(params![app, keep], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.execute(&format!("DELETE {doomed}"), params![app, keep])?;
        tx.commit()?;
        Ok(digests)
    }

    /// Image digests of all of `app`'s revisions.
    pub fn app_digests(&self, app: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT digest FROM revisions WHERE app = ?1")?;
        let rows = stmt.query_map(params![app], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Image digests that some revision still refers to, with the apps referring to each.
    pub fn digests_in_use(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT digest, app FROM revisions ORDER BY digest, app")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut used: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for row in rows {
            let (digest, app) = row?;
            used.entry(digest).or_default().push(app);
        }
        Ok(used)
    }

    /// Records a new instance and leases it the lowest free address of `hosts`.
    pub fn insert_instance(
        &self,
        uid: &str,
        app: &str,
        slot: u32,
        revision: u32,
        hosts: impl Iterator<Item = Ipv4Addr>,
    ) -> Result<InstanceRow, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let used: std::collections::HashSet<String> = {
            let mut stmt = tx.prepare_cached("SELECT ip FROM instances")?;
            let ips = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
            ips
        };
        let ip = hosts.into_iter().find(|ip| !used.contains(&ip.to_string())).ok_or(StoreError::SubnetFull)?;
        let created_at = now();
        tx.execute(
            "INSERT INTO instances (uid, app, slot, revision, ip, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![uid, app, slot, revision, ip.to_string(), created_at],
        )?;
        tx.commit()?;
        Ok(InstanceRow { uid: uid.to_string(), app: app.to_string(), slot, revision, ip, created_at })
    }

    pub fn instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT uid, app, slot, revision, ip, created_at FROM instances")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(uid, app, slot, revision, ip, created_at)| {
                Some(InstanceRow { uid, app, slot, revision, ip: ip.parse().ok()?, created_at })
            })
            .collect())
    }

    /// Forgets an instance and frees its address.
    pub fn delete_instance(&self, uid: &str) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM instances WHERE uid = ?1", params![uid])?;
        Ok(())
    }

    /// Records what the supervisor knows of an app slot's exits (JSON: restart count, last
    /// exit, whether the restart policy keeps it empty), so a restarted daemon knows it too.
    /// Goes with the app.
    pub fn save_slot(&self, app: &str, slot: u32, history: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO slots (app, slot, history) VALUES (?1, ?2, ?3)
             ON CONFLICT (app, slot) DO UPDATE SET history = excluded.history",
            params![app, slot, history],
        )?;
        Ok(())
    }

    /// Every recorded slot history: (app, slot, JSON).
    pub fn slots(&self) -> Result<Vec<(String, u32, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT app, slot, history FROM slots")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

type RawRevision = (u32, String, String, String, String);

fn revision_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRevision> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn raw_to_revision((number, image, digest, spec, created_at): RawRevision) -> Result<Revision, StoreError> {
    Ok(Revision { number, image, digest, spec: serde_json::from_str(&spec)?, created_at })
}

type RawApp = (String, String, u32, bool, Option<u32>, String, String);

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawApp> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn raw_to_app((name, spec, instances, running, revision, created_at, updated_at): RawApp) -> Result<App, StoreError> {
    Ok(App { name, spec: serde_json::from_str(&spec)?, instances, running, revision, created_at, updated_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AppSpec {
        AppSpec::new("r/x:1", 80)
    }

    #[test]
    fn apps_revisions_and_leases_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).expect("open");
            assert!(s.create_app("web", &spec(), 1).expect("create"));
            assert!(!s.create_app("web", &spec(), 1).expect("duplicate"));
            let r1 = s.revision_for("web", "r/x:1", "sha256:a", &spec()).expect("rev");
            let again = s.revision_for("web", "r/x:1", "sha256:a", &spec()).expect("rev");
            assert_eq!(r1.number, again.number);
            let mut changed = spec();
            changed.env.insert("A".into(), "1".into());
            assert_eq!(s.revision_for("web", "r/x:1", "sha256:a", &changed).expect("rev").number, 2);
            let hosts = || (2..5u8).map(|i| Ipv4Addr::new(10, 0, 0, i));
            let a = s.insert_instance("a", "web", 1, 1, hosts()).expect("lease");
            let b = s.insert_instance("b", "web", 2, 1, hosts()).expect("lease");
            assert_eq!((a.ip, b.ip), (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)));
            s.delete_instance("a").expect("delete");
            assert_eq!(s.insert_instance("c", "web", 3, 1, hosts()).expect("lease").ip, Ipv4Addr::new(10, 0, 0, 2));
            s.insert_instance("d", "web", 4, 1, hosts()).expect("lease");
            assert!(matches!(s.insert_instance("e", "web", 5, 1, hosts()), Err(StoreError::SubnetFull)));
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.apps().expect("apps").len(), 1);
        assert_eq!(s.instances().expect("instances").len(), 3);
        s.save_slot("web", 2, "{\"held\":false}").expect("slot");
        s.save_slot("web", 2, "{\"held\":true}").expect("slot again");
        assert_eq!(s.slots().expect("slots"), [("web".to_string(), 2, "{\"held\":true}".to_string())]);
        assert!(s.save_slot("gone", 1, "{}").is_err(), "a slot belongs to an app");
        assert!(s.delete_app("web").expect("delete"));
        assert!(s.slots().expect("slots").is_empty(), "slots go with their app");
        assert!(s.revision("web", 1).expect("query").is_none());
    }

    #[test]
    fn old_revisions_are_pruned_but_never_the_current_or_a_running_one() {
        let store = Store::open(&tempfile::tempdir().unwrap().path().join("s.db")).unwrap();
        let mut spec = spec();
        assert!(store.create_app("web", &spec, 1).unwrap());
        for n in 1..=6 {
            spec.env.insert("N".into(), n.to_string());
            let rev = store.revision_for("web", "r/x:1", &format!("sha256:{n}"), &spec).unwrap();
            assert_eq!(rev.number, n);
        }
        // Revision 2 still has an instance; revision 1 is the current one (a rollback).
        store.insert_instance("u2", "web", 1, 2, ["10.0.0.2".parse().unwrap()].into_iter()).unwrap();
        let mut app = store.app("web").unwrap().unwrap();
        app.revision = Some(1);
        store.update_app(&app).unwrap();
        assert_eq!(store.prune_revisions("web", 3).unwrap(), ["sha256:3"], "only revision 3 may go");
        assert_eq!(store.app_digests("web").unwrap().len(), 5);
        let used = store.digests_in_use().unwrap();
        let kept: Vec<&str> = used.keys().map(String::as_str).collect();
        assert_eq!(kept, ["sha256:1", "sha256:2", "sha256:4", "sha256:5", "sha256:6"]);
        assert_eq!(used["sha256:6"], ["web"]);
        store.delete_app("web").unwrap();
        assert!(store.digests_in_use().unwrap().is_empty(), "an app's revisions go with it");
    }
}
