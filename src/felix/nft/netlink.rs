//! Set element changes written straight as one nfnetlink batch (one transaction), for the
//! change that must be fast: a label change on one pod adds and removes a few elements.
//! `nft -f` reads the whole table's set elements into its cache before each transaction
//! (measured: ~50-300 ms with 1,000 endpoints and 100 selector sets), this costs
//! microseconds. Everything else goes through `nft -f`.
//!
//! The encoding is what nft itself sends (`nft --debug=netlink`): an interval element is a
//! start key and an end key (the address after the last, flagged interval end); a
//! concatenation pads each field to 4 bytes. Kernel ABI: `linux/netfilter/nf_tables.h`,
//! `linux/netfilter/nfnetlink.h`.

use std::net::IpAddr;

use super::render::Element;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// Elements to add to or delete from one set of table `calico`.
#[derive(Debug, Clone, PartialEq)]
pub struct ElementChange {
    pub v6: bool,
    pub set: String,
    pub add: bool,
    pub elements: Vec<Element>,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// An element nft encodes specially (an interval reaching the family's last address):
    /// left to `nft -f`.
    #[error("element {0:?} is not encoded here")]
    Unencodable(Element),
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    /// The kernel refused the batch (nothing of it applied): the set and errno.
    #[error("set {set}: {error}")]
    Refused { set: String, error: std::io::Error },
}

/// The keys of one element, with their flags.
fn keys(e: &Element) -> Option<Vec<(Vec<u8>, u32)>> {
    match e {
        Element::Net(n) => {
            let n = n.trunc();
            let (start, end) = match (n.network(), n.broadcast()) {
                (IpAddr::V4(s), IpAddr::V4(b)) => (
                    s.octets().to_vec(),
                    u32::from(b).checked_add(1)?.to_be_bytes().to_vec(),
                ),
                (IpAddr::V6(s), IpAddr::V6(b)) => (
                    s.octets().to_vec(),
                    u128::from(b).checked_add(1)?.to_be_bytes().to_vec(),
                ),
                _ => return None,
            };
            Some(vec![(start, 0), (end, NFT_SET_ELEM_INTERVAL_END)])
        }
        Element::Port(a, proto, port) => {
            let mut k = match a {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            k.extend_from_slice(&[*proto, 0, 0, 0]);
            k.extend_from_slice(&port.to_be_bytes());
            k.extend_from_slice(&[0, 0]);
            Some(vec![(k, 0)])
        }
    }
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad(buf);
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// A nested attribute: its header, then what `f` writes, then the length fixed up.
fn nested(buf: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netlink message: header, nfgenmsg, then `body`.
fn message(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    let len = 16 + 4 + body.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(body);
    pad(buf);
}

/// The sequence numbers of the messages to be acknowledged, with their set names.
type Acked = Vec<(u32, String)>;

/// The batch for `changes` (table `calico`), and the sequence numbers of the messages
/// that will be acknowledged, with their set names. Pure.
pub fn encode(changes: &[ElementChange], seq0: u32) -> Result<(Vec<u8>, Acked), BatchError> {
    let mut buf = Vec::new();
    let mut acked = Vec::new();
    let mut seq = seq0;
    message(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for c in changes.iter().filter(|c| !c.elements.is_empty()) {
        let mut body = Vec::new();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr("calico"));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(&c.set));
        let mut failed = None;
        nested(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
            for e in &c.elements {
                let Some(keys) = keys(e) else {
                    failed = Some(*e);
                    return;
                };
                for (key, flags) in keys {
                    nested(b, NFTA_LIST_ELEM, |b| {
                        nested(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, &key));
                        if flags != 0 {
                            attr(b, NFTA_SET_ELEM_FLAGS, &flags.to_be_bytes());
                        }
                    });
                }
            }
        });
        if let Some(e) = failed {
            return Err(BatchError::Unencodable(e));
        }
        seq += 1;
        let (ty, flags) = if c.add {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
        };
        let family = if c.v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
        message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            seq,
            family,
            0,
            &body,
        );
        acked.push((seq, c.set.clone()));
    }
    seq += 1;
    message(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    Ok((buf, acked))
}

/// A netlink socket of the calling thread's network namespace, closed on drop.
#[derive(Debug)]
struct Socket(libc::c_int);
impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// A netlink socket of the calling thread's network namespace, bound, with a 5 s
/// receive timeout.
fn open() -> Result<Socket, BatchError> {
    let last_os = || BatchError::Socket(std::io::Error::last_os_error());
    // SAFETY: plain socket calls on a descriptor this function owns; the structures
    // passed outlive the calls.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        );
        if fd < 0 {
            return Err(last_os());
        }
        let sock = Socket(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        if libc::bind(
            sock.0,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            return Err(last_os());
        }
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        libc::setsockopt(
            sock.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(sock)
    }
}

/// Send `buf` to the kernel whole.
fn send(sock: &Socket, buf: &[u8]) -> Result<(), BatchError> {
    // SAFETY: the buffer and address outlive the call.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.0,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 || sent as usize != buf.len() {
        return Err(BatchError::Socket(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Receive one datagram into `buf`; its length.
fn recv(sock: &Socket, buf: &mut [u8]) -> Result<usize, BatchError> {
    // SAFETY: the buffer outlives the call and its length is passed.
    let n = unsafe { libc::recv(sock.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(BatchError::Socket(std::io::Error::last_os_error()));
    }
    Ok(n as usize)
}

const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// A netlink socket to nftables in the network namespace it was opened in, kept for the
/// transactions that follow. Closing a socket that wrote a transaction waits for the
/// kernel to free what the transaction deleted (it flushes nf_tables' destroy work, an RCU
/// grace period): 10-20 ms per label change on a busy 2-vCPU machine, measured with
/// strace in `scripts/bench policy` (the close, not the transaction, was the time). Each
/// request has sequence numbers of its own, so an answer left over from an earlier one
/// is never taken for its.
#[derive(Debug)]
pub struct Conn {
    sock: Socket,
    /// The last sequence number used.
    seq: u32,
}

impl Conn {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Conn, BatchError> {
        Ok(Conn {
            sock: open()?,
            seq: 0,
        })
    }

    /// The nftables ruleset generation of the socket's network namespace: it changes with
    /// every transaction, ours or anyone's. Equal to the one after our last write: no one
    /// has touched nftables since (no drift possible).
    pub fn generation(&mut self) -> Result<u32, BatchError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut buf = Vec::new();
        message(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
            NLM_F_REQUEST,
            seq,
            0,
            0,
            &[],
        );
        send(&self.sock, &buf)?;
        let mut rbuf = vec![0u8; 8192];
        loop {
            let n = recv(&self.sock, &mut rbuf)?;
            for (at, len, ty, mseq) in headers(&rbuf[..n]) {
                if mseq != seq {
                    continue;
                }
                if ty == NLMSG_ERROR && len >= 20 {
                    let errno = i32::from_ne_bytes(rbuf[at + 16..at + 20].try_into().expect("4"));
                    return Err(BatchError::Refused {
                        set: "(generation)".into(),
                        error: std::io::Error::from_raw_os_error(-errno),
                    });
                }
                if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                    // Attributes after the header (16) and nfgenmsg (4).
                    let mut a = at + 20;
                    while a + 4 <= at + len {
                        let alen = u16::from_ne_bytes([rbuf[a], rbuf[a + 1]]) as usize;
                        let aty = u16::from_ne_bytes([rbuf[a + 2], rbuf[a + 3]]) & 0x3fff;
                        if alen < 4 {
                            break;
                        }
                        if aty == NFTA_GEN_ID && alen >= 8 {
                            let id = rbuf[a + 4..a + 8].try_into().expect("4 bytes");
                            return Ok(u32::from_be_bytes(id));
                        }
                        a += (alen + 3) & !3;
                    }
                }
            }
        }
    }

    /// Write `changes` as one transaction in the socket's network namespace.
    pub fn write(&mut self, changes: &[ElementChange]) -> Result<(), BatchError> {
        let seq0 = self.seq.wrapping_add(1);
        let (buf, acked) = encode(changes, seq0)?;
        if acked.is_empty() {
            return Ok(());
        }
        // The batch's begin, its messages, its end.
        let last = seq0.wrapping_add(acked.len() as u32 + 1);
        self.seq = last;
        let ours = |s: u32| s.wrapping_sub(seq0) <= last.wrapping_sub(seq0);
        send(&self.sock, &buf)?;
        // One answer (an ack or an error) per acknowledged message.
        let mut pending: Vec<(u32, String)> = acked;
        let mut first_error: Option<BatchError> = None;
        let mut rbuf = vec![0u8; 65536];
        while !pending.is_empty() {
            let n = match recv(&self.sock, &mut rbuf) {
                Ok(n) => n,
                Err(e) => return Err(first_error.unwrap_or(e)),
            };
            for (at, len, ty, mseq) in headers(&rbuf[..n]) {
                if ty != NLMSG_ERROR || len < 36 || !ours(mseq) {
                    continue;
                }
                let errno = i32::from_ne_bytes(rbuf[at + 16..at + 20].try_into().expect("4"));
                if let Some(i) = pending.iter().position(|(s, _)| *s == mseq) {
                    let (_, set) = pending.swap_remove(i);
                    if errno != 0 && first_error.is_none() {
                        first_error = Some(BatchError::Refused {
                            set,
                            error: std::io::Error::from_raw_os_error(-errno),
                        });
                    }
                } else if errno != 0 && first_error.is_none() {
                    // An error about the batch itself (begin or end).
                    first_error = Some(BatchError::Refused {
                        set: "(batch)".into(),
                        error: std::io::Error::from_raw_os_error(-errno),
                    });
                    pending.clear();
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The netlink messages in one datagram: (offset, length, type, sequence number).
fn headers(buf: &[u8]) -> Vec<(usize, usize, u16, u32)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4 bytes"));
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push((at, len, ty, seq));
        at += (len + 3) & !3;
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    /// An address is an interval of one: its start, and the next address flagged as the
    /// interval's end (what nft sends for `add element … { 11.0.0.1 }`).
    #[test]
    fn an_address_is_a_start_and_an_end_key() {
        let k = keys(&Element::Net("11.0.0.1/32".parse().unwrap())).unwrap();
        assert_eq!(k, vec![(vec![11, 0, 0, 1], 0), (vec![11, 0, 0, 2], 1)]);
        let k = keys(&Element::Net("12.0.0.0/24".parse().unwrap())).unwrap();
        assert_eq!(k, vec![(vec![12, 0, 0, 0], 0), (vec![12, 0, 1, 0], 1)]);
        assert_eq!(
            keys(&Element::Net("255.255.255.255/32".parse().unwrap())),
            None
        );
    }

    /// A named-port element pads protocol and port to 4 bytes each, as nft does
    /// (`0101010a 00000006 00005000` for 10.1.1.1 . tcp . 80).
    #[test]
    fn a_named_port_element_pads_each_field() {
        let k = keys(&Element::Port("10.1.1.1".parse().unwrap(), 6, 80)).unwrap();
        assert_eq!(k, vec![(vec![10, 1, 1, 1, 6, 0, 0, 0, 0, 80, 0, 0], 0)]);
    }

    /// One batch: begin, one message per set change (acknowledged), end.
    #[test]
    fn one_batch_with_a_message_per_set() {
        let changes = vec![
            ElementChange {
                v6: false,
                set: "cali40s-a".into(),
                add: true,
                elements: vec![Element::Net("10.0.0.1/32".parse().unwrap())],
            },
            ElementChange {
                v6: true,
                set: "cali60s-a".into(),
                add: false,
                elements: vec![],
            },
        ];
        let (buf, acked) = encode(&changes, 7).unwrap();
        assert_eq!(acked, vec![(8, "cali40s-a".to_string())]);
        let ty = |at: usize| u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        assert_eq!(ty(0), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(ty(20), (10 << 8) | NFT_MSG_NEWSETELEM);
        let len = u32::from_ne_bytes(buf[20..24].try_into().unwrap()) as usize;
        assert_eq!(ty(20 + len), NFNL_MSG_BATCH_END);
        assert_eq!(buf.len(), 20 + len + 20);
    }
}
