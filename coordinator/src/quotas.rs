//! Quotas per namespace (docs/security.md): goals submitted per second, with a burst of as
//! many, and runs in progress at once. A refusal is `RESOURCE_EXHAUSTED` naming the quota,
//! with a `retry-after-ms` hint. Work already accepted (a run's children, a retried
//! submission of a known key) is not counted against them.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota as Rate, RateLimiter};
use mesh_proto::domain::Namespace;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// One namespace's quota; a limit left out is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    /// Goals submitted per second (a burst of as many).
    pub submissions_per_second: Option<u32>,
    /// Runs in progress at once.
    pub max_active_runs: Option<usize>,
}

/// `[quotas]`: `default` for every namespace without its own entry in `namespaces`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    pub default: Quota,
    pub namespaces: BTreeMap<String, Quota>,
}

/// The quotas and each namespace's submission limiter (made on its first submission).
#[derive(Debug, Default)]
pub struct Quotas {
    config: QuotasConfig,
    limiters: DashMap<Namespace, Arc<DefaultDirectRateLimiter>>,
}

impl Quotas {
    pub fn new(config: QuotasConfig) -> Quotas {
        Quotas {
            config,
            limiters: DashMap::new(),
        }
    }

    fn quota(&self, namespace: &Namespace) -> Quota {
        self.config
            .namespaces
            .get(namespace.as_str())
            .copied()
            .unwrap_or(self.config.default)
    }

    /// Whether `namespace`, with `live` runs in progress, may submit one more goal now.
    pub fn admit(&self, namespace: &Namespace, live: usize) -> Result<(), Error> {
        let quota = self.quota(namespace);
        if let Some(max) = quota.max_active_runs
            && live >= max
        {
            return Err(Error::QuotaExceeded {
                message: format!(
                    "namespace `{namespace}` has {live} runs in progress, its quota (max_active_runs) is {max}"
                ),
                retry_after_ms: 1000,
            });
        }
        let Some(rate) = quota.submissions_per_second.and_then(NonZeroU32::new) else {
            return Ok(());
        };
        let limiter = self
            .limiters
            .entry(namespace.clone())
            .or_insert_with(|| Arc::new(RateLimiter::direct(Rate::per_second(rate))))
            .clone();
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::QuotaExceeded {
                message: format!(
                    "namespace `{namespace}` is over its quota of {rate} submissions per second"
                ),
                retry_after_ms: (wait.as_millis() as u64).max(1),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Quotas {
        let mut config = QuotasConfig {
            default: Quota {
                submissions_per_second: Some(2),
                max_active_runs: None,
            },
            ..QuotasConfig::default()
        };
        config.namespaces.insert(
            "small".into(),
            Quota {
                submissions_per_second: None,
                max_active_runs: Some(1),
            },
        );
        Quotas::new(config)
    }

    #[test]
    fn a_namespace_past_its_rate_waits_and_others_do_not() {
        let q = quotas();
        let a = Namespace("a".into());
        q.admit(&a, 0).unwrap();
        q.admit(&a, 0).unwrap();
        match q.admit(&a, 0) {
            Err(Error::QuotaExceeded {
                message,
                retry_after_ms,
            }) => {
                assert!(
                    message.contains("quota of 2 submissions per second"),
                    "{message}"
                );
                assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
            }
            other => panic!("{other:?}"),
        }
        // Another namespace has its own bucket.
        q.admit(&Namespace("b".into()), 0).unwrap();
    }

    #[test]
    fn a_namespace_at_its_active_runs_is_refused_naming_the_quota() {
        let q = quotas();
        let small = Namespace("small".into());
        q.admit(&small, 0).unwrap();
        let e = q.admit(&small, 1).unwrap_err().to_string();
        assert!(
            e.contains("has 1 runs in progress, its quota (max_active_runs) is 1"),
            "{e}"
        );
        // No rate for it: its own entry replaces the default.
        for _ in 0..10 {
            q.admit(&small, 0).unwrap();
        }
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    /// The refusal carries its wait as `retry-after-ms`, for clients that back off.
    #[test]
    fn a_quota_refusal_is_resource_exhausted_with_a_retry_after_hint() {
        let status = tonic::Status::from(Error::QuotaExceeded {
            message: "namespace `a` is over its quota".into(),
            retry_after_ms: 250,
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.metadata().get("retry-after-ms").unwrap(), "250");
        assert!(status.message().ends_with("retry in 250 ms"));
    }
}
