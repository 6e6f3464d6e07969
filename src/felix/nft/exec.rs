//! The nftables executor of the policy dataplane and NAT: runs the scripts of `render`
//! with `nft -f -` (one transaction each, in the caller's network namespace) and keeps what
//! is programmed, so that the next delta knows which chains, sets and map elements exist.
//! After a failure nothing is assumed: the next apply is a full one.

use std::io::Write;
use std::process::{Command, Stdio};

use super::netlink::{self, BatchError, ElementChange};
use super::render::{self, Programmed};
use crate::felix::calc::Nat;
use crate::felix::policy::{Delta, PolicyDataplane};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// nft could not be run at all.
    #[error("{step}: cannot run nft (the nftables package): {error}")]
    NoNft {
        step: &'static str,
        error: std::io::Error,
    },
    /// nft refused the transaction (nothing of it was applied); its message.
    #[error("{step}: nft refused the transaction: {message}")]
    Refused { step: &'static str, message: String },
}

/// Counts behind the `felix_nft_*` metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NftStats {
    /// nft transactions run, and those refused.
    pub calls: u64,
    pub errors: u64,
    /// Chains, rules and sets in our tables (both families) after the last success.
    pub chains: i64,
    pub rules: i64,
    pub sets: i64,
}

/// Our tables as last written; see the module documentation.
#[derive(Debug, Default)]
pub struct PolicyTables {
    /// What is programmed; `None` until a full apply succeeded, and after any failure.
    programmed: Option<Programmed>,
    /// The NAT written with the last full apply (an incremental apply keeps it).
    nat: Nat,
    /// The workload interface prefix of the last full pass.
    prefix: Option<String>,
    pub stats: NftStats,
}

const FULL: &str = "full apply of table calico";
const INCREMENTAL: &str = "incremental apply of table calico";
const ELEMENTS: &str = "set elements of table calico (netlink batch)";

/// When `delta` changes set members only, of sets that exist: the element changes, both
/// families, deletions first.
fn element_changes(
    dp: &PolicyDataplane,
    delta: &Delta,
    programmed: &Programmed,
) -> Option<Vec<ElementChange>> {
    let only_members = delta.endpoints.is_empty()
        && delta.policies.is_empty()
        && delta.profiles.is_empty()
        && delta.sets.is_empty()
        && !delta.endpoint_to_host;
    if !only_members {
        return None;
    }
    let ids: std::collections::BTreeSet<&String> =
        delta.added.keys().chain(delta.removed.keys()).collect();
    let mut dels = Vec::new();
    let mut adds = Vec::new();
    for id in ids {
        let set = dp.sets.get(id).filter(|_| programmed.sets.contains(id))?;
        for v6 in [false, true] {
            let (del, add) =
                render::member_changes(set, delta.added.get(id), delta.removed.get(id), v6);
            let name = render::set_name(id, v6);
            dels.push(ElementChange {
                v6,
                set: name.clone(),
                add: false,
                elements: del,
            });
            adds.push(ElementChange {
                v6,
                set: name,
                add: true,
                elements: add,
            });
        }
    }
    dels.extend(adds);
    Some(dels)
}

impl PolicyTables {
    pub fn new() -> PolicyTables {
        PolicyTables::default()
    }

    /// Replace our tables with `dp` and `nat` in one transaction (the full pass: drift
    /// repaired, stale chains and sets removed).
    pub fn write_full(
        &mut self,
        dp: &PolicyDataplane,
        nat: &Nat,
        prefix: &str,
    ) -> Result<(), NftError> {
        self.nat = nat.clone();
        self.prefix = Some(prefix.to_string());
        self.full(dp)
    }

    fn full(&mut self, dp: &PolicyDataplane) -> Result<(), NftError> {
        self.programmed = None;
        let prefix = self.prefix.as_deref().unwrap_or("cali");
        let script = render::full(dp, &self.nat, prefix);
        self.run(FULL, &script)?;
        self.programmed = Some(Programmed::of(dp));
        self.count(dp);
        Ok(())
    }

    /// Make the tables `dp`, writing only what `delta` names (everything when
    /// `delta.full` or when the tables are not known to be right). NAT stays as the last
    /// full apply wrote it.
    pub fn apply(&mut self, dp: &PolicyDataplane, delta: &Delta) -> Result<(), NftError> {
        let Some(programmed) = self.programmed.as_mut().filter(|_| !delta.full) else {
            return self.full(dp);
        };
        if let Some(changes) = element_changes(dp, delta, programmed) {
            self.stats.calls += 1;
            match netlink::write(&changes) {
                Ok(()) => return Ok(()),
                Err(BatchError::Unencodable(_)) => {}
                Err(e) => {
                    self.stats.errors += 1;
                    self.programmed = None;
                    return Err(NftError::Refused {
                        step: ELEMENTS,
                        message: e.to_string(),
                    });
                }
            }
        }
        let Some(programmed) = self.programmed.as_mut() else {
            return self.full(dp);
        };
        let script = render::incremental(dp, delta, programmed);
        if script.is_empty() {
            return Ok(());
        }
        programmed.update(dp, delta);
        if let Err(e) = self.run(INCREMENTAL, &script) {
            self.programmed = None;
            return Err(e);
        }
        self.stats.sets = 2 * dp.sets.len() as i64;
        self.stats.chains = chains_of(dp);
        Ok(())
    }

    /// Count what a full apply of `dp` wrote (rules: both families).
    fn count(&mut self, dp: &PolicyDataplane) {
        self.stats.sets = 2 * dp.sets.len() as i64;
        self.stats.chains = chains_of(dp);
        let mut rules = 0;
        for v6 in [false, true] {
            for c in dp.policies.values().chain(dp.profiles.values()) {
                rules += render::rules_lines(&c.inbound, v6).len();
                rules += render::rules_lines(&c.outbound, v6).len();
            }
            for ep in dp.endpoints.values() {
                rules += render::endpoint_lines(dp, ep, true).len();
                rules += render::endpoint_lines(dp, ep, false).len();
            }
        }
        self.stats.rules = rules as i64;
    }

    fn run(&mut self, step: &'static str, script: &str) -> Result<(), NftError> {
        self.stats.calls += 1;
        let r = run_nft(step, script);
        if r.is_err() {
            self.stats.errors += 1;
        }
        r
    }
}

/// Policy, profile and endpoint chains, both families, both directions.
fn chains_of(dp: &PolicyDataplane) -> i64 {
    4 * (dp.policies.len() + dp.profiles.len() + dp.endpoints.len()) as i64
}

/// Run `script` with `nft -f -` in the caller's network namespace.
pub fn run_nft(step: &'static str, script: &str) -> Result<(), NftError> {
    let mut child = Command::new(crate::env::program("nft"))
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| NftError::NoNft { step, error })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = stdin.write_all(script.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|error| NftError::NoNft { step, error })?;
    if let Err(error) = written {
        return Err(NftError::NoNft { step, error });
    }
    if out.status.success() {
        Ok(())
    } else {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        tracing::debug!(%message, script, "nft refused");
        Err(NftError::Refused { step, message })
    }
}
