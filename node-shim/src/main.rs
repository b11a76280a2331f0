//! The `ferry-shim` binary: subcommands `init`, `id`, `expose`, `connect`, `socks`,
//! `join`, `run`, `status`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_proto::{NodeId, RelayUrl, SecretKey};
use ferry_shim::mode::Mode;
use ferry_shim::options::{self, CommonFlags, FileConfig, ForwardConfig, ShimOptions};
use ferry_shim::proxy::ProxyUrl;
use ferry_shim::status::Status;

/// Ferry shim: makes the services of this machine reachable through Ferry relays, and
/// reaches services of other Ferry nodes by their node ID.
#[derive(Debug, Parser)]
#[command(name = "ferry-shim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// Directory holding this node's key (node.key) [default: ~/.local/share/ferry-shim,
    /// or $STATE_DIRECTORY under systemd].
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Admin HTTP address (/api/status, /metrics, /healthz, /readyz, /api/info). A
    /// non-loopback address requires --admin-token-file [default: 127.0.0.1:7844].
    #[arg(long, value_name = "ADDR", global = true)]
    admin: Option<SocketAddr>,
    /// File whose first line is the bearer token for the admin HTTP listener.
    #[arg(long, value_name = "FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// UDP port of the shim's one socket, which carries the relay link, STUN and
    /// direct paths to other nodes; forward this port on your router to be
    /// reachable directly [default: any free port].
    #[arg(long, value_name = "PORT", global = true)]
    udp_port: Option<u16>,
    /// A standalone rendezvous, ferry://<node-id>@host:port (ferry-rendezvous prints
    /// its node ID and listen address). Without it, the rendezvous embedded in the
    /// relay is used.
    #[arg(long, value_name = "URL", global = true)]
    rendezvous: Option<RelayUrl>,
    /// Strict mode: a relay of the fleet this node may also reach, ferry://<relay-id>@host:port
    /// (repeatable), when a peer has a session only there. p2p and private modes reach
    /// any relay of the fleet a peer is on (private through the proxy); strict mode
    /// only the relays it is configured with and these. Config: may_reach = [...].
    #[arg(long, value_name = "URL", global = true)]
    may_reach: Vec<RelayUrl>,
    /// Keep relayed node-to-node packets inside the encrypted relay link instead of
    /// the faster relay channel (plain UDP beside it; the packets are end-to-end
    /// encrypted either way, but on the channel someone on the path sees channel IDs
    /// and timing). Config: relay_channel = false.
    #[arg(long, global = true)]
    no_relay_channel: bool,
    /// p2p: find and announce every address, punch holes, map ports (the default).
    /// strict: only configured addresses and relays, no STUN, no interface scan, no
    /// port mapping, no punching unless --punch; failures are logged and given up.
    /// private: never reveals this node's address: no UDP at all, relays only over
    /// TLS/TCP through the SOCKS5 --proxy (Tor). See README, "Choosing a mode".
    /// Config: mode = "strict".
    #[arg(long, value_name = "MODE", global = true)]
    mode: Option<Mode>,
    /// Reach relays through this proxy: socks5://HOST:PORT (the relay's host name is
    /// resolved by the proxy) or http://HOST:PORT (HTTP CONNECT), optionally with
    /// user:password@. In p2p mode ALL_PROXY / HTTPS_PROXY (and NO_PROXY) are used when
    /// this is not given; strict and private modes ignore them. Config: proxy = "...".
    #[arg(long, value_name = "URL", global = true)]
    proxy: Option<ProxyUrl>,
    /// Strict mode: allow coordinated hole punching (one attempt per peer, no
    /// retries). Config: punch = true.
    #[arg(long, global = true)]
    punch: bool,
    /// p2p mode: do not ask the home router to forward a port (UPnP-IGD, NAT-PMP,
    /// PCP). Config: port_mapping = [] (or a list of "pcp", "nat-pmp", "upnp").
    #[arg(long, global = true)]
    no_port_mapping: bool,
}

impl From<Common> for CommonFlags {
    fn from(c: Common) -> Self {
        CommonFlags {
            data_dir: c.data_dir,
            admin: c.admin,
            admin_token_file: c.admin_token_file,
            udp_port: c.udp_port,
            rendezvous: c.rendezvous,
            may_reach: c.may_reach,
            no_relay_channel: c.no_relay_channel,
            mode: c.mode,
            proxy: c.proxy,
            punch: c.punch,
            socks: None,
            socks_passthrough: false,
            no_port_mapping: c.no_port_mapping,
            allow_grid: false,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this node's key (if none exists) and print its node ID.
    Init {
        #[command(flatten)]
        common: Common,
    },
    /// Print this node's ID.
    Id {
        #[command(flatten)]
        common: Common,
    },
    /// Register local services with a relay so that they can be reached.
    ///
    /// With --public each service gets a stable public TCP port on the relay (the same
    /// port every time, across restarts); stock clients just connect to relay-host:port.
    /// Other Ferry nodes reach the services by this node's ID (`ferry-shim connect`),
    /// but only nodes listed with --allow: by default nobody except this node itself
    /// may connect over the overlay, unless --allow-any is given.
    Expose {
        /// Relay URL, ferry://<relay-id>@host:port (printed by ferry-relay at start).
        /// Not needed after `ferry-shim join`: the grid's relay is remembered.
        #[arg(long, value_name = "URL")]
        relay: Vec<RelayUrl>,
        /// A local service, NAME=HOST:PORT (repeatable); the first is the default.
        #[arg(long, value_name = "NAME=HOST:PORT", required = true)]
        service: Vec<String>,
        /// Ask the relay for a stable public TCP port for each --service.
        #[arg(long)]
        public: bool,
        /// A node ID allowed to reach these services over the overlay (repeatable).
        #[arg(long, value_name = "NODE_ID")]
        allow: Vec<NodeId>,
        /// Let any Ferry node reach these services over the overlay.
        #[arg(long)]
        allow_any: bool,
        /// Let every member of this node's grids (see `join`) reach these services over
        /// the overlay: a peer proves membership with its certificate, and a member
        /// the grid revokes is cut off at once.
        #[arg(long)]
        allow_grid: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Listen locally and carry each connection to another node's service, end-to-end
    /// encrypted through the relay. The remote node must allow this node's ID.
    Connect {
        /// NODE_ID or NODE_ID/SERVICE (without SERVICE: the remote's default service).
        destination: String,
        /// Local address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Relay URL the remote node is registered with (not needed after `join`).
        #[arg(long, value_name = "URL")]
        relay: Vec<RelayUrl>,
        #[command(flatten)]
        common: Common,
    },
    /// A local SOCKS5 server for unmodified apps: a CONNECT to
    /// SERVICE.NODE_ID.ferry (or NODE_ID.ferry for the node's default service) is
    /// carried to that node over the overlay, end-to-end encrypted, e.g.
    /// `curl --socks5-hostname 127.0.0.1:1080 http://web.<node-id>.ferry/`. Other
    /// names are refused unless --passthrough (p2p mode only). Config: socks_listen.
    Socks {
        /// Local address to listen on, e.g. 127.0.0.1:1080.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Connect names outside .ferry directly from this machine (p2p mode only;
        /// strict and private modes refuse them). Config: socks_passthrough = true.
        #[arg(long)]
        passthrough: bool,
        /// Relay URL the remote nodes are registered with (not needed after `join`).
        #[arg(long, value_name = "URL")]
        relay: Vec<RelayUrl>,
        #[command(flatten)]
        common: Common,
    },
    /// Join a grid with an invite code from its admin (`ferry-relay invite`). The
    /// certificate and the relay's URL are kept in the data directory; afterwards
    /// `expose` and `connect` need no --relay and present the certificate by
    /// themselves.
    Join {
        /// The invite code, ferry://<relay-id>@host:port?invite=<secret>.
        code: String,
        #[command(flatten)]
        common: Common,
    },
    /// Run everything described in a TOML config file (services, forwards, relays).
    Run {
        /// The config file; see README for its keys. Unknown keys are errors.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Stock Tahoe-LAFS nodes through Ferry, with no change to Tahoe.
    #[command(subcommand)]
    Tahoe(TahoeCommand),
    /// Show the status of the running shim (relays, services, peers).
    Status {
        /// Print the raw JSON of /api/status.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
enum TahoeCommand {
    /// Serve a Tahoe storage node through the relay: sets `tub.port` in NODEDIR's
    /// tahoe.cfg to listen on loopback, exposes that port as the service `storage`
    /// with a stable public port (and to grid members over the overlay, after
    /// `join`), and once the relay grants the port sets `tub.location` to it, so the
    /// node announces the relay's address. tahoe.cfg is backed up to
    /// tahoe.cfg.ferry-backup first and every change is printed; restart Tahoe to
    /// use it. Then it keeps running as the node's shim and, for a grid member,
    /// does what `tahoe client` does for the node's own client side.
    Serve(TahoeArgs),
    /// Put a Tahoe client's connections to other grid members on the overlay: reads
    /// the storage servers NODEDIR's introducer announced, asks the grid's relay
    /// which of them are members' public ports, keeps a local forward to each, and
    /// writes private/servers.yaml entries (marked `ferry:`) that point Tahoe at those
    /// forwards, so shares go straight to the member (direct when the NATs allow) and
    /// not through the relay. Every other entry is kept; the old file is kept as
    /// servers.yaml.ferry-backup and every change is printed; restart Tahoe to use
    /// it. Keeps running, following servers as they come and go. Needs `join` first.
    /// (`tahoe serve` does the same for a storage node's own client.)
    Client(TahoeArgs),
}

/// What both `tahoe` subcommands take.
#[derive(Debug, Args)]
struct TahoeArgs {
    /// The Tahoe node directory (the one with tahoe.cfg).
    node_dir: PathBuf,
    /// Relay URL (not needed after `join`).
    #[arg(long, value_name = "URL")]
    relay: Vec<RelayUrl>,
    /// Print what would change in the node's files and stop, changing nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    common: Common,
}

/// Reads NODEDIR/tahoe.cfg, with an error that says what a node directory is.
fn read_tahoe_cfg(node_dir: &std::path::Path) -> anyhow::Result<String> {
    let cfg_path = node_dir.join("tahoe.cfg");
    ferry_proto::config::read_text(&cfg_path).with_context(|| {
        format!(
            "cannot read {}: is {} a Tahoe node directory? (`tahoe create-node` or `tahoe create-client` makes one)",
            cfg_path.display(),
            node_dir.display()
        )
    })
}

/// A `tahoe` subcommand's shim: its flags, relays and services, nothing from a file.
fn tahoe_options(
    common: Common,
    relay: Vec<RelayUrl>,
    services: Vec<options::ServiceConfig>,
) -> anyhow::Result<ShimOptions> {
    ShimOptions::resolve(
        FileConfig::default(),
        common.into(),
        relay,
        services,
        vec![],
        false,
        vec![],
    )
}

/// `ferry-shim tahoe client`.
async fn tahoe_client(args: TahoeArgs) -> anyhow::Result<()> {
    let TahoeArgs {
        node_dir,
        relay,
        dry_run,
        common,
    } = args;
    read_tahoe_cfg(&node_dir)?;
    let opts = tahoe_options(common, relay, vec![])?;
    if opts.memberships.memberships.is_empty() {
        anyhow::bail!(
            "this node is no grid member: only a relay's grid members learn which servers are members' public ports; run `ferry-shim join CODE` with an invite code from the relay's operator first"
        );
    }
    let shim = start_shim(opts).await?;
    let client = ferry_shim::tahoe_client::TahoeClient::new(shim.core.clone(), node_dir, dry_run);
    if dry_run {
        return client.run().await;
    }
    tokio::spawn(client.run());
    shim.run().await
}

/// `ferry-shim tahoe serve`.
async fn tahoe_serve(args: TahoeArgs) -> anyhow::Result<()> {
    let TahoeArgs {
        node_dir,
        relay,
        dry_run,
        common,
    } = args;
    use ferry_shim::tahoe::{self, Change};
    let cfg_path = node_dir.join("tahoe.cfg");
    let read_cfg = || read_tahoe_cfg(&node_dir);
    let text = read_cfg()?;
    if tahoe::get_config(&text, "storage", "enabled").is_some_and(|v| v != "true") {
        eprintln!(
            "note: {} says [storage] enabled = false; the node serves no storage until it is true",
            cfg_path.display()
        );
    }
    let (port, _) = tahoe::serve_config(&text, &cfg_path, None)?;
    let service = options::parse_service(&format!("storage=127.0.0.1:{port}"), true)?;
    let mut opts = tahoe_options(common, relay, vec![service])?;
    // Grid members reach the storage over the overlay when this node is one.
    opts.allow_grid = !opts.memberships.memberships.is_empty();
    let shim = start_shim(opts).await?;
    let public = loop {
        if let Some(public) = shim
            .core
            .service_statuses()
            .into_iter()
            .find_map(|s| s.public)
        {
            break public;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Read again: the user may have edited it while the relay answered.
    let text = read_cfg()?;
    let (_, wanted) = tahoe::serve_config(&text, &cfg_path, Some(&public))?;
    match tahoe::replace_file(&cfg_path, &wanted, dry_run)? {
        Change::Unchanged => {
            println!("{} already announces {public}", cfg_path.display())
        }
        Change::Changed { diff, backup } => {
            print!("{diff}");
            if dry_run {
                println!("(dry run: {} not changed)", cfg_path.display());
                return Ok(());
            }
            let kept = backup
                .map(|b| format!(" (the old one is {})", b.display()))
                .unwrap_or_default();
            let done = format!(
                "changed {}{kept}; restart the Tahoe node (stop `tahoe run {}` and start it again) so that it listens on 127.0.0.1:{port} and announces {public}",
                cfg_path.display(),
                node_dir.display()
            );
            // Printed for the person who ran it, logged for a service's journal.
            println!("{done}");
            tracing::info!("{done}");
        }
    }
    if dry_run {
        return Ok(());
    }
    // Every Tahoe node is a client too: its connections to other members' storage
    // go on the overlay as well.
    if shim.core.opts.allow_grid {
        let client = ferry_shim::tahoe_client::TahoeClient::new(shim.core.clone(), node_dir, false);
        tokio::spawn(client.run());
    }
    shim.run().await
}

fn data_dir(common: &Common) -> PathBuf {
    common
        .data_dir
        .clone()
        .unwrap_or_else(|| ferry_proto::config::default_data_dir("ferry-shim"))
}

/// Starts the shim and prints its ready line (scripts and tests wait for it).
async fn start_shim(opts: ShimOptions) -> anyhow::Result<ferry_shim::shim::Shim> {
    let shim = ferry_shim::shim::start(opts).await?;
    println!(
        "ferry-shim ready node_id={} admin=http://{}",
        shim.core.node_id, shim.admin_addr
    );
    Ok(shim)
}

async fn run_shim(opts: ShimOptions) -> anyhow::Result<()> {
    start_shim(opts).await?.run().await
}

fn status(common: Common, json: bool) -> anyhow::Result<()> {
    let admin = common.admin.unwrap_or(
        options::DEFAULT_ADMIN
            .parse()
            .context("built-in admin address")?,
    );
    let token = ferry_proto::admin::load_token(common.admin_token_file.as_deref())?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut request = agent.get(format!("http://{admin}/api/status"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().with_context(|| {
        format!("cannot reach a running ferry-shim at http://{admin}; is it running, and is --admin right?")
    })?;
    let body: serde_json::Value = response
        .body_mut()
        .read_json()
        .with_context(|| format!("http://{admin}/api/status did not answer JSON"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let status: Status = serde_json::from_value(body).with_context(|| {
            format!(
                "the shim at http://{admin} answered a status this ferry-shim {} cannot read; \
                 is it the same version? (`--json` prints it as it is)",
                env!("CARGO_PKG_VERSION")
            )
        })?;
        print!("{}", status.to_text());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ferry_proto::config::init_logging();
    match cli.command {
        Command::Init { common } => {
            let path = data_dir(&common).join("node.key");
            let (key, created) = SecretKey::load_or_create(&path)?;
            if !created {
                eprintln!("a key already exists at {}; keeping it", path.display());
            }
            println!("{}", key.node_id());
        }
        Command::Id { common } => {
            let key = SecretKey::load(&data_dir(&common).join("node.key"))?;
            println!("{}", key.node_id());
        }
        Command::Expose {
            relay,
            service,
            public,
            allow,
            allow_any,
            allow_grid,
            common,
        } => {
            let services = service
                .iter()
                .map(|s| options::parse_service(s, public))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut flags: CommonFlags = common.into();
            flags.allow_grid = allow_grid;
            let opts = ShimOptions::resolve(
                FileConfig::default(),
                flags,
                relay,
                services,
                allow,
                allow_any,
                vec![],
            )?;
            run_shim(opts).await?;
        }
        Command::Connect {
            destination,
            listen,
            relay,
            common,
        } => {
            let (node, service) = options::parse_destination(&destination)?;
            let forward = ForwardConfig {
                node,
                service,
                listen,
            };
            let opts = ShimOptions::resolve(
                FileConfig::default(),
                common.into(),
                relay,
                vec![],
                vec![],
                false,
                vec![forward],
            )?;
            run_shim(opts).await?;
        }
        Command::Socks {
            listen,
            passthrough,
            relay,
            common,
        } => {
            let mut flags: CommonFlags = common.into();
            flags.socks = Some(listen);
            flags.socks_passthrough = passthrough;
            let opts = ShimOptions::resolve(
                FileConfig::default(),
                flags,
                relay,
                vec![],
                vec![],
                false,
                vec![],
            )?;
            run_shim(opts).await?;
        }
        Command::Join { code, common } => {
            let code: ferry_proto::grid::InviteCode = code.parse()?;
            let dir = data_dir(&common);
            ferry_proto::identity::create_private_dir(&dir)?;
            let (key, _) = SecretKey::load_or_create(&dir.join("node.key"))?;
            // The invite's relay is reached the way the mode says, as sessions are.
            let mode = common.mode.unwrap_or_default();
            if mode == Mode::Private {
                options::check_private_proxy(common.proxy.as_ref())?;
            }
            let route = ferry_shim::membership::JoinRoute {
                policy: ferry_shim::mode::Policy::new(mode, None),
                proxy: common.proxy.clone(),
            };
            let membership = ferry_shim::membership::join(&key, &dir, &code, &route).await?;
            println!(
                "node {} joined the grid of relay {} (membership until unix time {})",
                key.node_id(),
                membership.relay,
                membership.certificate.membership.expires
            );
            eprintln!(
                "next: ferry-shim expose --service NAME=HOST:PORT [--public] (no --relay needed)"
            );
        }
        Command::Run { config, common } => {
            let opts = ShimOptions::resolve(
                ferry_proto::config::load_toml(&config)?,
                common.into(),
                vec![],
                vec![],
                vec![],
                false,
                vec![],
            )?;
            run_shim(opts).await?;
        }
        Command::Tahoe(TahoeCommand::Serve(args)) => tahoe_serve(args).await?,
        Command::Tahoe(TahoeCommand::Client(args)) => tahoe_client(args).await?,
        Command::Status { json, common } => {
            tokio::task::spawn_blocking(move || status(common, json))
                .await
                .context("status task failed")??
        }
    }
    Ok(())
}
