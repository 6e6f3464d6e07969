//! The netlink adapter against the kernel, in a fresh network namespace: the kernel's
//! answers arrive as typed errnos (exists, not found, no such device) that callers decide
//! on, absent links are `None`, and the writer's dump reads back what it sent.

mod common;

use calico_node::netlink::{NetlinkError, Request, Writer, links, socket};
use common::NetNs;
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteType};

fn blackhole(prefix: &str) -> RouteMessage {
    let n: ipnet::Ipv4Net = prefix.parse().unwrap();
    let mut m = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .destination_prefix(n.addr(), n.prefix_len())
        .build();
    m.header.kind = RouteType::BlackHole;
    m.header.protocol = RouteProtocol::from(80);
    m
}

#[test]
fn the_kernels_answers_are_typed() {
    let Some(ns) = NetNs::new("nl-typed") else {
        return;
    };
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "eth0"]);
    let eth0 = ns.ifindex("eth0");
    let (missing, found, mtu, holder, listed) = ns.with_netlink(move |h| async move {
        (
            links::by_name(&h, "nosuchlink").await.unwrap(),
            links::by_index(&h, eth0)
                .await
                .unwrap()
                .map(|l| l.header.index),
            links::mtu_of(&h, eth0).await.unwrap(),
            links::interface_with(&h, "10.0.0.1".parse().unwrap())
                .await
                .unwrap(),
            links::list(&h).await.unwrap().get("eth0").copied(),
        )
    });
    assert!(missing.is_none(), "an absent link is None, not an error");
    assert_eq!(
        (found, holder, listed),
        (Some(eth0), Some(eth0), Some(eth0))
    );
    assert_eq!(mtu, 1500);

    // A link deleted twice: the second answer is "no such device".
    let gone: Result<(), NetlinkError> = ns.run_in(move || {
        let mut s = socket::open().unwrap();
        socket::delete_link(&mut s, eth0).unwrap();
        socket::delete_link(&mut s, eth0)
    });
    let e = gone.unwrap_err();
    assert!(e.is_no_device(), "{e}");
    assert_eq!(e.errno(), Some(libc::ENODEV));

    // The writer: a delete of a route that is not there is "not found" (ESRCH), at its
    // index; the dump afterwards sees what was added.
    let (outcomes, dumped) = ns.with_netlink(|_h| async move {
        let (w, _failures) = Writer::spawn().unwrap();
        let outcomes = w
            .send(vec![
                Request::Replace(blackhole("10.250.0.0/26")),
                Request::Delete(blackhole("10.250.9.0/26")),
            ])
            .await
            .unwrap();
        let dumped = w.dump(false, None).await.unwrap();
        (outcomes, dumped)
    });
    assert_eq!(outcomes, vec![Ok(()), Err(libc::ESRCH)]);
    let e = NetlinkError::kernel("delete 10.250.9.0/26", outcomes[1].unwrap_err());
    assert!(e.is_not_found() && !e.is_exists());
    let ours: Vec<_> = dumped.iter().filter(|r| r.protocol == 80).collect();
    assert_eq!(ours.len(), 1, "{dumped:?}");
    assert_eq!(ours[0].dst.to_string(), "10.250.0.0/26");
    assert_eq!(ours[0].kind, u8::from(RouteType::BlackHole));
}
