//! Route lookups through an `rtnetlink` handle (the CNI plugin's, in the namespace it
//! works in), as the adapter's [`RawRoute`]s: one route type for every caller.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{NetlinkError, RawRoute};

/// The routes of every table whose destination is exactly `dst`.
pub async fn to(h: &Handle, dst: IpNet) -> Result<Vec<RawRoute>, NetlinkError> {
    let query = match dst {
        IpNet::V4(_) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        IpNet::V6(_) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    };
    let all: Vec<RouteMessage> = h
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::from_rtnetlink("list routes", e))?;
    Ok(all
        .iter()
        .filter_map(raw)
        .filter(|r| r.dst == dst)
        .collect())
}

/// A parsed route message as a [`RawRoute`] (None without a valid destination).
pub fn raw(m: &RouteMessage) -> Option<RawRoute> {
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    };
    let mut r = RawRoute {
        dst: IpNet::V4(ipnet::Ipv4Net::default()),
        table: u32::from(m.header.table),
        kind: u8::from(m.header.kind),
        protocol: u8::from(m.header.protocol),
        scope: u8::from(m.header.scope),
        flags: m.header.flags.bits(),
        oif: None,
        gateway: None,
        priority: 0,
    };
    let mut dst = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(a) => dst = ip(a),
            RouteAttribute::Gateway(a) => r.gateway = ip(a),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.priority = *p,
            RouteAttribute::Table(t) => r.table = *t,
            _ => {}
        }
    }
    let dst = dst.unwrap_or(
        if m.header.address_family == netlink_packet_route::AddressFamily::Inet6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        },
    );
    r.dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parsed_route_reads_as_the_dumps_raw_route() {
        use rtnetlink::packet_core::Parseable;
        for (dst, gw, oif, metric) in [
            ("10.244.0.5/32", None, Some(9), 0),
            ("10.244.1.0/26", Some("10.0.0.2"), Some(2), 20),
            ("fd00:244::/122", None, None, 1024),
        ] {
            let dst: IpNet = dst.parse().unwrap();
            let gw = gw.map(|g: &str| g.parse().unwrap());
            let bytes = crate::netlink::decode::tests::route_message(dst, 80, gw, oif, metric);
            let payload = &bytes[16..];
            let parsed = RouteMessage::parse(payload).unwrap();
            assert_eq!(raw(&parsed), crate::netlink::decode::route(payload));
            assert_eq!(raw(&parsed).unwrap().dst, dst);
        }
    }
}
