//! API tokens for the remote (TCP) API: only their SHA-256 is kept, with a name, times of
//! creation, expiry and last use.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Store, StoreError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT
);
";

#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    pub name: String,
    /// Hex SHA-256 of the token.
    #[serde(skip)]
    pub hash: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
}

impl Store {
    /// Inserts a token; `Ok(false)` if the name is taken.
    pub fn create_token(&self, name: &str, hash: &str, expires_at: Option<&str>) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO tokens (name, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, hash, super::now(), expires_at],
        )?;
        Ok(n == 1)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, hash, created_at, expires_at, last_used_at FROM tokens ORDER BY created_at, name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(TokenRow {
                    name: r.get(0)?,
                    hash: r.get(1)?,
                    created_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn token(&self, name: &str) -> Result<Option<TokenRow>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT name, hash, created_at, expires_at, last_used_at FROM tokens WHERE name = ?1")?;
        Ok(stmt
            .query_row(params![name], |r| {
                Ok(TokenRow {
                    name: r.get(0)?,
                    hash: r.get(1)?,
                    created_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                })
            })
            .optional()?)
    }

    /// `Ok(false)` if there was no such token.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM tokens WHERE name = ?1", params![name])? == 1)
    }

    pub fn token_used(&self, name: &str, at: &str) -> Result<(), StoreError> {
        self.conn().execute("UPDATE tokens SET last_used_at = ?2 WHERE name = ?1", params![name, at])?;
        Ok(())
    }
}
