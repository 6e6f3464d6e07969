//! Hash maps keyed by prefixes (the RIB's tables, Felix's route tables): a fast,
//! non-cryptographic hash, several times cheaper than SipHash on these small keys, which
//! matters at a million routes. Ground level: imports nothing from the crate, so every
//! layer (bgp, felix) may use it (DESIGN's layering).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use ipnet::IpNet;

/// The hasher of prefix-keyed tables: a multiply-rotate over the key's words and a
/// murmur3 finaliser (several times cheaper than SipHash on these small keys, which matters
/// at a million routes). Keys are prefixes from configured peers, not from strangers.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefixHasher(u64);

impl PrefixHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// A table keyed by prefix.
pub type PrefixMap<V> = HashMap<IpNet, V, BuildHasherDefault<PrefixHasher>>;

/// A hash map with a fast hash for prefixes (not DoS-resistant: keys come from our own peers).
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<PrefixHasher>>;

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    /// Sequential /24s (what a big table looks like) spread over the low bits the hash table
    /// indexes by, as well as random keys would (about 1 - 1/e of the slots used).
    #[test]
    fn prefix_hasher_spreads_sequential_prefixes() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<PrefixHasher>::default();
        let mut used = std::collections::HashSet::new();
        for i in 0..65_536u32 {
            let p = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x1000_0000 + (i << 8))), 24).unwrap();
            used.insert(b.hash_one(p) & 0xffff);
        }
        assert!(used.len() > 40_000, "{} of 65536 slots", used.len());
    }
}
