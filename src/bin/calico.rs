//! calico: the CNI plugin (see `calico_node::cni::plugin`).

use std::io::Read;

use calico_node::cni::{self, CniEnv, NetConf};
use calico_node::env::ProcessEnv;

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.1.0".into());
    let outcome = run(&stdin);
    std::process::exit(cni::finish(&mut std::io::stdout(), outcome, &version));
}

fn run(stdin: &[u8]) -> Result<Option<serde_json::Value>, cni::CniError> {
    let env = CniEnv::from_env(&ProcessEnv)?;
    if env.command == cni::Command::Version {
        return Ok(Some(cni::version_result()));
    }
    let conf = NetConf::parse(stdin)?;
    cni::init_logging(&conf);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| cni::CniError::new(cni::code::IO_FAILURE, "cannot start", e.to_string()))?;
    rt.block_on(cni::plugin::execute(&env, &conf, stdin))
}
