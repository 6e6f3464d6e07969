//! Socket options BGP sessions need: TCP MD5 signatures (RFC 2385, Linux `TCP_MD5SIG`, set
//! per peer address on the connecting socket and on the listener) and the TTL security
//! hack (RFC 5082: send with TTL 255, accept only TTL >= 255 - hops + 1).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// Linux `struct tcp_md5sig` (include/uapi/linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: u32,
    key: [u8; 80],
}

/// Largest key the kernel takes (TCP_MD5SIG_MAXKEYLEN).
pub const MD5_MAX_KEY: usize = 80;

fn storage(peer: IpAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is aligned for it.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

/// Sign (or, with an empty key, stop signing) TCP segments to and from `peer`.
pub fn set_md5(sock: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> std::io::Result<()> {
    if key.len() > MD5_MAX_KEY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("TCP MD5 key longer than {MD5_MAX_KEY} bytes"),
        ));
    }
    let mut sig = TcpMd5Sig {
        addr: storage(peer),
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; 80],
    };
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: the pointer and length describe `sig`, a valid tcp_md5sig.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Acknowledge what was read at once, not after the delayed-ACK timer (the kernel leaves
/// quick-ACK mode on its own, so this is set again after each read).
pub fn quick_ack(sock: &impl AsRawFd) {
    let _ = setsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
}

fn setsockopt_int(sock: &impl AsRawFd, level: i32, opt: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe an i32.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// RFC 5082 for a peer `hops` away: outgoing TTL 255, incoming at least 256 - hops.
pub fn set_ttl_security(sock: &impl AsRawFd, peer: SocketAddr, hops: u8) -> std::io::Result<()> {
    let min = 256 - i32::from(hops.max(1));
    if peer.is_ipv4() {
        setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_TTL, 255)?;
        setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_MINTTL, min)
    } else {
        setsockopt_int(sock, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)?;
        setsockopt_int(sock, libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT, min)
    }
}

/// A multihop peer: outgoing TTL `ttl` (BIRD's `multihop`).
pub fn set_ttl(sock: &impl AsRawFd, peer: SocketAddr, ttl: u8) -> std::io::Result<()> {
    if peer.is_ipv4() {
        setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_TTL, i32::from(ttl))
    } else {
        setsockopt_int(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            i32::from(ttl),
        )
    }
}
