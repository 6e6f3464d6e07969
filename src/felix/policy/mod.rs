//! Network policy (REFERENCE §9): what Felix wants the policy dataplane to be, as pure
//! data. `calc` computes a [`PolicyDataplane`] from the policy resources and the local
//! workload endpoints (tiers, orders, Pass, profiles, selectors turned into IP sets, named
//! ports, network sets); `felix::nft` renders it into nftables and applies it. Nothing
//! here knows about nftables syntax: the types say what a rule matches and does, the
//! renderer says how.
//!
//! ```text
//!  policies, tiers, profiles,      [calc: pure]          [nft: render + one transaction]
//!  network sets, endpoints  --> PolicyDataplane -->  table ip/ip6 calico (chains, sets, maps)
//! ```

pub mod calc;
pub mod index;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// The whole policy dataplane of this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyDataplane {
    /// The local workload endpoints, by host-side interface name (`cali…`).
    pub endpoints: BTreeMap<String, Endpoint>,
    /// The policies that select at least one local endpoint, by Calico's policy chain id
    /// (`gnp/<name>`, `np/<namespace>/<name>`): rendered as `cali-pi-<id>` (inbound) and
    /// `cali-po-<id>` (outbound).
    pub policies: BTreeMap<String, Chains>,
    /// The profiles of local endpoints, by name: `cali-pri-<name>` and `cali-pro-<name>`.
    /// A profile an endpoint names that does not exist has no entry here (its chains
    /// would allow nothing: the endpoint falls through to the final drop).
    pub profiles: BTreeMap<String, Chains>,
    /// The IP sets the rules above refer to, by Calico's set id (`s:<hash>` for a
    /// selector, `n:<hash>` for a named port): rendered `cali40<id>` / `cali60<id>` with
    /// `:` made `-`, one per family, each holding that family's members.
    pub sets: BTreeMap<String, IpSet>,
    /// FelixConfiguration `defaultEndpointToHostAction` for traffic from a workload to its
    /// host.
    pub endpoint_to_host: EndpointToHost,
    /// Encapsulated packets workloads may not send (Felix's
    /// `allowVXLANPacketsFromWorkloads` / `allowIPIPPacketsFromWorkloads`, both false by
    /// default): dropped before any policy, whatever the destination.
    pub encap_drops: EncapDrops,
    /// This node's host endpoints and the failsafe ports (REFERENCE §10).
    pub host: HostLayer,
    /// FelixConfiguration `logPrefix` as given (specifiers unexpanded; empty: Felix's
    /// default `calico-packet`).
    pub log_prefix: String,
}

/// Where a policy is enforced (Calico's split of a host endpoint's tiers): the filter
/// layer (`Normal`, for workloads and host endpoints), before kube-proxy's DNAT
/// (`PreDnat`, host endpoints' ingress only) or before conntrack (`Untracked`, host
/// endpoints only). The policy's chain id says which: `prednat/…` and `untracked/…`
/// (see [`stage_of`]), so a policy that moves between stages is a new chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Normal,
    PreDnat,
    Untracked,
}

/// The id prefix of pre-DNAT policies.
pub const PRE_DNAT_PREFIX: &str = "prednat/";
/// The id prefix of untracked (`doNotTrack`) policies.
pub const UNTRACKED_PREFIX: &str = "untracked/";

/// The stage of a policy, from its chain id.
pub fn stage_of(id: &str) -> Stage {
    if id.starts_with(PRE_DNAT_PREFIX) {
        Stage::PreDnat
    } else if id.starts_with(UNTRACKED_PREFIX) {
        Stage::Untracked
    } else {
        Stage::Normal
    }
}

/// The interface key of the all-interfaces host endpoint (`interfaceName: "*"`), as
/// Calico names its chains (`cali-fh-any-interface-at-all`).
pub const ALL_INTERFACES_KEY: &str = "any-interface-at-all";

/// This node's host endpoints as the dataplane enforces them, and Felix's failsafe ports.
/// No endpoint: nothing of this layer is programmed (host traffic is not policed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostLayer {
    /// The active host endpoint of each interface, by interface name
    /// ([`ALL_INTERFACES_KEY`] for the all-interfaces one): where several name the same
    /// interface, the one whose name sorts first (Calico).
    pub endpoints: BTreeMap<String, HostEndpoint>,
    /// `failsafeInboundHostPorts` / `failsafeOutboundHostPorts`.
    pub failsafe_in: Vec<Failsafe>,
    pub failsafe_out: Vec<Failsafe>,
    /// `vxlanPort`: VXLAN between nodes passes host endpoints.
    pub vxlan_port: u16,
}

/// One failsafe port: traffic to it (and, before conntrack, its replies) is always
/// allowed through host endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failsafe {
    /// IP protocol number (6, 17 or 132).
    pub protocol: u8,
    pub port: u16,
    /// Only from (inbound) or to (outbound) this network.
    pub net: Option<IpNet>,
}

/// One host endpoint's policy, split as Calico's calculation splits it
/// (`tierInfoToProtoTierInfo`): normal policies for traffic to and from the host,
/// `applyOnForward` ones also for forwarded traffic, pre-DNAT ones (ingress only) and
/// untracked ones; the tiers of the last two end in Pass (the filter layer decides what
/// they leave). Profiles apply to the normal layer only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostEndpoint {
    /// The HostEndpoint's name.
    pub name: String,
    /// Traffic from the interface to the host (`cali-fh-`) and from the host out of it
    /// (`cali-th-`).
    pub ingress: Vec<TierPolicies>,
    pub egress: Vec<TierPolicies>,
    /// Forwarded traffic in through (`cali-fhfw-`) and out through (`cali-thfw-`) it.
    pub forward_ingress: Vec<TierPolicies>,
    pub forward_egress: Vec<TierPolicies>,
    /// Before kube-proxy's DNAT, in through it.
    pub pre_dnat: Vec<TierPolicies>,
    /// Before conntrack, in and out.
    pub untracked_ingress: Vec<TierPolicies>,
    pub untracked_egress: Vec<TierPolicies>,
    pub profiles: Vec<String>,
}

impl HostEndpoint {
    /// Every policy id it uses (with repeats).
    pub fn policies(&self) -> impl Iterator<Item = &String> {
        [
            &self.ingress,
            &self.egress,
            &self.forward_ingress,
            &self.forward_egress,
            &self.pre_dnat,
            &self.untracked_ingress,
            &self.untracked_egress,
        ]
        .into_iter()
        .flatten()
        .flat_map(|t| t.policies.iter())
    }
}

/// What [`PolicyDataplane::encap_drops`] drops from workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapDrops {
    /// UDP to this port (`vxlanPort`, default 4789); `None` when VXLAN is allowed.
    pub vxlan_port: Option<u16>,
    /// IP protocol 4 (IP in IP).
    pub ipip: bool,
}

impl Default for EncapDrops {
    /// Felix's defaults: both dropped, VXLAN on port 4789.
    fn default() -> EncapDrops {
        EncapDrops {
            vxlan_port: Some(4789),
            ipip: true,
        }
    }
}

/// One local workload endpoint's policy: the tiers that apply to it per direction (in
/// order, only tiers with at least one policy of that direction selecting it), then its
/// profiles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Endpoint {
    /// The WorkloadEndpoint's name (for comments and logs).
    pub name: String,
    /// Traffic to the workload (`cali-tw-<iface>`): tiers with ingress policies.
    pub ingress: Vec<TierPolicies>,
    /// Traffic from the workload (`cali-fw-<iface>`): tiers with egress policies.
    pub egress: Vec<TierPolicies>,
    /// The endpoint's profiles in order (their ingress rules for `cali-tw-`, egress rules
    /// for `cali-fw-`); only reached when no tier applied or every tier passed.
    pub profiles: Vec<String>,
}

/// The policies of one tier that apply to an endpoint in one direction, in evaluation
/// order (order, then name), and what happens when none of them decided.
#[derive(Debug, Clone, PartialEq)]
pub struct TierPolicies {
    pub tier: String,
    /// Policy chain ids (keys of [`PolicyDataplane::policies`]).
    pub policies: Vec<String>,
    /// The tier's `defaultAction`: Deny drops at the end of the tier, Pass goes on to
    /// the next tier (or the profiles after the last).
    pub end: TierEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierEnd {
    Deny,
    Pass,
}

/// The rules of a policy or profile: `inbound` are its ingress rules (traffic to the
/// endpoint), `outbound` its egress rules. A direction the policy's `types` do not
/// include is empty and the policy is not listed for that direction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chains {
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
}

/// A rule's action. Allow accepts (later tiers and profiles are skipped), Deny drops, Log
/// logs (prefix `calico-packet`) and goes on with the next rule, Pass ends this tier's
/// evaluation and goes on with the next tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
    Pass,
}

/// One rule, resolved: every selector replaced by IP sets, named ports by named-port
/// sets, protocols by number. Every field that is set must match (AND); an empty list
/// matches anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub action: Action,
    /// 4 or 6: the rule is only rendered in that family.
    pub ip_version: Option<u8>,
    /// IP protocol number (`TCP` 6, `UDP` 17, `ICMP` 1, `ICMPv6` 58, `SCTP` 132, `UDPLite`
    /// 136).
    pub protocol: Option<u8>,
    pub not_protocol: Option<u8>,
    pub icmp: Option<Icmp>,
    pub not_icmp: Option<Icmp>,
    pub src: Match,
    pub dst: Match,
}

/// ICMP type and code; `v6` for ICMPv6 (the rule is then only rendered for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icmp {
    pub v6: bool,
    pub icmp_type: u8,
    pub code: Option<u8>,
}

/// The source or destination side of a rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Match {
    /// The address is in one of these (empty: any). A family with none of them: the rule
    /// is not rendered in that family when `nets` is not empty.
    pub nets: Vec<IpNet>,
    /// The address is in none of these.
    pub not_nets: Vec<IpNet>,
    /// The address is in every one of these selector sets ([`IpSet::Nets`]).
    pub sets: Vec<String>,
    /// The address is in none of these selector sets.
    pub not_sets: Vec<String>,
    /// The port is in one of these ranges, or the (address, protocol, port) is in one of
    /// `named_port_sets` ([`IpSet::Ports`]); both empty: any port.
    pub ports: Vec<PortRange>,
    pub named_port_sets: Vec<String>,
    /// The port is in none of these ranges and the (address, protocol, port) in none of
    /// `not_named_port_sets`.
    pub not_ports: Vec<PortRange>,
    pub not_named_port_sets: Vec<String>,
}

/// An inclusive port range (a single port has `lo == hi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// The members of an IP set, both families together (the renderer splits them).
#[derive(Debug, Clone, PartialEq)]
pub enum IpSet {
    /// Addresses and networks: the endpoints a selector matches (their `ipNetworks`) and
    /// the `nets` of the network sets it matches.
    Nets(BTreeSet<IpNet>),
    /// (address, IP protocol, port) of the endpoints a selector matches that have the
    /// named port.
    Ports(BTreeSet<(IpAddr, u8, u16)>),
}

/// `defaultEndpointToHostAction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EndpointToHost {
    /// Felix's default.
    #[default]
    Drop,
    /// Leave the packet to the host's other rules (calico-node in etcd mode writes this).
    Return,
    Accept,
}

/// What changed in the [`PolicyDataplane`] since the one last applied: what the executor
/// writes, so that a label change on one endpoint writes set elements, not the ruleset.
/// Names are looked up in the new dataplane; a name absent there was removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Rewrite everything (the first apply, a full pass, or after a failed apply): the
    /// executor replaces its tables in one transaction.
    pub full: bool,
    /// Endpoints whose chains or dispatch entries were added, changed or removed.
    pub endpoints: BTreeSet<String>,
    /// Policy chain ids whose chains were added, changed or removed.
    pub policies: BTreeSet<String>,
    /// Profiles whose chains were added, changed or removed.
    pub profiles: BTreeSet<String>,
    /// Sets created (with all their members) or removed.
    pub sets: BTreeSet<String>,
    /// Members added to and removed from sets that existed before and still do.
    pub added: BTreeMap<String, IpSet>,
    pub removed: BTreeMap<String, IpSet>,
    /// `endpoint_to_host` changed.
    pub endpoint_to_host: bool,
    /// `encap_drops` changed.
    pub encap_drops: bool,
    /// `host` changed: the host layer is rewritten whole (it is small).
    pub host: bool,
    /// `log_prefix` changed: every chain with a Log rule is rewritten.
    pub log_prefix: bool,
}

impl Delta {
    /// A delta that rewrites everything.
    pub fn full() -> Delta {
        Delta {
            full: true,
            ..Default::default()
        }
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        *self == Delta::default()
    }
}
