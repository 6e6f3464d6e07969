//! The pod's dataplane, exactly as Calico builds it (REFERENCE §4): a veth whose peer is
//! created directly in the pod's namespace (no move between namespaces), the host side
//! `cali…` with MAC ee:ee:ee:ee:ee:ee and proxy-ARP sysctls, the pod's /32 (or /128) with
//! `169.254.1.1 dev eth0 scope link` and `default via 169.254.1.1`, and the host route
//! `<ip>/32 dev cali… scope link proto boot`.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::netlink::NetlinkError;

/// The host side's MAC (Calico uses one fixed MAC on every host veth).
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The host veth's IPv6 link-local address (EUI-64 of ee:ee:ee:ee:ee:ee): the pod's IPv6
/// gateway.
pub const HOST_LINK_LOCAL: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The pod's gateway, answered by the host through proxy ARP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Dataplane failures, with the object and operation.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The pod's network namespace could not be opened or entered.
    #[error("network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
    /// A netlink request failed (the kernel's errno kept typed).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// An interface or address that must be there is not (one just created, the pod's).
    #[error("{op}: {reason}")]
    Missing { op: String, reason: &'static str },
    /// A sysctl could not be written.
    #[error("sysctl {path}: {reason}")]
    Sysctl { path: String, reason: String },
    /// The host-side name is taken by another container's interface (two container IDs
    /// with the same first 11 characters outside Kubernetes).
    #[error(
        "host interface {name} already exists and belongs to another container (its peer is not {ifname} in {netns}); container IDs sharing their first 11 characters cannot both be attached"
    )]
    HostNameTaken {
        name: String,
        ifname: String,
        netns: String,
    },
    /// The host already routes the pod's address to another interface.
    #[error("route to {ip} already exists via {other} (not {ours})")]
    RouteConflict {
        ip: IpNet,
        other: String,
        ours: String,
    },
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let op = op.into();
    move |e| NetlinkError::from_rtnetlink(op, e).into()
}

impl DataplaneError {
    /// The object is gone already (ENODEV, ENOENT, ESRCH): nothing left to delete.
    fn is_gone(&self) -> bool {
        matches!(self, DataplaneError::Netlink(e) if e.is_gone())
    }

    /// EEXIST: the object is there already.
    fn is_exists(&self) -> bool {
        matches!(self, DataplaneError::Netlink(e) if e.is_exists())
    }
}

/// A netlink handle for the calling thread's current namespace.
fn connect() -> Result<Handle, DataplaneError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetlinkError::io("open netlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Run `f` on a dedicated thread inside the namespace at `path` (setns changes only the
/// calling thread; a netlink socket stays in the namespace it was opened in).
async fn in_netns<T, F, Fut>(path: &str, f: F) -> Result<T, DataplaneError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, DataplaneError>>,
{
    on_thread(Some(path.to_string()), f).await
}

/// Run `f` with a netlink handle on a thread of its own, in the namespace at `netns` or in
/// the caller's. The kernel handles a netlink request inside the sending syscall (deleting
/// a veth blocks there for many milliseconds), so the caller's runtime keeps serving its
/// datastore requests meanwhile.
fn on_thread<T, F, Fut>(
    netns: Option<String>,
    f: F,
) -> impl std::future::Future<Output = Result<T, DataplaneError>>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, DataplaneError>>,
{
    // The thread starts now, not at the first poll: callers start the kernel work first
    // and then talk to the datastore.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> Result<T, DataplaneError> {
            if let Some(path) = &netns {
                enter_netns(path)?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| DataplaneError::Netns {
                    path: "(thread)".into(),
                    reason: e.to_string(),
                })?;
            rt.block_on(async move { f(connect()?).await })
        };
        let _ = tx.send(run());
    });
    async move {
        rx.await.map_err(|_| DataplaneError::Netns {
            path: "(thread)".into(),
            reason: "netlink worker stopped".into(),
        })?
    }
}

/// Move the calling thread into the network namespace at `path`.
fn enter_netns(path: &str) -> Result<(), DataplaneError> {
    let ns_err = |reason: String| DataplaneError::Netns {
        path: path.to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| ns_err(e.to_string()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| ns_err(e.to_string()))
}

/// The link named `name`, None when there is none (see [`crate::netlink::links::by_name`]).
async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, DataplaneError> {
    Ok(crate::netlink::links::by_name(h, name).await?)
}

fn write_sysctl(path: &str, value: &str) -> Result<(), DataplaneError> {
    std::fs::write(path, value).map_err(|e| DataplaneError::Sysctl {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Calico's host-side sysctls for a workload interface: every one of the shared list
/// ([`crate::model::sysctl::HOST_VETH_SYSCTLS`]) that applies, IPv6's when `v6`. Felix
/// keeps some of them afterwards (their [`crate::model::sysctl::Owner`]).
pub fn host_sysctls(ifname: &str, v6: bool) -> Result<(), DataplaneError> {
    for s in crate::model::sysctl::written_at_add(v6) {
        write_sysctl(&s.path(ifname), s.value)?;
    }
    Ok(())
}

/// What the pod's network should look like.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub host_ifname: String,
    pub container_ifname: String,
    pub netns: String,
    pub mtu: u32,
    /// Host prefixes (/32, /128).
    pub addrs: Vec<IpNet>,
    /// Whether the host-side name is derived from the pod (Kubernetes: SHA1 of
    /// namespace and pod), so that an existing link of that name is an earlier sandbox of
    /// the same pod, replaced as Calico does. Otherwise the name is a container-ID prefix
    /// that two containers may share, and an existing link is replaced only when it is
    /// this container's own (its peer is `container_ifname` in `netns`).
    pub name_from_pod: bool,
}

/// The veth pair, made in one request with the peer created inside the pod namespace,
/// with its MAC chosen by us (so the WorkloadEndpoint can be written while
/// the pair is being made). The host side stays down until its sysctls are written.
fn veth_message(spec: &PodSpec, netns_fd: i32, pod_mac: [u8; 6]) -> LinkMessage {
    let peer = LinkMessageBuilder::<LinkUnspec>::default()
        .name(spec.container_ifname.clone())
        .mtu(spec.mtu)
        .address(pod_mac.to_vec())
        .setns_by_fd(netns_fd)
        .build();
    LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(spec.host_ifname.clone())
        .mtu(spec.mtu)
        .address(HOST_MAC.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build()
}

/// A random locally administered unicast MAC (what the kernel would pick for a veth).
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id()) << 32;
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// `aa:bb:..` form of a MAC.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pair made by [`create_veth`]: its host index, whether the IPv6 sysctls were
/// written before the host side came up, and the pod side's worker.
#[derive(Debug)]
pub struct Veth {
    pub host_index: u32,
    pub v6_sysctls: bool,
    pod: PodSide,
}

/// A thread in the pod's namespace, started with the pair: once the pair exists it brings
/// the pod's interface up with the gateway routes (they need no address), then waits for
/// the addresses. Dropping it before sending them ends it.
#[derive(Debug)]
struct PodSide {
    addrs: tokio::sync::oneshot::Sender<Vec<IpNet>>,
    done: tokio::sync::oneshot::Receiver<Result<(), DataplaneError>>,
}

/// Which address families ADD expects before IPAM answers (with our own IPAM they are
/// known from the config; with another plugin, neither is assumed).
#[derive(Debug, Clone, Copy, Default)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

/// Step 1 of ADD, which needs no address: the veth pair (an old host interface of the same
/// name is deleted first, as Calico does on a repeated ADD), the host sysctls, host side
/// up; in the pod, the interface up with its IPv4 gateway routes when IPv4 is expected.
/// `expect.v6` says whether IPv6 addresses are expected (their sysctls must precede link
/// up). The work starts on threads of its own when this is called.
pub fn create_veth(
    spec: &PodSpec,
    pod_mac: [u8; 6],
    expect: Families,
) -> impl std::future::Future<Output = Result<Veth, DataplaneError>> + use<> {
    let spec = spec.clone();
    let (created_tx, created_rx) = tokio::sync::oneshot::channel::<()>();
    let (addrs_tx, addrs_rx) = tokio::sync::oneshot::channel::<Vec<IpNet>>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let ifname = spec.container_ifname.clone();
    let pod = on_thread(Some(spec.netns.clone()), move |h| async move {
        if created_rx.await.is_err() {
            // The pair was not made (that error is reported by the host side).
            return Ok(());
        }
        let index = pod_link_up(&h, &ifname, expect.v4).await?;
        let Ok(addrs) = addrs_rx.await else {
            return Ok(());
        };
        pod_addresses(&h, index, &ifname, &addrs, expect.v4).await
    });
    tokio::spawn(async move {
        let _ = done_tx.send(pod.await);
    });
    let host = on_thread(None, move |host| async move {
        replace_host_side(&host, &spec).await?;
        let ns_file = std::fs::File::open(&spec.netns).map_err(|e| DataplaneError::Netns {
            path: spec.netns.clone(),
            reason: e.to_string(),
        })?;
        host.link()
            .add(veth_message(&spec, ns_file.as_raw_fd(), pod_mac))
            .execute()
            .await
            .map_err(nl(format!(
                "create veth {} with peer {} in {}",
                spec.host_ifname, spec.container_ifname, spec.netns
            )))?;
        let _ = created_tx.send(());
        let result = async {
            let index = host_index(&host, &spec.host_ifname).await?;
            host_sysctls(&spec.host_ifname, expect.v6)?;
            set_up(&host, index, &spec.host_ifname).await?;
            Ok(index)
        }
        .await;
        if result.is_err() {
            let _ = delete_host_side(&host, &spec.host_ifname).await;
        }
        result
    });
    async move {
        let host_index = host.await?;
        Ok(Veth {
            host_index,
            v6_sysctls: expect.v6,
            pod: PodSide {
                addrs: addrs_tx,
                done: done_rx,
            },
        })
    }
}

async fn host_index(h: &Handle, name: &str) -> Result<u32, DataplaneError> {
    link_by_name(h, name)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| DataplaneError::Missing {
            op: format!("find {name}"),
            reason: "just created, now missing",
        })
}

async fn set_up(h: &Handle, index: u32, name: &str) -> Result<(), DataplaneError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {name} up")))
}

/// Step 2 of ADD, once the addresses are known: the pod's addresses and routes, and the
/// host routes (both namespaces at the same time).
pub async fn configure(spec: &PodSpec, veth: Veth) -> Result<(), DataplaneError> {
    let host = connect()?;
    let index = veth.host_index;
    if spec.addrs.iter().any(|a| a.addr().is_ipv6()) && !veth.v6_sysctls {
        // IPv6 came as a surprise (an exec'd IPAM plugin): its sysctls (no DAD on the
        // gateway's link-local address) must be written while the link is down.
        host.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl(format!("set {} down", spec.host_ifname)))?;
        host_sysctls(&spec.host_ifname, true)?;
        set_up(&host, index, &spec.host_ifname).await?;
    }
    let pod = async {
        let PodSide { addrs, done } = veth.pod;
        if addrs.send(spec.addrs.clone()).is_err() {
            return Err(DataplaneError::Netns {
                path: spec.netns.clone(),
                reason: "pod worker stopped".into(),
            });
        }
        done.await.map_err(|_| DataplaneError::Netns {
            path: spec.netns.clone(),
            reason: "pod worker stopped".into(),
        })?
    };
    let routes = async {
        for a in &spec.addrs {
            host_route(&host, index, &spec.host_ifname, *a).await?;
        }
        Ok(())
    };
    let (pod, routes) = tokio::join!(pod, routes);
    pod?;
    routes
}

/// Before ADD makes the pair: an existing host link of the pod's host-side name is removed
/// when it is the same pod's (see [`PodSpec::name_from_pod`]) or this container's own
/// (a repeated ADD); another container's link is an error and stays.
async fn replace_host_side(h: &Handle, spec: &PodSpec) -> Result<(), DataplaneError> {
    let Some(existing) = link_by_name(h, &spec.host_ifname).await? else {
        return Ok(());
    };
    if !spec.name_from_pod
        && !is_peer_in(&spec.netns, &spec.container_ifname, existing.header.index).await?
    {
        return Err(DataplaneError::HostNameTaken {
            name: spec.host_ifname.clone(),
            ifname: spec.container_ifname.clone(),
            netns: spec.netns.clone(),
        });
    }
    delete_host_side(h, &spec.host_ifname).await.map(|_| ())
}

/// Whether `ifname` in the namespace at `netns` is the veth peer of the host link with
/// index `host_index` (its IFLA_LINK names that index).
async fn is_peer_in(netns: &str, ifname: &str, host_index: u32) -> Result<bool, DataplaneError> {
    let ifname = ifname.to_string();
    on_thread(Some(netns.to_string()), move |h| async move {
        Ok(link_by_name(&h, &ifname).await?.is_some_and(|l| {
            l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Link(i) if *i == host_index))
        }))
    })
    .await
}

async fn delete_host_side(h: &Handle, name: &str) -> Result<bool, DataplaneError> {
    let Some(l) = link_by_name(h, name).await? else {
        return Ok(false);
    };
    match h
        .link()
        .del(l.header.index)
        .execute()
        .await
        .map_err(nl(format!("delete {name}")))
    {
        Err(e) if !e.is_gone() => Err(e),
        _ => Ok(true),
    }
}

/// Inside the pod, before the addresses are known: the interface up (a veth peer cannot
/// be created up) and, when IPv4 is expected, the gateway's link route and the default
/// route (neither needs the address). Returns the interface's index.
async fn pod_link_up(h: &Handle, ifname: &str, v4_routes: bool) -> Result<u32, DataplaneError> {
    let link = link_by_name(h, ifname)
        .await?
        .ok_or_else(|| DataplaneError::Missing {
            op: format!("find {ifname} in the pod"),
            reason: "missing",
        })?;
    let index = link.header.index;
    set_up(h, index, ifname).await?;
    if v4_routes {
        pod_v4_routes(h, index, ifname).await?;
    }
    Ok(index)
}

async fn pod_v4_routes(h: &Handle, index: u32, ifname: &str) -> Result<(), DataplaneError> {
    let gw = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Boot)
        .build();
    h.route()
        .add(gw)
        .execute()
        .await
        .map_err(nl(format!("add route {GATEWAY} dev {ifname} scope link")))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(GATEWAY)
        .output_interface(index)
        .protocol(RouteProtocol::Boot)
        .build();
    h.route()
        .add(default)
        .execute()
        .await
        .map_err(nl(format!("add default via {GATEWAY} dev {ifname}")))
}

/// Inside the pod, once they are known: the addresses, and the routes not added yet (IPv4
/// ones when IPv4 was not expected; IPv6's default route).
async fn pod_addresses(
    h: &Handle,
    index: u32,
    ifname: &str,
    addrs: &[IpNet],
    v4_routes_done: bool,
) -> Result<(), DataplaneError> {
    for a in addrs {
        let mut req = h.address().add(index, a.addr(), a.prefix_len());
        if a.addr().is_ipv6() {
            // No duplicate address detection: the address is ours by IPAM, and DAD would
            // leave it tentative (unusable) for a second or more.
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(nl(format!("add {a} to {ifname}")))?;
    }
    if addrs.iter().any(|a| a.addr().is_ipv4()) && !v4_routes_done {
        pod_v4_routes(h, index, ifname).await?;
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        // IPv6: the gateway is the host veth's link-local address (Calico's rule); it is
        // fixed because the host MAC is.
        let default = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(std::net::Ipv6Addr::UNSPECIFIED, 0)
            .gateway(HOST_LINK_LOCAL)
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .build();
        h.route().add(default).execute().await.map_err(nl(format!(
            "add default via {HOST_LINK_LOCAL} dev {ifname}"
        )))?;
    }
    Ok(())
}

/// The pod's host route: `<addr>/32 (or /128) dev <index> scope link proto boot`.
fn host_route_message(addr: IpNet, index: u32) -> RouteMessage {
    match addr.addr() {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build(),
    }
}

/// `<ip>/32 dev <if> scope link proto boot`; an identical route is accepted, Felix's
/// blackhole for a /32 block replaced, one via another interface is a conflict.
async fn host_route(
    h: &Handle,
    index: u32,
    ifname: &str,
    addr: IpNet,
) -> Result<(), DataplaneError> {
    let msg = host_route_message(addr, index);
    match h
        .route()
        .add(msg)
        .execute()
        .await
        .map_err(nl(format!("add route {addr} dev {ifname}")))
    {
        Ok(()) => Ok(()),
        Err(e) if e.is_exists() => {
            let existing = crate::netlink::routes::to(h, addr).await?;
            match existing.first() {
                Some(r) if r.oif == Some(index) => Ok(()),
                // Felix's blackhole for a block that is this one address (a /32 block):
                // the pod's route takes its place, as in Felix's own calculation.
                Some(r)
                    if r.kind == u8::from(netlink_packet_route::route::RouteType::BlackHole)
                        && r.protocol == crate::model::felix::PROTO_FELIX =>
                {
                    h.route()
                        .add(host_route_message(addr, index))
                        .replace()
                        .execute()
                        .await
                        .map_err(nl(format!("replace blackhole {addr} with dev {ifname}")))
                }
                Some(r) => Err(DataplaneError::RouteConflict {
                    ip: addr,
                    other: format!("ifindex {}", r.oif.unwrap_or(0)),
                    ours: ifname.into(),
                }),
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Remove the pod's interface (and so the pair) from inside the pod's namespace, by its
/// name there (Calico's `CleanUpNamespace`). Never by the host-side name: a pod's
/// `cali…` name is derived from the pod, so after a sandbox is replaced the name belongs
/// to the new sandbox, and a DEL for the old one must not touch it. No namespace given,
/// a namespace already gone, or no such interface in it: nothing to do.
/// The work starts on its own thread when this is called.
pub fn teardown(
    netns: &str,
    container_ifname: &str,
) -> impl std::future::Future<Output = Result<(), DataplaneError>> + use<> {
    let (netns, ifname) = (netns.to_string(), container_ifname.to_string());
    let gone = netns.is_empty() || !std::path::Path::new(&netns).exists();
    let path = netns.clone();
    let work = (!gone).then(|| {
        on_thread(Some(netns.clone()), move |h| async move {
            if let Some(l) = link_by_name(&h, &ifname).await? {
                match h
                    .link()
                    .del(l.header.index)
                    .execute()
                    .await
                    .map_err(nl(format!("delete {ifname} in {netns}")))
                {
                    Err(e) if !e.is_gone() => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
    });
    async move {
        match work {
            // The namespace went away between the check and the entry: nothing left.
            Some(w) => match w.await {
                Err(DataplaneError::Netns { .. }) if !std::path::Path::new(&path).exists() => {
                    Ok(())
                }
                other => other,
            },
            None => Ok(()),
        }
    }
}

/// CHECK: the pod interface exists with exactly these addresses, and the host routes exist.
pub async fn check(spec: &PodSpec) -> Result<(), String> {
    let host = connect().map_err(|e| e.to_string())?;
    let link = link_by_name(&host, &spec.host_ifname)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("host interface {} is missing", spec.host_ifname))?;
    for a in &spec.addrs {
        // The host route is always the address's /32 (/128).
        let host_prefix = IpNet::new(a.addr(), a.max_prefix_len()).expect("the maximal length");
        let routes = crate::netlink::routes::to(&host, host_prefix)
            .await
            .map_err(|e| e.to_string())?;
        if !routes.iter().any(|r| r.oif == Some(link.header.index)) {
            return Err(format!(
                "host route {a} dev {} is missing",
                spec.host_ifname
            ));
        }
    }
    let (ifname, addrs) = (spec.container_ifname.clone(), spec.addrs.clone());
    in_netns(&spec.netns, move |h| async move {
        let link = link_by_name(&h, &ifname).await?.ok_or_else(|| DataplaneError::Missing { op: format!("find {ifname}"), reason: "missing in the pod" })?;
        let have: Vec<netlink_packet_route::address::AddressMessage> =
            h.address().get().set_link_index_filter(link.header.index).execute().try_collect().await.map_err(nl("list addresses"))?;
        for a in &addrs {
            let found = have.iter().any(|m| {
                m.header.prefix_len == a.prefix_len()
                    && m.attributes.iter().any(|x| matches!(x, netlink_packet_route::address::AddressAttribute::Address(ip) if *ip == a.addr()))
            });
            if !found {
                return Err(DataplaneError::Missing { op: format!("check {a} on {ifname}"), reason: "address missing in the pod" });
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())
}
