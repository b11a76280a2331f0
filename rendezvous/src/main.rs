//! The `ferry-rendezvous` binary: parse flags, start the standalone rendezvous, print
//! the ready line, run until SIGINT or SIGTERM.

use clap::Parser;
use ferry_rendezvous::config::Flags;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    ferry_proto::config::init_logging();
    let opts = flags.resolve()?;
    let server = ferry_rendezvous::server::start(opts).await?;
    // One machine-readable line on stdout for scripts and tests; logs go to stderr.
    println!(
        "ferry-rendezvous ready node_id={} stun={} admin=http://{} listen={}",
        server.state.id, server.state.stun_addr, server.admin_addr, server.state.listen
    );
    server.run_until_shutdown().await;
    Ok(())
}
