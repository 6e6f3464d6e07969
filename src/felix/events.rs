//! The kernel's link and route notifications (read by the netlink adapter's
//! [`Notifications`], on a socket of their own: a burst of notifications must never stall
//! a request) as Felix reads them. Felix needs to know what was touched, not how: each
//! notification is reduced to the interface it concerns (REFERENCE §5: an interface event resyncs that interface). The kernel drops
//! the echoes of our own route additions before they reach us (a classic BPF filter), and
//! a lost burst (ENOBUFS) or a notification not understood counts as "anything may have
//! changed", so the full pass that follows repairs whatever was missed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use crate::model::felix::PROTO_FELIX;
use crate::netlink::decode::Notice;
use crate::netlink::notify::{Notifications, Received};

/// What the notifications read said was touched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Notifications were lost, or one was not understood: anything may have changed.
    pub unknown: bool,
    /// Links added, changed or removed: index and name (when the notification has one).
    pub links: BTreeMap<u32, Option<String>>,
    /// Interfaces (by index) whose routes were added, changed or removed by others.
    pub route_ifaces: BTreeSet<u32>,
    /// Routes through no interface (blackholes) or several (multipath) changed.
    pub routes: bool,
    /// An address of global scope was added or removed (link-local ones, which every
    /// new workload interface gets, are not counted).
    pub addrs: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        !self.unknown
            && !self.routes
            && !self.addrs
            && self.links.is_empty()
            && self.route_ifaces.is_empty()
    }

    pub fn merge(&mut self, other: Touched) {
        self.unknown |= other.unknown;
        self.routes |= other.routes;
        self.addrs |= other.addrs;
        for (i, name) in other.links {
            let slot = self.links.entry(i).or_default();
            if name.is_some() {
                *slot = name;
            }
        }
        self.route_ifaces.extend(other.route_ifaces);
    }
}

/// Kernel notifications of links and IPv4/IPv6 routes, reduced to what they touched.
pub struct Events {
    socket: Notifications,
}

impl Events {
    /// Subscribe (in the caller's network namespace); the echoes of our own route
    /// additions are dropped by the kernel.
    pub fn open() -> io::Result<Events> {
        Ok(Events {
            socket: Notifications::open(Some(PROTO_FELIX))?,
        })
    }

    /// Wait until something of interest happened (or notifications were lost): what.
    pub async fn next(&mut self) -> io::Result<Touched> {
        loop {
            let mut seen = Touched::default();
            self.socket.recv(|r| touch(r, &mut seen)).await?;
            if !seen.is_empty() {
                return Ok(seen);
            }
        }
    }
}

/// Add what one notification (or a loss) touched to `t`. The echoes of routes of ours
/// being added touch nothing (the filter drops those already; this also holds without it).
fn touch(r: Received, t: &mut Touched) {
    match r {
        Received::Lost | Received::Notice(Notice::NotUnderstood) => t.unknown = true,
        Received::Notice(Notice::Link { index, name }) => {
            t.links.insert(index, name);
        }
        Received::Notice(Notice::Addr { scope }) => {
            // RT_SCOPE_UNIVERSE (0) and site; not link (253) or host (254).
            t.addrs |= scope < 253;
        }
        Received::Notice(Notice::Route {
            added,
            protocol,
            oif,
        }) => {
            let ours_added = added && protocol == PROTO_FELIX;
            if !ours_added {
                match oif {
                    Some(i) => {
                        t.route_ifaces.insert(i);
                    }
                    None => t.routes = true,
                }
            }
        }
    }
}

/// Add what a datagram of notifications touched to `t`.
#[cfg(test)]
fn classify(b: &[u8], t: &mut Touched) {
    for n in crate::netlink::decode::notices(b) {
        touch(Received::Notice(n), t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, proto: u8) -> Vec<u8> {
        let mut m = vec![0u8; 28];
        m[0..4].copy_from_slice(&28u32.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[21] = proto;
        m
    }

    /// A message with one attribute after a body of `body` zero bytes.
    fn with_attr(kind: u16, body: usize, attr: u16, value: &[u8]) -> Vec<u8> {
        let alen = 4 + value.len();
        let len = 16 + body + ((alen + 3) & !3);
        let mut m = vec![0u8; len];
        m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        let a = 16 + body;
        m[a..a + 2].copy_from_slice(&(alen as u16).to_ne_bytes());
        m[a + 2..a + 4].copy_from_slice(&attr.to_ne_bytes());
        m[a + 4..a + alen].copy_from_slice(value);
        m
    }

    fn touched(b: &[u8]) -> Touched {
        let mut t = Touched::default();
        classify(b, &mut t);
        t
    }

    #[test]
    fn echoes_of_our_route_additions_touch_nothing() {
        let ours = msg(libc::RTM_NEWROUTE, PROTO_FELIX);
        assert!(touched(&ours).is_empty());
        assert!(touched(&[ours.clone(), ours.clone()].concat()).is_empty());
        // Without an interface: the table's interface-less routes.
        let t = touched(&[ours, msg(libc::RTM_DELROUTE, PROTO_FELIX)].concat());
        assert!(t.routes && !t.unknown && t.route_ifaces.is_empty(), "{t:?}");
        assert!(touched(&msg(libc::RTM_NEWROUTE, 3)).routes);
    }

    #[test]
    fn route_and_link_notifications_name_their_interface() {
        let del = with_attr(libc::RTM_DELROUTE, 12, libc::RTA_OIF, &7u32.to_ne_bytes());
        let t = touched(&del);
        assert_eq!(t.route_ifaces, BTreeSet::from([7]));
        assert!(!t.routes && !t.unknown && t.links.is_empty());

        let mut link = with_attr(libc::RTM_NEWLINK, 16, libc::IFLA_IFNAME, b"cali12345\0");
        link[20..24].copy_from_slice(&9i32.to_ne_bytes());
        let t = touched(&[del, link].concat());
        assert_eq!(
            t.links,
            BTreeMap::from([(9, Some("cali12345".to_string()))])
        );
        assert_eq!(t.route_ifaces, BTreeSet::from([7]));

        // Merged: a name learnt once stays.
        let mut all = t.clone();
        all.merge(Touched {
            links: BTreeMap::from([(9, None), (3, None)]),
            ..Default::default()
        });
        assert_eq!(all.links[&9].as_deref(), Some("cali12345"));
        assert_eq!(all.links[&3], None);
    }

    /// An address notification: global scope counts, link scope (a new workload
    /// interface's IPv6 link-local address) does not.
    #[test]
    fn global_addresses_count_and_link_local_ones_do_not() {
        let mut m = msg(libc::RTM_NEWADDR, 0);
        let t = touched(&m);
        assert!(t.addrs && !t.unknown, "{t:?}");
        m[19] = 253;
        assert!(touched(&m).is_empty());
    }

    #[test]
    fn what_is_not_understood_may_have_changed_anything() {
        assert!(touched(&msg(libc::RTM_NEWNEIGH, 0)).unknown);
        // A length beyond the datagram.
        let mut m = msg(libc::RTM_DELROUTE, 3);
        m[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(touched(&m).unknown);
        assert!(touched(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]).unknown);
    }
}
