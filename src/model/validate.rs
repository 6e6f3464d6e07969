//! Field-level validation helpers shared by every kind, and the error they produce.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

/// A resource field that failed validation: names the field (JSON path), its value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error with field {field} = '{value}' ({reason})")]
pub struct ValidationError {
    /// JSON path of the field, e.g. `spec.cidr`.
    pub field: String,
    /// The offending value as the user wrote it.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &str, value: impl ToString, reason: impl Into<String>) -> Self {
        ValidationError {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result of a validation step.
pub type Validated = Result<(), ValidationError>;

/// Parse a CIDR; `strict` refuses host bits (IPPool cidr).
pub fn cidr(field: &str, value: &str, strict: bool) -> Result<IpNet, ValidationError> {
    let net = IpNet::from_str(value)
        .map_err(|_| ValidationError::new(field, value, "not a valid CIDR"))?;
    if strict && net.trunc() != net {
        return Err(ValidationError::new(
            field,
            value,
            format!("CIDR is not strictly masked; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

/// Parse an IP address.
pub fn ip(field: &str, value: &str) -> Result<IpAddr, ValidationError> {
    IpAddr::from_str(value)
        .map_err(|_| ValidationError::new(field, value, "not a valid IP address"))
}

/// Parse an address in CIDR form (`10.0.0.2/16`): host bits are expected here.
pub fn ip_with_prefix(field: &str, value: &str, v4: bool) -> Result<IpNet, ValidationError> {
    let net = IpNet::from_str(value).map_err(|_| {
        ValidationError::new(
            field,
            value,
            "not an address in CIDR form (e.g. 10.0.0.2/24)",
        )
    })?;
    if v4 != matches!(net, IpNet::V4(_)) {
        let want = if v4 { "IPv4" } else { "IPv6" };
        return Err(ValidationError::new(
            field,
            value,
            format!("not an {want} address"),
        ));
    }
    Ok(net)
}

/// Check that a value is one of the allowed words.
pub fn one_of(field: &str, value: &str, allowed: &[&str]) -> Validated {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            value,
            format!("must be one of: {}", allowed.join(", ")),
        ))
    }
}

/// Check a label selector (Calico's selector language).
pub fn selector(field: &str, value: &str) -> Validated {
    super::selector::Selector::parse(value)
        .map(|_| ())
        .map_err(|e| {
            let reason = format!("invalid selector at position {}: {}", e.position, e.message);
            ValidationError::new(field, value, reason)
        })
}

/// Check a Go-style duration (`90s`, `1m30s`, `500ms`).
pub fn duration(field: &str, value: &str) -> Result<Duration, ValidationError> {
    parse_go_duration_checked(value).map_err(|reason| ValidationError::new(field, value, reason))
}

/// Parse a Go `time.Duration` string: a sequence of decimal numbers with units
/// `ns`, `us`, `ms`, `s`, `m`, `h`; `0` alone is allowed.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    parse_go_duration_checked(s).ok()
}

/// Longest duration Go accepts: `time.Duration` is an int64 of nanoseconds (~292 years);
/// Go's `ParseDuration` refuses anything longer ("invalid duration"), and so do we, rather
/// than overflow (a value such as `10000000000000000h` comes from outside: etcd, a user).
const MAX_GO_DURATION_NS: f64 = i64::MAX as f64;

/// [`parse_go_duration`] with the reason a value is refused.
pub fn parse_go_duration_checked(s: &str) -> Result<Duration, &'static str> {
    const INVALID: &str = "not a valid duration (e.g. 90s, 1m30s, 500ms)";
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(INVALID);
    }
    let mut total_ns = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(INVALID);
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| INVALID)?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(INVALID),
        };
        rest = &rest[unit_len..];
        total_ns += n * scale;
        if !total_ns.is_finite() || total_ns > MAX_GO_DURATION_NS {
            return Err("duration out of range (longer than Go's limit of about 292 years)");
        }
    }
    Duration::try_from_secs_f64(total_ns / 1e9).map_err(|_| INVALID)
}

/// Format a duration the way Go prints simple durations (`90s`, `1m0s` is printed `60s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Check a port number 1..=65535.
pub fn port(field: &str, value: u32) -> Validated {
    if (1..=65535).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            value,
            "port must be between 1 and 65535",
        ))
    }
}

/// Check a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn mac(field: &str, value: &str) -> Validated {
    let parts: Vec<&str> = value.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    require(
        ok,
        field,
        value,
        "not a valid MAC address (e.g. ee:ee:ee:ee:ee:ee)",
    )
}

/// `Ok` when `ok`, else the error naming `field`, `value` and `reason`.
pub fn require(ok: bool, field: &str, value: &str, reason: &str) -> Validated {
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(field, value, reason))
    }
}

/// Check a resource name: a DNS-1123 subdomain (lower-case alphanumerics, `-` and `.`,
/// starting and ending alphanumeric, at most 253 characters), as Calico requires.
pub fn name(field: &str, value: &str) -> Validated {
    if value.is_empty() {
        return Err(ValidationError::new(field, value, "a name is required"));
    }
    if value.len() > 253 {
        return Err(ValidationError::new(
            field,
            value,
            "must be at most 253 characters",
        ));
    }
    let valid_chars = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !valid_chars || !alnum(value.chars().next()) || !alnum(value.chars().last()) {
        return Err(ValidationError::new(
            field,
            value,
            "must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    }
    Ok(())
}

/// Check a log severity as Calico spells it.
pub fn log_severity(field: &str, value: &str) -> Validated {
    one_of(
        field,
        value,
        &["Trace", "Debug", "Info", "Warning", "Error", "Fatal"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_go() {
        assert_eq!(parse_go_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("90"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn overflowing_durations_are_refused_not_a_panic() {
        assert_eq!(
            duration("spec.maxRestartTime", "10000000000000000h")
                .unwrap_err()
                .to_string(),
            "error with field spec.maxRestartTime = '10000000000000000h' (duration out of range (longer than Go's limit of about 292 years))"
        );
        assert_eq!(parse_go_duration(&format!("{}s", "9".repeat(400))), None);
        assert_eq!(
            parse_go_duration("2562047h"),
            Some(Duration::from_secs(2_562_047 * 3600))
        );
        assert_eq!(parse_go_duration("2562048h"), None);
    }

    #[test]
    fn cidr_with_host_bits_is_refused_with_a_suggestion() {
        let e = cidr("spec.cidr", "10.0.0.1/24", true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "error with field spec.cidr = '10.0.0.1/24' (CIDR is not strictly masked; did you mean 10.0.0.0/24?)"
        );
        assert!(cidr("spec.cidr", "10.0.0.1/24", false).is_ok());
    }

    #[test]
    fn names_follow_dns_subdomain_rules() {
        assert!(name("metadata.name", "node-1.example").is_ok());
        assert!(name("metadata.name", "Node1").is_err());
        assert!(name("metadata.name", "-a").is_err());
        assert!(name("metadata.name", "").is_err());
    }

    #[test]
    fn macs_need_six_hex_pairs() {
        assert!(mac("m", "ee:ee:ee:ee:ee:ee").is_ok());
        assert!(mac("m", "ee:ee:ee:ee:ee").is_err());
        assert!(mac("m", "gg:ee:ee:ee:ee:ee").is_err());
    }
}
