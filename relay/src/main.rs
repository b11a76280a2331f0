//! The `ferry-relay` binary: parse flags, start the relay, print its URL, run until
//! SIGINT or SIGTERM.

use clap::Parser;
use ferry_relay::config::Flags;

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    init_logging();
    let opts = flags.resolve()?;
    let relay = ferry_relay::server::start(opts).await?;
    // One machine-readable line on stdout for scripts and tests; logs go to stderr.
    println!(
        "ferry-relay ready url={} admin=http://{}",
        relay.url(),
        relay.admin_addr
    );
    relay.run_until_shutdown().await;
    Ok(())
}
