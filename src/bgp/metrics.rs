//! Per-peer Prometheus metrics of the BGP speaker (`calico_bgp_peer_*`), read from the
//! speaker's status at scrape time.

use std::time::SystemTime;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::watch;

use super::speaker::PeerStatus;

/// Per-peer Prometheus metrics, read from the speaker's status at scrape time.
pub struct BgpMetrics {
    status: watch::Receiver<Vec<PeerStatus>>,
    state: IntGaugeVec,
    uptime: IntGaugeVec,
    received: IntGaugeVec,
    accepted: IntGaugeVec,
    advertised: IntGaugeVec,
    updates_in: IntCounterVec,
    updates_out: IntCounterVec,
    notes_in: IntCounterVec,
    notes_out: IntCounterVec,
    too_large: IntCounterVec,
}

impl BgpMetrics {
    pub fn new(status: watch::Receiver<Vec<PeerStatus>>) -> BgpMetrics {
        let g = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["peer", "peer_type"]).expect("valid metric")
        };
        let c = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        BgpMetrics {
            status,
            state: g(
                "calico_bgp_peer_state",
                "BGP session state (1 Idle, 2 Connect, 3 Active, 4 OpenSent, 5 OpenConfirm, 6 Established)",
            ),
            uptime: g(
                "calico_bgp_peer_uptime_seconds",
                "Seconds since the session became Established (0 when down)",
            ),
            received: g(
                "calico_bgp_peer_prefixes_received",
                "Prefixes received from the peer",
            ),
            accepted: g(
                "calico_bgp_peer_prefixes_accepted",
                "Prefixes from the peer that are best paths",
            ),
            advertised: g(
                "calico_bgp_peer_prefixes_advertised",
                "Prefixes advertised to the peer",
            ),
            updates_in: c(
                "calico_bgp_peer_updates_received_total",
                "UPDATE messages received",
                &["peer"],
            ),
            updates_out: c(
                "calico_bgp_peer_updates_sent_total",
                "UPDATE messages sent",
                &["peer"],
            ),
            notes_in: c(
                "calico_bgp_peer_notifications_received_total",
                "NOTIFICATION messages received, by error code",
                &["peer", "code"],
            ),
            notes_out: c(
                "calico_bgp_peer_notifications_sent_total",
                "NOTIFICATION messages sent, by error code",
                &["peer", "code"],
            ),
            too_large: c(
                "calico_bgp_peer_routes_too_large_total",
                "Routes not exported to the peer because with our attributes they no longer fit in a 4096-byte BGP message",
                &["peer"],
            ),
        }
    }

    fn all(&self) -> [&dyn Collector; 10] {
        [
            &self.state,
            &self.uptime,
            &self.received,
            &self.accepted,
            &self.advertised,
            &self.updates_in,
            &self.updates_out,
            &self.notes_in,
            &self.notes_out,
            &self.too_large,
        ]
    }
}

impl Collector for BgpMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for g in [
            &self.state,
            &self.uptime,
            &self.received,
            &self.accepted,
            &self.advertised,
        ] {
            g.reset();
        }
        for c in [
            &self.updates_in,
            &self.updates_out,
            &self.notes_in,
            &self.notes_out,
            &self.too_large,
        ] {
            c.reset();
        }
        let now = SystemTime::now();
        for s in self.status.borrow().iter() {
            let peer = s.address.to_string();
            let labels = [peer.as_str(), s.peer_type.label()];
            self.state
                .with_label_values(&labels)
                .set(s.state as i64 + 1);
            let up = s
                .established_at
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_secs() as i64);
            self.uptime.with_label_values(&labels).set(up);
            self.received
                .with_label_values(&labels)
                .set(s.received as i64);
            self.accepted
                .with_label_values(&labels)
                .set(s.accepted as i64);
            self.advertised
                .with_label_values(&labels)
                .set(s.advertised as i64);
            self.updates_in
                .with_label_values(&[&peer])
                .inc_by(s.updates_in);
            self.updates_out
                .with_label_values(&[&peer])
                .inc_by(s.updates_out);
            self.too_large
                .with_label_values(&[&peer])
                .inc_by(s.routes_too_large);
            for (code, n) in &s.notifications_in {
                self.notes_in
                    .with_label_values(&[&peer, &code.to_string()])
                    .inc_by(*n);
            }
            for (code, n) in &s.notifications_out {
                self.notes_out
                    .with_label_values(&[&peer, &code.to_string()])
                    .inc_by(*n);
            }
        }
        self.all().into_iter().flat_map(|c| c.collect()).collect()
    }
}
