//! Replays the BGP decode fuzz corpus (`fuzz/corpus/bgp_decode`, seeded with the messages
//! captured from BIRD and GoBGP and grown by `cargo +nightly fuzz run bgp_decode`) through
//! the decoder in the normal test suite: none of it may panic.

#[test]
fn bgp_decode_corpus_never_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/bgp_decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        calico_node::bgp::message::fuzz_decode(&bytes);
        n += 1;
        // The captured messages (the seeds) also with every truncation and with each byte
        // flipped in turn; what the fuzzer found is replayed as is.
        let name = path.file_name().unwrap().to_string_lossy();
        if !(name.starts_with("bird-") || name.starts_with("gobgp-")) {
            continue;
        }
        for cut in 0..bytes.len() {
            calico_node::bgp::message::fuzz_decode(&bytes[..cut]);
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            calico_node::bgp::message::fuzz_decode(&b);
        }
    }
    assert!(n >= 100, "the corpus has {n} entries");
}
