//! The RIB's prefix tables: open addressing, linear probing, backward-shift deletion, at
//! most 3/4 full. A probe reads the key and the value from the same cache line; a
//! SwissTable (std's `HashMap`) reads its control bytes and then its bucket, two places.
//! At a million routes almost every insert misses the cache, so that is one miss per
//! route instead of two. Pure.

use std::hash::{BuildHasher, BuildHasherDefault, Hash};

use crate::prefix_map::PrefixHasher;

/// Where a probe for a key ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Found(usize),
    /// Not present; the key would go here.
    Vacant(usize),
}

#[derive(Debug)]
pub struct OpenMap<K, V> {
    slots: Box<[Option<(K, V)>]>,
    len: usize,
}

impl<K, V> Default for OpenMap<K, V> {
    fn default() -> Self {
        OpenMap {
            slots: Box::new([]),
            len: 0,
        }
    }
}

impl<K: Copy + Eq + Hash, V> OpenMap<K, V> {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, key: &K) -> usize {
        (BuildHasherDefault::<PrefixHasher>::default().hash_one(key) as usize) & self.mask()
    }

    /// Probe for `key` (the table must have slots).
    fn probe(&self, key: &K) -> Slot {
        let mut i = self.home(key);
        loop {
            match &self.slots[i] {
                Some((k, _)) if k == key => return Slot::Found(i),
                None => return Slot::Vacant(i),
                Some(_) => i = (i + 1) & self.mask(),
            }
        }
    }

    pub fn find(&self, key: &K) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(key) {
            Slot::Found(i) => Some(i),
            Slot::Vacant(_) => None,
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).map(|i| self.at(i))
    }

    /// Start loading the cache line where a probe for `key` begins, so that a later
    /// lookup or put finds it there (a few keys ahead, the loads overlap).
    pub fn prefetch(&self, key: &K) {
        if self.slots.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let p = std::ptr::from_ref(&self.slots[self.home(key)]).cast::<i8>();
            // SAFETY: a prefetch is only a hint: it never faults nor changes memory, and
            // `p` points into our slots anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
        }
    }

    /// Where `key` is or would be put; makes room first if a put could overfill the table
    /// (so a `Vacant` slot stays valid for `put`).
    pub fn slot(&mut self, key: &K) -> Slot {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            if let Some(i) = self.find(key) {
                return Slot::Found(i);
            }
            self.grow();
        }
        self.probe(key)
    }

    /// Fill a slot that `slot` gave as vacant for `key`.
    pub fn put(&mut self, i: usize, key: K, value: V) {
        debug_assert!(self.slots[i].is_none(), "slot {i} is in use");
        self.slots[i] = Some((key, value));
        self.len += 1;
    }

    pub fn at(&self, i: usize) -> &V {
        &self.slots[i].as_ref().expect("a used slot").1
    }

    pub fn at_mut(&mut self, i: usize) -> &mut V {
        &mut self.slots[i].as_mut().expect("a used slot").1
    }

    /// Empty a used slot; entries after it that probed past it move back, so every probe
    /// still reaches its key before an empty slot.
    pub fn remove_at(&mut self, i: usize) -> V {
        let mask = self.mask();
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let Some((k, _)) = &self.slots[j] else {
                break;
            };
            let home = self.home(k);
            // Entry j may fill the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots.swap(hole, j);
                hole = j;
            }
        }
        self.len -= 1;
        self.slots[hole].take().expect("a used slot").1
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.find(key).map(|i| self.remove_at(i))
    }

    /// Keep the entries for which `keep` says so (it may change them).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let mut dead = Vec::new();
        for (k, v) in self.slots.iter_mut().flatten() {
            if !keep(k, v) {
                dead.push(*k);
            }
        }
        for k in &dead {
            self.remove(k);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.slots.iter().flatten().map(|(k, v)| (k, v))
    }

    /// Twice the slots (16 at first), every entry re-placed.
    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(16);
        let mut slots = Vec::with_capacity(n);
        advise_huge_pages(&mut slots);
        slots.extend((0..n).map(|_| None));
        let old = std::mem::replace(&mut self.slots, slots.into_boxed_slice());
        for (k, v) in old.into_vec().into_iter().flatten() {
            let mut i = self.home(&k);
            while self.slots[i].is_some() {
                i = (i + 1) & self.mask();
            }
            self.slots[i] = Some((k, v));
        }
    }
}

/// Ask for transparent huge pages under a large table before it is first written. Its
/// probes land anywhere in it, and with 4 KiB pages nearly each also missed the TLB (a
/// million routes take ~50 MB of slots); measured, ~10% of the receive CPU at 1M routes.
/// Only advice: the kernel may still give small pages.
fn advise_huge_pages<T>(v: &mut Vec<T>) {
    const HUGE: usize = 2 << 20;
    let start = v.as_mut_ptr() as usize;
    let end = start + v.capacity() * std::mem::size_of::<T>();
    let (from, to) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    #[cfg(target_os = "linux")]
    if to > from {
        // SAFETY: advice about memory this Vec owns; it changes neither its contents nor
        // its mapping.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u64, u32),
        Remove(u64),
        Retain(u64),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        // Few distinct keys, so that inserts meet existing keys and removals find some.
        let key = 0..200u64;
        prop_oneof![
            4 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Step::Insert(k, v)),
            2 => key.prop_map(Step::Remove),
            1 => (2..5u64).prop_map(Step::Retain),
        ]
    }

    proptest::proptest! {
        /// Any history of inserts, removals and retains leaves the table holding what a
        /// std HashMap holds, every key findable.
        #[test]
        fn behaves_like_a_hash_map(steps in proptest::collection::vec(step(), 1..400)) {
            let mut t = OpenMap::<u64, u32>::default();
            let mut m = HashMap::new();
            for s in &steps {
                match *s {
                    Step::Insert(k, v) => {
                        match t.slot(&k) {
                            Slot::Found(i) => *t.at_mut(i) = v,
                            Slot::Vacant(i) => t.put(i, k, v),
                        }
                        m.insert(k, v);
                    }
                    Step::Remove(k) => {
                        proptest::prop_assert_eq!(t.remove(&k), m.remove(&k));
                    }
                    Step::Retain(d) => {
                        t.retain(|k, v| {
                            *v = v.wrapping_add(1);
                            *k % d != 0
                        });
                        m.retain(|k, v| {
                            *v = v.wrapping_add(1);
                            k % d != 0
                        });
                    }
                }
                proptest::prop_assert_eq!(t.len(), m.len());
                for k in 0..200u64 {
                    proptest::prop_assert_eq!(t.get(&k), m.get(&k), "key {} after {:?}", k, s);
                }
            }
            let mut all: Vec<(u64, u32)> = t.iter().map(|(k, v)| (*k, *v)).collect();
            all.sort();
            let mut want: Vec<(u64, u32)> = m.into_iter().collect();
            want.sort();
            proptest::prop_assert_eq!(all, want);
        }
    }

    #[test]
    fn removal_keeps_wrapped_probe_chains_reachable() {
        // Fill a 16-slot table so that chains wrap past the end, then remove from them.
        let mut t = OpenMap::<u64, u32>::default();
        for k in 0..12u64 {
            let Slot::Vacant(i) = t.slot(&k) else {
                panic!("{k} present")
            };
            t.put(i, k, k as u32);
        }
        assert_eq!(t.slots.len(), 16);
        for k in (0..12u64).step_by(2) {
            assert_eq!(t.remove(&k), Some(k as u32));
            for j in 0..12u64 {
                let want = (j % 2 == 1 || j > k).then_some(j as u32);
                assert_eq!(t.get(&j).copied(), want, "key {j} after removing {k}");
            }
        }
        assert_eq!(t.len(), 6);
    }
}
