//! The node's health as its actors report it: each registers under its name and says
//! whether it is live and ready, and why not; the node is ready when every actor is ready
//! and live when every actor is live (Felix's health aggregator, served on 9099 by
//! `node::http`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One actor's health.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReporterState {
    pub name: String,
    pub live: bool,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The node's health: ready when every actor is ready, live when every actor is live.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthReport {
    pub live: bool,
    pub ready: bool,
    pub reporters: Vec<ReporterState>,
}

type States = Arc<Mutex<BTreeMap<String, ReporterState>>>;

fn lock(s: &States) -> std::sync::MutexGuard<'_, BTreeMap<String, ReporterState>> {
    // Each update replaces one entry whole: a poisoned lock still holds consistent data.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Collects the health of every actor. Cheap to clone.
#[derive(Clone, Default)]
pub struct HealthAggregator {
    states: States,
}

/// An actor's handle for reporting its health.
#[derive(Clone)]
pub struct HealthReporter {
    name: String,
    states: States,
}

impl HealthAggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register an actor: live, not ready ("starting") until it says otherwise.
    pub fn register(&self, name: &str) -> HealthReporter {
        lock(&self.states).insert(
            name.to_string(),
            ReporterState {
                name: name.to_string(),
                live: true,
                ready: false,
                reason: Some("starting".into()),
            },
        );
        HealthReporter {
            name: name.to_string(),
            states: self.states.clone(),
        }
    }

    /// Register an actor that reports liveness only (ready from the start): a supervised
    /// task with no readiness of its own, such as an endpoint or the IPAM collector.
    pub fn register_liveness(&self, name: &str) -> HealthReporter {
        lock(&self.states).insert(
            name.to_string(),
            ReporterState {
                name: name.to_string(),
                live: true,
                ready: true,
                reason: None,
            },
        );
        HealthReporter {
            name: name.to_string(),
            states: self.states.clone(),
        }
    }

    /// The current report.
    pub fn snapshot(&self) -> HealthReport {
        let reporters: Vec<ReporterState> = lock(&self.states).values().cloned().collect();
        HealthReport {
            live: reporters.iter().all(|r| r.live),
            ready: !reporters.is_empty() && reporters.iter().all(|r| r.ready),
            reporters,
        }
    }
}

impl HealthReporter {
    /// Report readiness; `reason` says why not. Once the actor is reported dead it stays
    /// not ready and its reason stays the cause of death: an actor that keeps reporting
    /// readiness (confd after giving up on the speaker) must not hide why the node is not
    /// live, nor have it counted as available meanwhile (a rolling update would move on).
    pub fn set_ready(&self, ready: bool, reason: Option<String>) {
        if let Some(s) = lock(&self.states).get_mut(&self.name) {
            s.ready = ready && s.live;
            if s.live {
                s.reason = if ready { None } else { reason };
            }
        }
    }

    /// Report liveness (a dead actor makes `/liveness` fail, so the node is restarted; it
    /// is not ready either until it reports readiness again alive).
    pub fn set_live(&self, live: bool, reason: Option<String>) {
        if let Some(s) = lock(&self.states).get_mut(&self.name) {
            s.live = live;
            if !live {
                s.ready = false;
                s.reason = reason;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_reporters_means_not_ready() {
        assert!(!HealthAggregator::new().snapshot().ready);
    }
}
