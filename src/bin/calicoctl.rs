//! calicoctl: manage Calico resources (see `calico_node::ctl`).

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Warnings of the library (e.g. a stored value that cannot be decoded and is skipped,
    // named by key) go to stderr; stdout stays the command's output.
    // Colours only when stderr is a terminal (not in a pipe, a file or a CI log).
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .with_target(false)
        .init();
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
