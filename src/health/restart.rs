//! The restart rule of a part that can be started again: the daemon's supervisor applies
//! it to its restartable actors and confd to the BGP speaker it runs. Pure: the caller
//! measures how long a run lasted and sleeps the pause itself.

use std::time::Duration;

/// First pause before a restart.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause before a restart.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run this long counts as healthy: the backoff and the failure count start again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Failures in a row after which a restartable actor is reported dead.
pub const GIVE_UP_AFTER: u32 = 5;

/// What to do after a failure: restart after a pause, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Start again after this pause.
    After(Duration),
    /// Too many failures in a row: report the actor dead.
    GiveUp { failures: u32 },
}

/// The supervisor's restart rule, also used by confd for the speaker it runs: pauses of
/// 1 s doubling to 30 s; a run of a minute or more counts as healthy and starts the
/// count again; [`GIVE_UP_AFTER`] failures in a row give up, so a part that can never
/// run (its port taken, its directory missing) ends on `/liveness`, where the
/// orchestrator sees it, as Calico's liveness probe reports a BIRD that keeps dying.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    backoff: Duration,
    failures: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff: FIRST_BACKOFF,
            failures: 0,
        }
    }
}

impl RestartPolicy {
    /// A run that lasted `ran_for` has ended: restart after how long, or give up.
    pub fn failed(&mut self, ran_for: Duration) -> Restart {
        if ran_for >= HEALTHY_RUN {
            *self = RestartPolicy::default();
        }
        self.failures += 1;
        if self.failures >= GIVE_UP_AFTER {
            return Restart::GiveUp {
                failures: self.failures,
            };
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Restart::After(pause)
    }
}

/// The liveness reason of an actor given up on: the last cause and the count.
pub fn given_up(why: &str, failures: u32) -> String {
    format!("{why} ({failures} failures in a row; not restarted)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_pauses_double_to_a_cap_reset_after_a_healthy_run_and_give_up() {
        let quick = Duration::from_millis(10);
        let mut p = RestartPolicy::default();
        assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(1)));
        assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(2)));
        assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(4)));
        // A minute of healthy running starts again from the first pause.
        assert_eq!(p.failed(HEALTHY_RUN), Restart::After(FIRST_BACKOFF));
        for want in [2, 4, 8] {
            assert_eq!(p.failed(quick), Restart::After(Duration::from_secs(want)));
        }
        assert_eq!(p.failed(quick), Restart::GiveUp { failures: 5 });
        let mut p = RestartPolicy {
            backoff: Duration::from_secs(16),
            failures: 0,
        };
        p.failed(quick);
        assert_eq!(
            p.failed(quick),
            Restart::After(MAX_BACKOFF),
            "capped at 30 s"
        );
    }
}
