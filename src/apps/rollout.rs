//! How a deploy replaces an app's instances (surge, unavailability), how long a new instance
//! may take to become ready, and how long a running one may stay unhealthy before it is
//! replaced. Each `None` is the default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// New instances started at once during a deploy, on top of the desired count.
pub const DEFAULT_SURGE: u32 = 1;
/// Old instances a deploy may stop before their replacements are ready: none, no capacity lost.
pub const DEFAULT_MAX_UNAVAILABLE: u32 = 0;
/// A new instance that is not ready (accepting on its port, passing the health check) this long
/// after it started fails the deploy.
pub const DEFAULT_DEPLOY_TIMEOUT_MS: u64 = 60_000;
/// A running instance that stays unhealthy this long is replaced.
pub const DEFAULT_UNHEALTHY_TIMEOUT_MS: u64 = 30_000;
/// More than this at once is a typo.
const MAX_BATCH: u32 = 100;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rollout {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub surge: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_timeout_ms: Option<u64>,
}

impl Rollout {
    pub fn is_default(&self) -> bool {
        self == &Rollout::default()
    }

    pub fn surge(&self) -> u32 {
        self.surge.unwrap_or(DEFAULT_SURGE)
    }

    pub fn max_unavailable(&self) -> u32 {
        self.max_unavailable.unwrap_or(DEFAULT_MAX_UNAVAILABLE)
    }

    pub fn deploy_timeout(&self) -> Duration {
        Duration::from_millis(self.deploy_timeout_ms.unwrap_or(DEFAULT_DEPLOY_TIMEOUT_MS))
    }

    pub fn unhealthy_timeout(&self) -> Duration {
        Duration::from_millis(self.unhealthy_timeout_ms.unwrap_or(DEFAULT_UNHEALTHY_TIMEOUT_MS))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.surge() > MAX_BATCH || self.max_unavailable() > MAX_BATCH {
            return Err(format!("invalid rollout: surge and max unavailable are at most {MAX_BATCH}"));
        }
        if self.surge() == 0 && self.max_unavailable() == 0 {
            return Err("invalid rollout: surge and max unavailable cannot both be 0 (nothing could move)".into());
        }
        for (what, t) in [("deploy timeout", self.deploy_timeout_ms), ("unhealthy timeout", self.unhealthy_timeout_ms)]
        {
            if t.is_some_and(|t| !(1000..=3_600_000).contains(&t)) {
                return Err(format!("invalid {what}: 1s to 1h"));
            }
        }
        Ok(())
    }
}

/// Which slots a rollout works on together: each batch has at most `surge + max_unavailable`
/// slots (at least one), of which the first `max_unavailable` may lose their old instance
/// before the new one is ready. Pure, so the schedule is testable.
pub fn batches(slots: &[u32], surge: u32, max_unavailable: u32) -> Vec<Vec<u32>> {
    let size = (surge.saturating_add(max_unavailable)).max(1) as usize;
    slots.chunks(size).map(<[u32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_limits() {
        let r = Rollout::default();
        assert_eq!((r.surge(), r.max_unavailable()), (1, 0));
        assert_eq!(r.deploy_timeout(), Duration::from_secs(60));
        assert!(r.validate().is_ok());
        let none_moves = Rollout { surge: Some(0), ..Rollout::default() };
        assert!(none_moves.validate().is_err());
        let stop_first = Rollout { surge: Some(0), max_unavailable: Some(1), ..Rollout::default() };
        assert!(stop_first.validate().is_ok());
        assert!(Rollout { deploy_timeout_ms: Some(10), ..Rollout::default() }.validate().is_err());
    }

    #[test]
    fn batches_follow_surge_and_unavailability() {
        assert_eq!(batches(&[1, 2, 3], 1, 0), vec![vec![1], vec![2], vec![3]]);
        assert_eq!(batches(&[1, 2, 3, 4, 5], 2, 0), vec![vec![1, 2], vec![3, 4], vec![5]]);
        assert_eq!(batches(&[1, 2, 3, 4], 1, 1), vec![vec![1, 2], vec![3, 4]]);
        assert!(batches(&[], 1, 0).is_empty());
    }
}
