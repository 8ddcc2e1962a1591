//! The record of deploys: which revision an app moved from and to, and how it ended. A deploy
//! is recorded (with what to return to) before its rollout begins, so a daemon that dies
//! mid-rollout finds it `in_progress` at the next start and finishes it.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Store, StoreError};
use crate::apps::{now, AppSpec, Revision};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deploys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    from_revision INTEGER,
    from_spec TEXT NOT NULL,
    from_running INTEGER NOT NULL,
    to_revision INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT
);
";

/// How a deploy ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    InProgress,
    /// Every instance runs the new revision.
    Deployed,
    /// The new revision never became ready; the app went back to the previous one.
    Failed,
}

impl DeployState {
    fn as_str(self) -> &'static str {
        match self {
            DeployState::InProgress => "in_progress",
            DeployState::Deployed => "deployed",
            DeployState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> DeployState {
        match s {
            "deployed" => DeployState::Deployed,
            "failed" => DeployState::Failed,
            _ => DeployState::InProgress,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Deploy {
    pub id: i64,
    pub app: String,
    /// `deploy` or `rollback`.
    pub kind: String,
    pub from_revision: Option<u32>,
    /// What the app returns to if the deploy fails.
    #[serde(skip)]
    pub from_spec: AppSpec,
    #[serde(skip)]
    pub from_running: bool,
    pub to_revision: u32,
    pub state: DeployState,
    pub reason: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

type RawDeploy = (i64, String, String, Option<u32>, String, bool, u32, String, Option<String>, String, Option<String>);

const COLUMNS: &str =
    "id, app, kind, from_revision, from_spec, from_running, to_revision, state, reason, started_at, finished_at";

fn raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawDeploy> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

fn to_deploy(r: RawDeploy) -> Result<Deploy, StoreError> {
    let (id, app, kind, from_revision, from_spec, from_running, to_revision, state, reason, started_at, finished_at) =
        r;
    Ok(Deploy {
        id,
        app,
        kind,
        from_revision,
        from_spec: serde_json::from_str(&from_spec)?,
        from_running,
        to_revision,
        state: DeployState::parse(&state),
        reason,
        started_at,
        finished_at,
    })
}

impl Store {
    /// Records a deploy about to begin; returns its id.
    pub fn begin_deploy(
        &self,
        app: &str,
        kind: &str,
        from: (Option<u32>, &AppSpec, bool),
        to_revision: u32,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO deploys (app, kind, from_revision, from_spec, from_running, to_revision, state, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'in_progress', ?7)",
            params![app, kind, from.0, serde_json::to_string(from.1)?, from.2, to_revision, now()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn finish_deploy(&self, id: i64, state: DeployState, reason: Option<&str>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE deploys SET state = ?2, reason = ?3, finished_at = ?4 WHERE id = ?1",
            params![id, state.as_str(), reason, now()],
        )?;
        Ok(())
    }

    /// The app's deploy still under way (a daemon died during it), if any.
    pub fn deploy_in_progress(&self, app: &str) -> Result<Option<Deploy>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM deploys WHERE app = ?1 AND state = 'in_progress' ORDER BY id DESC LIMIT 1"
                ),
                params![app],
                raw,
            )
            .optional()?;
        row.map(to_deploy).transpose()
    }

    /// Every recorded deploy of `app`, oldest first.
    pub fn deploys(&self, app: &str) -> Result<Vec<Deploy>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM deploys WHERE app = ?1 ORDER BY id"))?;
        let rows = stmt.query_map(params![app], raw)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_deploy).collect()
    }

    /// The app's kept revisions, oldest first.
    pub fn revisions(&self, app: &str) -> Result<Vec<Revision>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT number, image, digest, spec, created_at FROM revisions WHERE app = ?1 ORDER BY number")?;
        let rows = stmt.query_map(params![app], super::revision_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(super::raw_to_revision).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploys_are_recorded_before_and_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.db")).expect("open");
        let spec = AppSpec::new("r/x:1", 80);
        assert!(store.create_app("web", &spec, 2).expect("create"));
        store.revision_for("web", "r/x:1", "sha256:a", &spec).expect("rev");
        let id = store.begin_deploy("web", "deploy", (None, &spec, false), 1).expect("begin");
        let open = store.deploy_in_progress("web").expect("query").expect("in progress");
        assert_eq!((open.id, open.to_revision, open.from_running), (id, 1, false));
        store.finish_deploy(id, DeployState::Failed, Some("never ready")).expect("finish");
        assert!(store.deploy_in_progress("web").expect("query").is_none());
        let all = store.deploys("web").expect("deploys");
        assert_eq!(all[0].state, DeployState::Failed);
        assert_eq!(all[0].reason.as_deref(), Some("never ready"));
        assert_eq!(store.revisions("web").expect("revisions").len(), 1);
        store.delete_app("web").expect("delete");
        assert!(store.deploys("web").expect("deploys").is_empty(), "an app's deploys go with it");
    }
}
