//! The nftables executor of the policy dataplane and NAT: runs the scripts of `render`
//! with `nft -f -` (one transaction each, in the caller's network namespace) and keeps what
//! is programmed, so that the next delta knows which chains, sets and map elements exist.
//! After a failure nothing is assumed: the next apply is a full one.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

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
    /// `nft -f` transactions run, and those refused.
    pub calls: u64,
    pub errors: u64,
    /// Set element batches (netlink) run, and those refused.
    pub set_calls: u64,
    pub set_errors: u64,
    /// Per family (IPv4, IPv6): the policy, profile and endpoint chains and the sets in
    /// our tables after the last success, and their rules as of the last full write.
    pub chains: [i64; 2],
    pub rules: [i64; 2],
    pub sets: [i64; 2],
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
    /// The dataplane in our tables, when known (after a full write, or an apply whose
    /// caller handed it over with [`PolicyTables::written`]): a full pass with an equal
    /// dataplane, the same NAT and prefix skips the rewrite (~1 s with 1,000 endpoints)
    /// until the refresh interval has passed since the last full write. Weak: a strong
    /// reference would make the calculation's next change (`Arc::make_mut`) copy the
    /// whole dataplane (milliseconds with 1,000 endpoints, on every label change); the
    /// change moves it instead, and this reference dies, so a full pass after a change
    /// that was never applied rewrites.
    written: Option<Weak<PolicyDataplane>>,
    /// When the last full write was made.
    last_full: Option<Instant>,
    /// The nftables generation after our last write: unchanged, no one has touched
    /// nftables since, so a full pass of an equal dataplane has nothing to repair.
    generation: Option<u32>,
    /// The netlink socket of set element batches and generation reads, kept open (see
    /// [`netlink::Conn`]); dropped after a socket error, opened again when next needed.
    conn: Option<netlink::Conn>,
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
        && !delta.endpoint_to_host
        && !delta.encap_drops
        && !delta.host
        && !delta.log_prefix;
    if !only_members {
        return None;
    }
    let ids: std::collections::BTreeSet<&String> =
        delta.added.keys().chain(delta.removed.keys()).collect();
    let mut dels = Vec::new();
    let mut adds = Vec::new();
    for id in ids {
        let set = dp.sets.get(id).filter(|_| programmed.sets.contains(id))?;
        for &v6 in render::families(programmed) {
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

    /// The full pass: replace our tables with `dp` and `nat` unless they hold an equal
    /// dataplane, that NAT and prefix, and either the last full write is less than
    /// `refresh` old (the route refresh interval: drift, someone else's `nft flush
    /// ruleset`, is repaired within it) or nothing has written nftables since our last write (the
    /// ruleset generation is the same): drift repair without a periodic rewrite. Whether
    /// nft ran.
    ///
    /// When the dataplane changed but NAT and prefix did not, our tables are known
    /// (`programmed`) and nothing has written nftables since our last write, `delta` (what
    /// changed since that write) is written instead of the whole table: a pod added to a
    /// node of 1,000 endpoints writes its chains, not every rule (1-2 s with `nft -f`).
    pub fn ensure_full(
        &mut self,
        dp: &Arc<PolicyDataplane>,
        delta: &Delta,
        nat: &Nat,
        prefix: &str,
        now: Instant,
        refresh: Duration,
    ) -> Result<bool, NftError> {
        let recent = self
            .last_full
            .is_some_and(|at| now.saturating_duration_since(at) < refresh);
        let same = self
            .written
            .as_ref()
            .and_then(Weak::upgrade)
            .is_some_and(|w| Arc::ptr_eq(&w, dp) || *w == **dp);
        if same
            && self.programmed.is_some()
            && self.nat == *nat
            && self.prefix.as_deref() == Some(prefix)
            && (recent || self.untouched())
        {
            return Ok(false);
        }
        if !same
            && !delta.full
            && self.programmed.is_some()
            && self.nat == *nat
            && self.prefix.as_deref() == Some(prefix)
            && self.untouched()
        {
            self.apply(dp, delta)?;
            self.written(dp);
            return Ok(true);
        }
        self.write_full(dp, nat, prefix)?;
        self.written = Some(Arc::downgrade(dp));
        self.last_full = Some(now);
        Ok(true)
    }

    /// The caller's `Arc` of the dataplane its last successful [`PolicyTables::apply`]
    /// wrote (cheap to keep; lets the next full pass see there is nothing to rewrite).
    pub fn written(&mut self, dp: &Arc<PolicyDataplane>) {
        if self.programmed.is_some() {
            self.written = Some(Arc::downgrade(dp));
        }
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
        self.generation = None;
        self.written = None;
        self.last_full = None;
        let prefix = self.prefix.clone().unwrap_or_else(|| "cali".to_string());
        let script = render::full(dp, &self.nat, &prefix);
        self.run(FULL, &script)?;
        self.programmed = Some(Programmed::of(dp, render::ipv6(&self.nat), &prefix));
        self.last_full = Some(Instant::now());
        self.generation = self.current_generation();
        let families = render::families(self.programmed.as_ref().expect("just set"));
        self.count(dp, families);
        Ok(())
    }

    /// Make the tables `dp`, writing only what `delta` names (everything when
    /// `delta.full` or when the tables are not known to be right). NAT stays as the last
    /// full apply wrote it.
    pub fn apply(&mut self, dp: &PolicyDataplane, delta: &Delta) -> Result<(), NftError> {
        self.written = None;
        let Some(programmed) = self.programmed.as_mut().filter(|_| !delta.full) else {
            return self.full(dp);
        };
        if let Some(changes) = element_changes(dp, delta, programmed) {
            self.stats.set_calls += 1;
            let written = self.connection().and_then(|c| c.write(&changes));
            if matches!(written, Err(BatchError::Socket(_))) {
                self.conn = None;
            }
            match written {
                Ok(()) => {
                    self.generation = self.current_generation();
                    return Ok(());
                }
                Err(BatchError::Unencodable(_)) => {}
                Err(e) => {
                    self.stats.set_errors += 1;
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
        let families = render::families(programmed);
        if let Err(e) = self.run(INCREMENTAL, &script) {
            self.programmed = None;
            return Err(e);
        }
        self.generation = self.current_generation();
        for &v6 in families {
            self.stats.sets[v6 as usize] = dp.sets.len() as i64;
            self.stats.chains[v6 as usize] = chains_of(dp);
        }
        Ok(())
    }

    /// Whether nothing has written nftables since our last write (the generation is the
    /// one our last write left).
    fn untouched(&mut self) -> bool {
        self.generation.is_some() && self.current_generation() == self.generation
    }

    /// The nftables generation now; `None` when it cannot be read.
    fn current_generation(&mut self) -> Option<u32> {
        let r = self.connection().and_then(|c| c.generation());
        if r.is_err() {
            self.conn = None;
        }
        r.ok()
    }

    /// The kept netlink socket, opened when there is none.
    fn connection(&mut self) -> Result<&mut netlink::Conn, BatchError> {
        if self.conn.is_none() {
            self.conn = Some(netlink::Conn::open()?);
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }

    /// Count what a full apply of `dp` wrote in `families`.
    fn count(&mut self, dp: &PolicyDataplane, families: &[bool]) {
        self.stats.sets = [0; 2];
        self.stats.chains = [0; 2];
        self.stats.rules = [0; 2];
        for &v6 in families {
            let mut rules = 0;
            let policies = dp
                .policies
                .iter()
                .flat_map(|(id, c)| render::policy_chains(dp, id, c, v6));
            let profiles = dp
                .profiles
                .iter()
                .flat_map(|(n, c)| render::profile_chains(dp, n, c, v6));
            rules += policies
                .chain(profiles)
                .map(|(_, r)| r.len())
                .sum::<usize>();
            for ep in dp.endpoints.values() {
                rules += render::endpoint_lines(dp, ep, true).len();
                rules += render::endpoint_lines(dp, ep, false).len();
            }
            let f = v6 as usize;
            self.stats.rules[f] = rules as i64;
            self.stats.sets[f] = dp.sets.len() as i64;
            self.stats.chains[f] = chains_of(dp);
        }
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

/// Policy, profile and endpoint chains of one family, both directions.
fn chains_of(dp: &PolicyDataplane) -> i64 {
    2 * (dp.policies.len() + dp.profiles.len() + dp.endpoints.len()) as i64
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
