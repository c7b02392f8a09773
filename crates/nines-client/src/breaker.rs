//! A circuit breaker per endpoint (closed, open, half-open), as pybreaker or
//! Istio's outlier detection eject a failing host: after
//! `failures_to_open` consecutive transport failures (a refused connection,
//! no answer within the attempt timeout, a lost connection) the endpoint is
//! skipped for `open_for`; then one call probes it, and its success closes
//! the circuit again while a failure opens it for another `open_for`.
//!
//! Answers from the server (not the leader, refused, invalid) are not
//! failures: the node is alive. The state machine is pure over the `now`
//! it is given, so it is tested without a clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a circuit opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive transport failures that open the circuit.
    pub failures_to_open: u32,
    /// How long an open circuit skips the endpoint before one probe.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    /// Three failures (one is a blip, three in a row is a node that is down
    /// or stopped); one second open, about one election: a node that comes
    /// back is used again within a second or two.
    fn default() -> Self {
        BreakerConfig { failures_to_open: 3, open_for: Duration::from_secs(1) }
    }
}

/// An endpoint's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go through; `failures` in a row so far.
    Closed {
        /// Consecutive transport failures.
        failures: u32,
    },
    /// Calls skip the endpoint until `until`.
    Open {
        /// When one probe may go.
        until: Instant,
    },
    /// One probe is in flight; another may go at `next_probe` (a probe
    /// whose caller gave up never answers).
    HalfOpen {
        /// When another probe may go.
        next_probe: Instant,
    },
}

/// Circuits by endpoint. `std::sync::Mutex`: held for a map update, never
/// across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct Breakers {
    config: BreakerConfig,
    circuits: Mutex<HashMap<String, CircuitState>>,
}

impl Breakers {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Breakers { config, circuits: Mutex::new(HashMap::new()) }
    }

    fn with<T>(&self, endpoint: &str, f: impl FnOnce(&mut CircuitState) -> T) -> T {
        let mut circuits = self.circuits.lock().unwrap_or_else(|p| p.into_inner());
        let state = circuits.entry(endpoint.to_string()).or_insert(CircuitState::Closed { failures: 0 });
        f(state)
    }

    /// Whether a call may go to `endpoint` now; lets one probe through a
    /// circuit whose open period has passed.
    pub(crate) fn allow(&self, endpoint: &str, now: Instant) -> bool {
        let open_for = self.config.open_for;
        self.with(endpoint, |s| match *s {
            CircuitState::Closed { .. } => true,
            CircuitState::Open { until: at } | CircuitState::HalfOpen { next_probe: at } if now >= at => {
                *s = CircuitState::HalfOpen { next_probe: now + open_for };
                true
            }
            CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => false,
        })
    }

    /// Whether `endpoint` would be skipped now (without letting a probe go).
    pub(crate) fn is_open(&self, endpoint: &str, now: Instant) -> bool {
        self.with(endpoint, |s| match *s {
            CircuitState::Closed { .. } => false,
            CircuitState::Open { until: at } | CircuitState::HalfOpen { next_probe: at } => now < at,
        })
    }

    /// An answer came back from `endpoint`.
    pub(crate) fn success(&self, endpoint: &str) {
        self.with(endpoint, |s| {
            if !matches!(s, CircuitState::Closed { failures: 0 }) {
                tracing::debug!(endpoint, "circuit closed");
            }
            *s = CircuitState::Closed { failures: 0 }
        });
    }

    /// A transport failure at `endpoint`.
    pub(crate) fn failure(&self, endpoint: &str, now: Instant) {
        let config = self.config;
        self.with(endpoint, |s| {
            let open = match *s {
                CircuitState::Closed { failures } if failures + 1 < config.failures_to_open => {
                    *s = CircuitState::Closed { failures: failures + 1 };
                    false
                }
                CircuitState::Open { .. } => false,
                CircuitState::Closed { .. } | CircuitState::HalfOpen { .. } => true,
            };
            if open {
                tracing::info!(endpoint, open_for = ?config.open_for, "circuit opened");
                *s = CircuitState::Open { until: now + config.open_for };
            }
        });
    }

    /// Every endpoint's circuit, for diagnostics and tests.
    pub(crate) fn states(&self) -> Vec<(String, CircuitState)> {
        let circuits = self.circuits.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = circuits.iter().map(|(e, s)| (e.clone(), *s)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let b = Breakers::new(BreakerConfig { failures_to_open: 3, open_for: Duration::from_secs(1) });
        let t0 = Instant::now();
        let e = "http://n1";
        // Two failures, a success, two more: still closed (not consecutive).
        b.failure(e, t0);
        b.failure(e, t0);
        b.success(e);
        b.failure(e, t0);
        b.failure(e, t0);
        assert!(b.allow(e, t0));
        b.failure(e, t0);
        assert!(!b.allow(e, t0), "three in a row open it");
        assert!(b.is_open(e, t0));
        let later = t0 + Duration::from_millis(1001);
        assert!(!b.is_open(e, later));
        assert!(b.allow(e, later), "one probe after the open period");
        assert!(!b.allow(e, later), "only one");
        b.success(e);
        assert_eq!(b.states(), vec![(e.to_string(), CircuitState::Closed { failures: 0 })]);
    }

    #[test]
    fn a_failed_probe_opens_the_circuit_again() {
        let b = Breakers::new(BreakerConfig { failures_to_open: 1, open_for: Duration::from_secs(2) });
        let t0 = Instant::now();
        b.failure("e", t0);
        let t1 = t0 + Duration::from_secs(2);
        assert!(b.allow("e", t1));
        b.failure("e", t1);
        assert!(!b.allow("e", t1 + Duration::from_secs(1)));
        assert!(b.allow("e", t1 + Duration::from_secs(2)));
    }
}
