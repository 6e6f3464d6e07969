//! calico: a CNI plugin (see `calico_node::cni`).

use std::io::Read;

use calico_node::cni::{Plugin, plugin_main};
use calico_node::env::ProcessEnv;

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    std::process::exit(plugin_main(
        Plugin::Calico,
        &ProcessEnv,
        &stdin,
        &mut std::io::stdout(),
    ));
}
