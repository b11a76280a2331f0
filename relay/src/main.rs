//! The `ferry-relay` binary: parse flags, start the relay, print its URL, run until
//! SIGINT or SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_relay::config::{Command, Flags};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut flags = Flags::parse();
    ferry_proto::config::init_logging();
    let command = flags.command.take();
    let opts = flags.resolve()?;
    match command {
        Some(Command::Invite { expires, uses }) => return invite(&opts, &expires, uses),
        Some(Command::FleetImport) => {
            let fleet = opts.fleet.as_ref().context(
                "fleet-import moves this relay's policy and invites into a fleet: give the fleet with --fleet nats://host:4222[,…] (and --fleet-name if it is not `ferry`)",
            )?;
            let counted = ferry_relay::fleet::import(
                fleet,
                &opts.policy_file,
                &ferry_relay::policy::invites_path(&opts.data_dir),
            )
            .await?;
            println!(
                "imported into fleet {}: {} listed node(s), {} admin(s), {} outstanding invite(s) ({} the fleet held already)",
                fleet.name, counted.nodes, counted.admins, counted.invites, counted.already
            );
            return Ok(());
        }
        None => {}
    }
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

/// Asks the running relay (its admin API, found from the same flags and config) for
/// an invite code and prints it.
fn invite(
    opts: &ferry_relay::server::RelayOptions,
    expires: &str,
    uses: u32,
) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{}/api/invites", opts.admin);
    let mut request = agent.post(&url);
    if let Some(token) = &opts.admin_token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request
        .send_json(serde_json::json!({ "expires": expires, "uses": uses }))
        .with_context(|| {
            format!(
                "cannot reach the running relay's admin API at {url}; start the relay first, or pass the --config/--admin it runs with"
            )
        })?;
    let body: serde_json::Value = response.body_mut().read_json()?;
    if let Some(code) = body["code"].as_str() {
        println!("{code}");
        eprintln!(
            "valid for {expires}, {uses} use(s); the new member runs: ferry-shim join '{code}'"
        );
        Ok(())
    } else {
        anyhow::bail!(
            "the relay refused to issue an invite: {}",
            body["error"].as_str().unwrap_or("no reason given")
        )
    }
}
