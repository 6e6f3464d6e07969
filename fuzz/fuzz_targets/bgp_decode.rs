//! Fuzz target: BGP message framing and decoding (the bytes a peer controls). The
//! corpus in `fuzz/corpus/bgp_decode` is replayed by `tests/fuzz_corpus.rs` in the normal
//! test suite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| calico_node::bgp::message::fuzz_decode(data));
