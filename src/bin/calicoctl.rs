//! calicoctl: manage Calico resources (see `calico_node::ctl`).

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = calico_node::ctl::main(
        args,
        &calico_node::env::ProcessEnv,
        &mut std::io::stdin(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
    .await;
    std::process::exit(code);
}
