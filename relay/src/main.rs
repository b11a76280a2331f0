//! The `ferry-relay` binary: parse flags, start the relay, print its URL, run until
//! SIGINT or SIGTERM.

use clap::Parser;
use ferry_relay::config::Flags;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    ferry_proto::config::init_logging();
    let opts = flags.resolve()?;
    let relay = ferry_relay::server::start(opts).await?;
    // One machine-readable line on stdout for scripts and tests; logs go to stderr.
    // New fields go at the end so existing parsers keep working.
    let stun = match relay.state.stun_addr {
        Some(addr) => addr.to_string(),
        None => "off".to_string(),
    };
    println!(
        "ferry-relay ready url={} admin=http://{} stun={stun}",
        relay.url(),
        relay.admin_addr
    );
    relay.run_until_shutdown().await;
    Ok(())
}
