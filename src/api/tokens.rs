//! `/v1/tokens`: bearer tokens for the remote API. They are created, listed and removed over
//! the unix socket only (whoever may use the socket is root or in its group); a request that
//! came over TCP is refused, whatever its token.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::remote::Remote;
use super::ApiError;
use crate::apps::store::TokenRow;
use crate::supervisor::Supervisor;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Letters, digits, `.`, `_` and `-`, up to 64; generated when absent.
    pub name: Option<String>,
    /// How long the token is valid: `90m`, `12h`, `30d`, `1w`, or an RFC 3339 time; forever
    /// when absent.
    pub expires: Option<String>,
}

/// A new token: the only time its secret is shown.
#[derive(Debug, Serialize)]
pub struct CreatedToken {
    pub name: String,
    pub token: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TokenView {
    #[serde(flatten)]
    pub row: TokenRow,
    pub expired: bool,
}

fn refuse_remote(remote: Option<Extension<Remote>>) -> Result<(), ApiError> {
    match remote {
        Some(Extension(r)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "tokens are managed over the daemon's unix socket only, not over TCP (this request came with token {}): run `deliverous token` on the host",
                r.token
            ),
        )),
        None => Ok(()),
    }
}

pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid token name {name:?}: use 1 to 64 letters, digits, '.', '_' and '-'"))
    }
}

/// `30d` from now, or an RFC 3339 time (which must be in the future).
pub fn parse_expiry(text: &str, now: chrono::DateTime<chrono::Utc>) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let t = text.trim();
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(t) {
        let at = at.with_timezone(&chrono::Utc);
        return if at > now { Ok(at) } else { Err(format!("expiry {text:?} is in the past")) };
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let secs: i64 = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("invalid expiry {text:?}: expected e.g. 90m, 12h, 30d, 1w or an RFC 3339 time")),
    };
    let n: i64 = num.parse().map_err(|_| format!("invalid expiry {text:?}: expected e.g. 90m, 12h, 30d, 1w"))?;
    // Ten years at most: beyond that, "forever" (no --expires) says it better.
    if n == 0 || n.checked_mul(secs).is_none_or(|s| s > 10 * 366 * 86_400) {
        return Err(format!("invalid expiry {text:?}: from 1m to 10 years"));
    }
    Ok(now + chrono::Duration::seconds(n * secs))
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Equal bytes, in time that depends on the length only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub fn expired(row: &TokenRow, now: chrono::DateTime<chrono::Utc>) -> bool {
    row.expires_at
        .as_deref()
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        .is_some_and(|e| e.with_timezone(&chrono::Utc) <= now)
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) async fn create(
    State(sup): State<Arc<Supervisor>>,
    remote: Option<Extension<Remote>>,
    payload: axum::body::Bytes,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    refuse_remote(remote)?;
    // An empty body is an empty request: every field is optional.
    let req: CreateToken = if payload.iter().all(u8::is_ascii_whitespace) {
        CreateToken::default()
    } else {
        serde_json::from_slice(&payload).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
    };
    let now = chrono::Utc::now();
    let name = match req.name {
        Some(n) => {
            check_name(&n).map_err(ApiError::bad_request)?;
            n
        }
        None => format!("token-{}", hex::encode(rand::random::<[u8; 3]>())),
    };
    let expires_at = match &req.expires {
        Some(e) => Some(rfc3339(parse_expiry(e, now).map_err(ApiError::bad_request)?)),
        None => None,
    };
    let token = format!("dlv_{}", hex::encode(rand::random::<[u8; 32]>()));
    if !sup.store().create_token(&name, &hash(&token), expires_at.as_deref())? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("a token named {name:?} already exists: remove it first (`deliverous token rm {name}`) or pick another name"),
        ));
    }
    sup.events().emit(
        crate::events::Kind::TokenCreated,
        "",
        None,
        format!("API token {name} created, expires {}", expires_at.as_deref().unwrap_or("never")),
    );
    let row = sup.store().token(&name)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            name,
            token,
            created_at: row.map(|r| r.created_at).unwrap_or_else(crate::apps::now),
            expires_at,
        }),
    ))
}

pub(super) async fn list(
    State(sup): State<Arc<Supervisor>>,
    remote: Option<Extension<Remote>>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    refuse_remote(remote)?;
    let now = chrono::Utc::now();
    Ok(Json(sup.store().tokens()?.into_iter().map(|row| TokenView { expired: expired(&row, now), row }).collect()))
}

pub(super) async fn remove(
    State(sup): State<Arc<Supervisor>>,
    remote: Option<Extension<Remote>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    refuse_remote(remote)?;
    if !sup.store().delete_token(&name)? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no token named {name:?}: see `deliverous token ls`"),
        ));
    }
    sup.events().emit(crate::events::Kind::TokenRemoved, "", None, format!("API token {name} removed"));
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_durations_and_times() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").map(|t| t.with_timezone(&chrono::Utc));
        let Ok(now) = now else { panic!("test time") };
        assert_eq!(parse_expiry("30d", now).map(rfc3339), Ok("2026-01-31T00:00:00.000Z".to_string()));
        assert_eq!(parse_expiry("90m", now).map(rfc3339), Ok("2026-01-01T01:30:00.000Z".to_string()));
        assert!(parse_expiry("2026-02-01T00:00:00Z", now).is_ok());
        assert!(parse_expiry("2025-02-01T00:00:00Z", now).is_err());
        for bad in ["", "0d", "30", "d", "-1d", "99999999999999999w", "1y"] {
            assert!(parse_expiry(bad, now).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_and_comparison() {
        assert!(check_name("ci-deploy.1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert_eq!(hash("x").len(), 64);
    }
}
