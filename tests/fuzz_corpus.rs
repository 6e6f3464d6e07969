//! Replays the BGP decode fuzz corpus (`fuzz/corpus/bgp_decode`, seeded with the messages
//! captured from BIRD and GoBGP and grown by `cargo +nightly fuzz run bgp_decode`) through
//! the decoder in the normal test suite: none of it may panic.

#[test]
fn bgp_decode_corpus_never_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/bgp_decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        calico_node::bgp::message::fuzz_decode(&bytes);
        // Also every truncation of it, and with each byte flipped in turn.
        for cut in 0..bytes.len() {
            calico_node::bgp::message::fuzz_decode(&bytes[..cut]);
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            calico_node::bgp::message::fuzz_decode(&b);
        }
        n += 1;
    }
    assert!(n >= 10, "the corpus has {n} entries");
}
