//! `calicoctl node status`: Calico's table (REFERENCE §7, as BIRD's `show protocols`
//! appears through calicoctl) rendered from the data the daemon's BGP status socket
//! serves (`crate::bgp::status::PeerReport`).

use crate::bgp::fsm::State;
use crate::bgp::status::PeerReport;

use super::output::boxed_table;

/// HH:MM:SS in local time, as BIRD prints a protocol's "since".
fn clock(unix: u64) -> String {
    let t = unix as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which is plain data.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        let s = unix % 86_400;
        return format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Calico's `calicoctl node status` text.
pub fn render_node_status(peers: &[PeerReport]) -> String {
    render_with_clock(peers, clock)
}

fn render_with_clock(peers: &[PeerReport], clock: fn(u64) -> String) -> String {
    let mut out = String::from("Calico process is running.\n");
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let rows: Vec<Vec<String>> = peers
            .iter()
            .filter(|p| p.address.contains(':') == v6)
            .map(|p| {
                let up = p.state == State::Established.name();
                vec![
                    p.address.clone(),
                    p.peer_type.clone(),
                    if up { "up" } else { "start" }.to_string(),
                    clock(p.since_unix),
                    if up || p.reason.is_empty() {
                        p.state.clone()
                    } else {
                        format!("{} {}", p.state, p.reason)
                    },
                ]
            })
            .collect();
        out.push_str(&format!("\n{family} BGP status\n"));
        if rows.is_empty() {
            out.push_str(&format!("No {family} peers found.\n"));
        } else {
            out.push_str(&boxed_table(
                &["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"],
                &rows,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(addr: &str, ty: &str, state: &str, reason: &str) -> PeerReport {
        PeerReport {
            address: addr.into(),
            peer_type: ty.into(),
            state: state.into(),
            since_unix: 84_604, // 23:30:04 UTC
            reason: reason.into(),
            received: 0,
            accepted: 0,
            advertised: 0,
        }
    }

    #[test]
    fn node_status_is_calicos_table() {
        let utc = |t: u64| format!("{:02}:{:02}:{:02}", t % 86_400 / 3600, t / 60 % 60, t % 60);
        let out = render_with_clock(
            &[report(
                "172.17.8.102",
                "node-to-node mesh",
                "Established",
                "",
            )],
            utc,
        );
        assert_eq!(
            out,
            "Calico process is running.\n\nIPv4 BGP status\n\
+--------------+-------------------+-------+----------+-------------+\n\
| PEER ADDRESS |     PEER TYPE     | STATE |  SINCE   |    INFO     |\n\
+--------------+-------------------+-------+----------+-------------+\n\
| 172.17.8.102 | node-to-node mesh | up    | 23:30:04 | Established |\n\
+--------------+-------------------+-------+----------+-------------+\n\
\nIPv6 BGP status\nNo IPv6 peers found.\n"
        );
    }

    #[test]
    fn a_peer_that_is_down_says_why() {
        let out = render_node_status(&[report(
            "10.0.0.9",
            "global",
            "Active",
            "connect failed: Connection refused (os error 111)",
        )]);
        assert!(out.contains("| start | "), "{out}");
        assert!(
            out.contains("Active connect failed: Connection refused"),
            "{out}"
        );
        assert!(render_node_status(&[]).contains("No IPv4 peers found.\n"));
    }
}
