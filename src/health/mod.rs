//! Readiness and liveness, as every actor reports them (ground level: the syncer, Felix,
//! confd and the daemon's wiring all use it, and it uses nothing of theirs).
//!
//! - [`report`]: each actor's health reporter and the node's aggregate, which
//!   `node::http` serves as Felix's `/liveness` and `/readiness`.
//! - [`fault`]: what an actor's run ends with, and the fault port tests inject through.
//! - [`restart`]: the backoff-and-give-up rule for parts that can be restarted.

pub mod fault;
pub mod report;
pub mod restart;

pub use fault::{ActorResult, Fault, FaultInput, next_fault};
pub use report::{HealthAggregator, HealthReport, HealthReporter, ReporterState};
pub use restart::{
    FIRST_BACKOFF, GIVE_UP_AFTER, HEALTHY_RUN, MAX_BACKOFF, Restart, RestartPolicy, given_up,
};
