//! calico-node's command line, as Calico's `node/cmd/calico-node/main.go` reads it: Go's
//! `flag` package, so `-felix-ready` and `--felix-ready` are the same flag, a boolean may
//! be written `-flag=false`, and `-threshold-time` takes a Go duration (`30s`, `1m30s`).
//! Calico's manifests run `calico-node -felix-live -bird-live` (liveness probe),
//! `calico-node -felix-ready -bird-ready` (readiness probe) and `calico-node -shutdown`
//! (preStop hook); those and the other flags of Calico's image parse here.

use std::time::Duration;

/// The health checks asked for (Calico: `health.Run`). Any of them selects the probe mode,
/// whatever else is given, as in Calico.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChecks {
    pub felix_ready: bool,
    pub felix_live: bool,
    pub bird_ready: bool,
    pub bird6_ready: bool,
    pub bird_live: bool,
    pub bird6_live: bool,
    /// `-threshold-time` (default 30 s): for this long after start-up (the nodename file's
    /// age) BGP is ready only when every peer is Established; afterwards one is enough.
    pub threshold: Duration,
}

impl HealthChecks {
    fn any(&self) -> bool {
        self.felix_ready
            || self.felix_live
            || self.bird_ready
            || self.bird6_ready
            || self.bird_live
            || self.bird6_live
    }
}

/// What the invocation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// No flag: run the node (Calico's image runs each part under runit instead).
    Daemon,
    /// `-v`.
    Version,
    /// `-h`, `-help`.
    Help,
    /// `-startup` (with or without `-complete-startup`): register the node and exit.
    Startup,
    /// `-shutdown`: the preStop hook.
    Shutdown,
    /// `-felix-ready`, `-bird-ready`, ... : probe the running node.
    Health(HealthChecks),
    /// `-allocate-tunnel-addrs` (`-allocate-tunnel-addrs-run-once`): settle this node's
    /// tunnel addresses now.
    AllocateTunnelAddrs,
    /// `-monitor-addresses`: follow the node's address and keep its Node current.
    MonitorAddresses,
    /// A flag whose job has no counterpart with the etcd datastore (`-monitor-token`,
    /// `-complete-startup` alone): what it would do, said on exit.
    NothingToDo(&'static str),
}

/// A command line Calico's calico-node would refuse too; the message is Go's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An unknown flag (Go: "flag provided but not defined: -x").
    #[error("flag provided but not defined: -{0}")]
    Unknown(String),
    /// A flag's value does not parse.
    #[error("invalid value \"{value}\" for flag -{flag}: {reason}")]
    BadValue {
        flag: String,
        value: String,
        reason: String,
    },
    /// A flag that needs a value has none.
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    /// Two modes at once (Calico's message).
    #[error("More than one incompatible argument provided")]
    Incompatible,
    /// A word that is no flag (Calico would print its usage).
    #[error("unexpected argument '{0}': calico-node takes only flags")]
    Positional(String),
}

/// The flags, with Calico's help texts.
pub const USAGE: &str = "Usage of calico-node:
  -v                       Display version
  -startup                 Do non-privileged start-up routine.
  -complete-startup        Update the NetworkUnavailable condition (nothing to do with etcd)
  -shutdown                Do shutdown routine.
  -felix-live              Run felix liveness checks
  -felix-ready             Run felix readiness checks
  -bird-live               Run bird liveness checks (the BGP speaker)
  -bird-ready              Run BIRD readiness checks (the BGP speaker's IPv4 peers)
  -bird6-live              Run bird6 liveness checks
  -bird6-ready             Run BIRD6 readiness checks (IPv6 peers)
  -threshold-time duration Threshold time for bird readiness (default 30s)
  -allocate-tunnel-addrs   Configure tunnel addresses for this node
  -allocate-tunnel-addrs-run-once  Run allocate-tunnel-addrs in oneshot mode
  -monitor-addresses       Monitor change in node IP addresses
  -monitor-token           Watch for Kubernetes token changes (nothing to do with etcd)
Without flags, calico-node runs the node.
";

#[derive(Default)]
struct Flags {
    version: bool,
    help: bool,
    startup: bool,
    complete_startup: bool,
    shutdown: bool,
    allocate: bool,
    allocate_once: bool,
    monitor_addresses: bool,
    monitor_token: bool,
}

/// Go's `strconv.ParseBool`.
fn parse_bool(flag: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(CliError::BadValue {
            flag: flag.into(),
            value: v.into(),
            reason: "parse error".into(),
        }),
    }
}

/// Go's `time.ParseDuration` for the units a person writes (`h`, `m`, `s`, `ms`, `us`,
/// `µs`, `ns`, fractions allowed, e.g. `1m30s`, `1.5h`); never overflows.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration \"{s}\"");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration \"{s}\""))?;
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(format!("unknown unit \"{unit}\" in duration \"{s}\"")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut part = int.checked_mul(nanos_per).ok_or_else(bad)?;
        let mut scale = nanos_per;
        for d in frac.chars().take(18) {
            scale /= 10;
            part = part
                .checked_add(u128::from(d.to_digit(10).ok_or_else(bad)?) * scale)
                .ok_or_else(bad)?;
        }
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = next;
    }
    // Go's durations are int64 nanoseconds.
    if total > i64::MAX as u128 {
        return Err(format!("invalid duration \"{s}\": out of range"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let mut f = Flags::default();
    let mut h = HealthChecks {
        felix_ready: false,
        felix_live: false,
        bird_ready: false,
        bird6_ready: false,
        bird_live: false,
        bird6_live: false,
        threshold: Duration::from_secs(30),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            break;
        }
        let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(CliError::Positional(arg.clone()));
        };
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(CliError::BadValue {
                flag: body.into(),
                value: arg.clone(),
                reason: "bad flag syntax".into(),
            });
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        if name == "threshold-time" {
            let v = match value {
                Some(v) => v.to_string(),
                None => {
                    let v = args
                        .get(i)
                        .ok_or_else(|| CliError::MissingValue(name.into()))?;
                    i += 1;
                    v.clone()
                }
            };
            h.threshold = parse_go_duration(&v).map_err(|reason| CliError::BadValue {
                flag: name.into(),
                value: v.clone(),
                reason,
            })?;
            continue;
        }
        let on = match value {
            Some(v) => parse_bool(name, v)?,
            None => true,
        };
        let slot = match name {
            "v" | "version" => &mut f.version,
            "h" | "help" => &mut f.help,
            "startup" => &mut f.startup,
            "complete-startup" => &mut f.complete_startup,
            "shutdown" => &mut f.shutdown,
            "felix-ready" => &mut h.felix_ready,
            "felix-live" => &mut h.felix_live,
            "bird-ready" => &mut h.bird_ready,
            "bird6-ready" => &mut h.bird6_ready,
            "bird-live" => &mut h.bird_live,
            "bird6-live" => &mut h.bird6_live,
            "allocate-tunnel-addrs" => &mut f.allocate,
            "allocate-tunnel-addrs-run-once" => &mut f.allocate_once,
            "monitor-addresses" => &mut f.monitor_addresses,
            "monitor-token" => &mut f.monitor_token,
            other => return Err(CliError::Unknown(other.into())),
        };
        *slot = on;
    }
    if let Some(extra) = args.get(i) {
        return Err(CliError::Positional(extra.clone()));
    }
    command(f, h)
}

/// Calico's precedence: health checks first, then one mode at most.
fn command(f: Flags, h: HealthChecks) -> Result<Command, CliError> {
    if f.help {
        return Ok(Command::Help);
    }
    if h.any() {
        return Ok(Command::Health(h));
    }
    let modes = [
        f.version,
        f.startup,
        f.shutdown,
        f.allocate || f.allocate_once,
        f.monitor_addresses,
        f.monitor_token,
    ];
    if modes.iter().filter(|m| **m).count() > 1 {
        return Err(CliError::Incompatible);
    }
    Ok(if f.version {
        Command::Version
    } else if f.startup {
        Command::Startup
    } else if f.shutdown {
        Command::Shutdown
    } else if f.allocate || f.allocate_once {
        Command::AllocateTunnelAddrs
    } else if f.monitor_addresses {
        Command::MonitorAddresses
    } else if f.monitor_token {
        Command::NothingToDo(
            "-monitor-token: the etcdv3 datastore has no Kubernetes service-account token for the CNI plugin to refresh",
        )
    } else if f.complete_startup {
        Command::NothingToDo(
            "-complete-startup: the etcdv3 datastore has no Kubernetes NetworkUnavailable condition to clear",
        )
    } else {
        Command::Daemon
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, CliError> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn health(c: Result<Command, CliError>) -> HealthChecks {
        match c {
            Ok(Command::Health(h)) => h,
            other => panic!("not a health check: {other:?}"),
        }
    }

    #[test]
    fn calicos_manifest_probes_and_prestop_parse() {
        let live = health(p(&["-felix-live", "-bird-live"]));
        assert!(live.felix_live && live.bird_live);
        assert!(!live.felix_ready && !live.bird_ready);
        let ready = health(p(&["-felix-ready", "-bird-ready"]));
        assert!(ready.felix_ready && ready.bird_ready);
        assert_eq!(ready.threshold, Duration::from_secs(30));
        assert_eq!(p(&["-shutdown"]), Ok(Command::Shutdown));
        let six = health(p(&["-bird6-ready", "-bird6-live"]));
        assert!(six.bird6_ready && six.bird6_live);
    }

    #[test]
    fn go_flag_spellings() {
        assert_eq!(p(&["--startup"]), Ok(Command::Startup));
        assert_eq!(p(&["-startup=true"]), Ok(Command::Startup));
        assert_eq!(p(&["-startup=false"]), Ok(Command::Daemon));
        assert_eq!(p(&[]), Ok(Command::Daemon));
        assert_eq!(p(&["-v"]), Ok(Command::Version));
        let h = health(p(&["--felix-ready", "-threshold-time", "1m30s"]));
        assert_eq!(h.threshold, Duration::from_secs(90));
        let h = health(p(&["-bird-ready", "-threshold-time=500ms"]));
        assert_eq!(h.threshold, Duration::from_millis(500));
        assert_eq!(
            p(&["-allocate-tunnel-addrs-run-once"]),
            Ok(Command::AllocateTunnelAddrs)
        );
        assert_eq!(p(&["-monitor-addresses"]), Ok(Command::MonitorAddresses));
        assert!(matches!(
            p(&["-monitor-token"]),
            Ok(Command::NothingToDo(_))
        ));
        assert_eq!(p(&["-startup", "-complete-startup"]), Ok(Command::Startup));
    }

    #[test]
    fn health_flags_win_over_modes_as_in_calico() {
        assert!(matches!(
            p(&["-startup", "-felix-live"]),
            Ok(Command::Health(_))
        ));
    }

    #[test]
    fn refusals_name_the_flag() {
        assert_eq!(
            p(&["-felix-lve"]).unwrap_err().to_string(),
            "flag provided but not defined: -felix-lve"
        );
        assert_eq!(p(&["-startup", "-shutdown"]), Err(CliError::Incompatible));
        assert_eq!(
            p(&["-threshold-time"]),
            Err(CliError::MissingValue("threshold-time".into()))
        );
        let e = p(&["-threshold-time=10000000000000000h"]).unwrap_err();
        assert!(e.to_string().contains("-threshold-time"), "{e}");
        assert!(matches!(
            p(&["-startup=maybe"]),
            Err(CliError::BadValue { .. })
        ));
        assert_eq!(
            p(&["felix-live"]),
            Err(CliError::Positional("felix-live".into()))
        );
        assert!(matches!(p(&["---x"]), Err(CliError::BadValue { .. })));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_go_duration("2m3s4ms"),
            Ok(Duration::new(123, 4_000_000))
        );
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("1d").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("99999999999999999999999999999999999999h").is_err());
        // The fraction cannot overflow either (u128::MAX / 1000 microseconds and a bit).
        assert!(parse_go_duration("340282366920938463463374607431768211.999us").is_err());
    }

    proptest::proptest! {
        /// Whatever a person or a manifest passes, parsing answers without panicking.
        #[test]
        fn any_arguments_parse_or_are_refused(args in proptest::collection::vec("-{0,2}[a-z6=.0-9µ-]{0,24}", 0..5)) {
            let _ = parse(&args);
        }

        #[test]
        fn any_duration_parses_or_is_refused(s in "\\PC{0,30}") {
            let _ = parse_go_duration(&s);
        }
    }
}
