//! calico: a CNI plugin (see `calico_node::cni`). Like Calico's, the one binary is also the
//! IPAM plugin when it is run under the name `calico-ipam` (a link or a copy).

use std::io::Read;

use calico_node::cni::{Plugin, plugin_main};
use calico_node::env::ProcessEnv;

fn main() {
    let plugin = match std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
    {
        Some(name) if name == "calico-ipam" => Plugin::CalicoIpam,
        _ => Plugin::Calico,
    };
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    std::process::exit(plugin_main(
        plugin,
        &ProcessEnv,
        &stdin,
        &mut std::io::stdout(),
    ));
}
