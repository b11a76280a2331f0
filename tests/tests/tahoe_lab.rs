//! Stock Tahoe-LAFS 1.20 on both sides of the NAT lab (issue #18): a storage node
//! behind one Linux masquerade NAT with `ferry-shim tahoe serve`, a client behind
//! another with `ferry-shim tahoe client`, both grid members by invite, the relay on
//! the public core with `--policy grid` and the introducer on a public host of its
//! own. The client's shim learns from the relay that the announced server is a
//! member's public port, writes servers.yaml to point Tahoe at an overlay forward,
//! and shares go straight between the two NATs:
//!
//! - with the HTTPS storage protocol and again with `force_foolscap = true`, an
//!   8 MiB file goes up and comes back SHA-256 identical while nft counters on the
//!   relay host see under 5 % of the file's bytes, and the client's shim shows the
//!   storage node `direct`;
//! - a member revoked at the relay is cut off from the storage node within 5 s
//!   (measured and printed), and its Tahoe client can no longer get the file;
//! - with UDP between the two NATs blocked, the same file still goes up and comes
//!   back identical, over the relayed overlay;
//! - in strict mode (both shims `--mode strict`, no `--punch`) the file goes through
//!   the relayed overlay and the client's host sends no UDP to anything but the
//!   relay (nft counters on its NAT router): no punching, no STUN elsewhere.
//!
//! A stock client without a shim using the public port is `tahoe.rs`; a non-member's
//! refusal on both sides' status is `grid_access.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::labrun::{Daemon, LabRelay, LabShim};
use ferry_tests::netlab::{CORE, Lab, NatKind};
use ferry_tests::{TempDir, introducer_furl, pattern, sha256, tahoe, tahoe_create, wait_for};

const INTRODUCER_PORT: u16 = 3458;
const STORAGE_PORT: u16 = 3457;
/// The file each transfer moves.
const FILE_BYTES: usize = 8 << 20;

/// The lab with a grid relay, an introducer, and a stock storage node and client,
/// each node beside its shim; the client's Tahoe already restarted onto the
/// servers.yaml its shim wrote.
struct TahoeGrid {
    lab: Lab,
    dir: TempDir,
    tahoe: PathBuf,
    relay: LabRelay,
    _introducer: Daemon,
    _storage: Daemon,
    storage_shim: LabShim,
    client_shim: LabShim,
    /// The client shim's arguments, to start it again.
    client_args: Vec<String>,
    client: Option<Daemon>,
}

impl TahoeGrid {
    /// With `block_direct`, UDP between the two NAT sites is dropped on the core from
    /// the start, so the overlay can only be relayed. `shim_flags` go to both shims.
    fn start(test: &str, block_direct: bool, shim_flags: &[&str]) -> Option<TahoeGrid> {
        let tahoe = tahoe()?;
        let lab = Lab::builder(test)
            .relay("relay")
            .public("intro")
            .nat("west", NatKind::Masquerade, &["storage"])
            .nat("east", NatKind::Masquerade, &["client"])
            .build()?;
        if block_direct {
            let _for_the_whole_test = lab
                .block_udp(CORE, lab.wan_ip("storage"), lab.wan_ip("client"))
                .expect("block UDP between the sites");
        }
        let dir = TempDir::new(test);
        let relay = LabRelay::start_args(&lab, "relay", dir.path(), &["--policy", "grid"]);
        let tahoe_ok = |host: &str, args: &[&str]| {
            let program = tahoe.display().to_string();
            lab.run(host, &program, args)
                .unwrap_or_else(|e| panic!("tahoe {args:?} on {host}: {e}"))
        };
        let path = |name: &str| dir.path().join(name).display().to_string();

        let intro_ip = lab.lan_ip("intro");
        tahoe_ok(
            "intro",
            &[
                "create-introducer",
                "--listen=tcp",
                &format!("--port=tcp:{INTRODUCER_PORT}"),
                &format!("--location=tcp:{intro_ip}:{INTRODUCER_PORT}"),
                &path("introducer"),
            ],
        );
        let introducer = run_node(&lab, &tahoe, dir.path(), "intro", "introducer");
        let furl = introducer_furl(&dir.path().join("introducer"));

        // The storage node: a member whose shim exposes its storage port.
        let args = tahoe_create(
            &furl,
            "storage",
            Some(STORAGE_PORT),
            &[],
            &dir.path().join("storage"),
        );
        tahoe_ok(
            "storage",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        relay.join(&lab, "storage", dir.path(), "storage-shim", &[]);
        let storage_dir = path("storage");
        let mut args = vec!["tahoe", "serve", &storage_dir, "--relay", &relay.url];
        args.extend_from_slice(shim_flags);
        let storage_shim = LabShim::start(&lab, "storage", dir.path(), "storage-shim", &args);
        let cfg = dir.path().join("storage/tahoe.cfg");
        wait_for("tub.location set", Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&cfg).ok()?;
            text.contains(&format!("tub.location = tcp:{}:", lab.relay_ip()))
                .then_some(())
        });
        let storage = run_node(&lab, &tahoe, dir.path(), "storage", "storage");

        // The client: it hears of the storage node from the introducer, then its
        // shim points it at a forward and it restarts onto it.
        let args = tahoe_create(&furl, "client", None, &[], &dir.path().join("client"));
        tahoe_ok(
            "client",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let client = run_node(&lab, &tahoe, dir.path(), "client", "client");
        let cache = dir
            .path()
            .join("client/private/introducer_default_cache.yaml");
        wait_for(
            "the client to hear of the storage server",
            Duration::from_secs(60),
            || {
                let text = std::fs::read_to_string(&cache).ok()?;
                text.contains("anonymous-storage-NURLs").then_some(())
            },
        );
        relay.join(&lab, "client", dir.path(), "client-shim", &[]);
        let client_dir = path("client");
        let servers = dir.path().join("client/private/servers.yaml");
        // A dry run shows the entry it would write and writes nothing.
        let shim_bin = ferry_tests::bin("ferry-shim").display().to_string();
        let mut args = vec!["tahoe", "client", &client_dir, "--dry-run"];
        args.extend_from_slice(shim_flags);
        let data = path("client-shim");
        args.extend(["--data-dir", &data, "--admin", "127.0.0.1:0"]);
        let shown = lab
            .run("client", &shim_bin, &args)
            .expect("ferry-shim tahoe client --dry-run");
        assert!(
            shown.contains("+    ferry:") && shown.contains("(dry run"),
            "{shown}"
        );
        assert!(!servers.exists(), "a dry run wrote servers.yaml");
        let mut args = vec!["tahoe", "client", &client_dir];
        args.extend_from_slice(shim_flags);
        let client_shim = LabShim::start(&lab, "client", dir.path(), "client-shim", &args);
        let client_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        wait_for("servers.yaml written", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&servers).ok()?;
            text.contains("ferry:").then_some(())
        });
        wait_for("the shim to say restart", Duration::from_secs(5), || {
            client_shim
                .proc
                .log()
                .contains("restart the Tahoe node")
                .then_some(())
        });
        let text = std::fs::read_to_string(&servers).unwrap();
        assert!(
            text.contains("@127.0.0.1:") && !text.contains(&lab.relay_ip().to_string()),
            "servers.yaml must point only at the forward:\n{text}"
        );
        let mut grid = TahoeGrid {
            lab,
            dir,
            tahoe,
            relay,
            _introducer: introducer,
            _storage: storage,
            storage_shim,
            client_shim,
            client_args,
            client: Some(client),
        };
        grid.restart_client();
        Some(grid)
    }

    fn restart_client(&mut self) {
        drop(self.client.take());
        self.client = Some(run_node(
            &self.lab,
            &self.tahoe,
            self.dir.path(),
            "client",
            "client",
        ));
    }

    /// Stops the client's shim and starts it again with the same arguments.
    fn restart_client_shim(&mut self) {
        self.client_shim.proc.terminate();
        let args: Vec<&str> = self.client_args.iter().map(String::as_str).collect();
        self.client_shim =
            LabShim::start(&self.lab, "client", self.dir.path(), "client-shim", &args);
    }

    fn client_dir(&self) -> String {
        self.dir.path().join("client").display().to_string()
    }

    /// `tahoe put` then `tahoe get` of a fresh 8 MiB file from the client; panics
    /// unless the bytes come back identical. The put waits for the client to reach
    /// the server. Returns the file's capability.
    fn put_and_get(&self, seed: u64) -> String {
        let data = pattern(seed, FILE_BYTES);
        let file = self.dir.path().join(format!("file-{seed}.bin"));
        std::fs::write(&file, &data).unwrap();
        let client_dir = self.client_dir();
        let tahoe = self.tahoe.display().to_string();
        let file_arg = file.display().to_string();
        let cap = wait_for("an upload", Duration::from_secs(90), || {
            let out = self
                .lab
                .run(
                    "client",
                    "timeout",
                    &["120", &tahoe, "-d", &client_dir, "put", &file_arg],
                )
                .ok()?;
            out.lines()
                .map(str::trim)
                .find(|l| l.starts_with("URI:"))
                .map(str::to_string)
        });
        let back = self.dir.path().join(format!("back-{seed}.bin"));
        let back_arg = back.display().to_string();
        self.lab
            .run(
                "client",
                "timeout",
                &["120", &tahoe, "-d", &client_dir, "get", &cap, &back_arg],
            )
            .unwrap_or_else(|e| panic!("tahoe get: {e}"));
        assert_eq!(
            sha256(&std::fs::read(&back).unwrap()),
            sha256(&data),
            "the file came back different"
        );
        cap
    }

    /// Bytes that entered the relay host so far (every IPv4 packet, headers
    /// included), from the nft counter `watch_relay` set up.
    fn relay_bytes(&self) -> u64 {
        self.lab.bytes("relay").expect("relay host counters")["all"]
    }

    fn watch_relay(&self) {
        self.lab
            .watch("relay", &[("all", "meta nfproto ipv4".to_string())])
            .expect("count the relay host's traffic");
    }

    /// Waits until the client's shim has a direct path to the storage node.
    fn wait_direct(&self, what: &str) {
        wait_for(
            &format!("{what}: a direct path to the storage node"),
            Duration::from_secs(40),
            || (self.path_to_storage().as_deref() == Some("direct")).then_some(()),
        );
    }

    /// One measured transfer: the file up and back, the relay host's share of it
    /// printed and held under 5 %, the path still direct.
    fn transfer_direct(&self, what: &str, seed: u64) -> String {
        self.wait_direct(what);
        let before = self.relay_bytes();
        let started = Instant::now();
        let cap = self.put_and_get(seed);
        let through_relay = self.relay_bytes() - before;
        let share = through_relay as f64 / FILE_BYTES as f64;
        eprintln!(
            "{what}: 8 MiB up and back in {:.1} s; the relay host saw {through_relay} bytes, {:.2} % of the file",
            started.elapsed().as_secs_f64(),
            share * 100.0
        );
        assert!(
            share < 0.05,
            "{what}: the relay host saw {through_relay} bytes ({:.1} % of the file)\nclient shim:\n{}",
            share * 100.0,
            self.client_shim.proc.log()
        );
        assert_eq!(
            self.path_to_storage().as_deref(),
            Some("direct"),
            "{what}: the path after the transfer"
        );
        cap
    }

    /// The client shim's path to the storage node, once it has one.
    fn path_to_storage(&self) -> Option<String> {
        let peer = self
            .client_shim
            .peer(&self.lab, &self.storage_shim.node_id)?;
        peer["path"].as_str().map(str::to_string)
    }
}

/// `tahoe run NODEDIR` on `host`, kept running though it has no stdin.
fn run_node(lab: &Lab, tahoe: &Path, dir: &Path, host: &str, name: &str) -> Daemon {
    let node = dir.join(name).display().to_string();
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    Daemon::start(
        lab,
        host,
        &tahoe.display().to_string(),
        &["run", "--allow-stdin-close", &node],
        &dir.join(format!("tahoe-{name}-{n}.log")),
    )
}

#[test]
fn tahoe_shares_go_direct_between_two_nats_and_a_revoked_member_is_cut_off() {
    let Some(mut grid) = TahoeGrid::start("tahoe-direct", false, &[]) else {
        return;
    };
    grid.watch_relay();
    grid.transfer_direct("HTTPS storage protocol", 1);

    // The same through Foolscap: the FURL's only hint is the forward as well.
    let cfg = grid.dir.path().join("client/tahoe.cfg");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("[client]\n"), "{text}");
    std::fs::write(
        &cfg,
        text.replacen("[client]\n", "[client]\nforce_foolscap = true\n", 1),
    )
    .unwrap();
    grid.restart_client();
    let cap = grid.transfer_direct("Foolscap (force_foolscap = true)", 2);

    // A restarted client shim carries the server through the same forward again:
    // servers.yaml stays as it was, so the running Tahoe needs no restart and still
    // gets the file.
    let servers = grid.dir.path().join("client/private/servers.yaml");
    let written = std::fs::read_to_string(&servers).unwrap();
    grid.restart_client_shim();
    wait_for(
        "the restarted shim to carry the server",
        Duration::from_secs(20),
        || {
            grid.client_shim
                .proc
                .log()
                .contains("is carried over the overlay")
                .then_some(())
        },
    );
    assert_eq!(
        std::fs::read_to_string(&servers).unwrap(),
        written,
        "a restarted shim rewrote servers.yaml"
    );
    assert!(
        !grid
            .client_shim
            .proc
            .log()
            .contains("restart the Tahoe node"),
        "{}",
        grid.client_shim.proc.log()
    );
    let again = grid.dir.path().join("after-shim-restart.bin");
    let tahoe = grid.tahoe.display().to_string();
    let client_dir = grid.client_dir();
    let again_arg = again.display().to_string();
    wait_for(
        "a download through the restarted shim",
        Duration::from_secs(60),
        || {
            grid.lab
                .run(
                    "client",
                    "timeout",
                    &["60", &tahoe, "-d", &client_dir, "get", &cap, &again_arg],
                )
                .ok()
        },
    );
    assert_eq!(
        std::fs::read(&again).unwrap().len(),
        FILE_BYTES,
        "the download after the shim's restart"
    );

    // Revoked at the relay: the storage node's shim drops the client within 5 s, and
    // the client's Tahoe can no longer fetch the file through Ferry.
    let client_id = grid.client_shim.node_id.clone();
    let revoked_at = Instant::now();
    let answer = grid.relay.post_admin(
        &grid.lab,
        "/api/policy",
        serde_json::json!({"action": "revoke", "node": client_id}),
    );
    assert!(answer["lists"]["revoked"].is_array(), "{answer}");
    wait_for(
        "the storage node to drop the revoked client",
        Duration::from_secs(5),
        || {
            grid.storage_shim
                .peer(&grid.lab, &client_id)
                .is_none()
                .then_some(())
        },
    );
    eprintln!(
        "revocation: the storage node's shim dropped the revoked member {} ms after the relay's policy change",
        revoked_at.elapsed().as_millis()
    );
    let back = grid.dir.path().join("after-revocation.bin");
    let got = grid.lab.run(
        "client",
        "timeout",
        &[
            "120",
            &tahoe,
            "-d",
            &client_dir,
            "get",
            &cap,
            &back.display().to_string(),
        ],
    );
    assert!(
        got.is_err(),
        "the revoked member's Tahoe still got the file: {got:?}"
    );
}

#[test]
fn tahoe_shares_take_the_relayed_overlay_when_udp_between_the_nats_is_blocked() {
    let Some(grid) = TahoeGrid::start("tahoe-relayed", true, &[]) else {
        return;
    };
    grid.put_and_get(3);
    assert_eq!(
        grid.path_to_storage().as_deref(),
        Some("relayed"),
        "with UDP between the sites blocked the overlay is relayed"
    );
    let carried = grid.storage_shim.metric(
        &grid.lab,
        "ferry_shim_bytes_total{direction=\"in\",path=\"overlay\"}",
    );
    assert!(
        carried >= FILE_BYTES as f64,
        "the storage node's shim carried {carried} bytes in over the overlay"
    );
}

#[test]
fn tahoe_in_strict_mode_stays_on_the_relays_it_was_given() {
    let Some(grid) = TahoeGrid::start("tahoe-strict", false, &["--mode", "strict"]) else {
        return;
    };
    let router = grid.lab.router("client");
    let client = grid.lab.lan_ip("client");
    let relay = grid.lab.relay_ip();
    grid.lab
        .watch(
            &router,
            &[
                ("udp", format!("ip saddr {client} meta l4proto udp")),
                (
                    "udp_elsewhere",
                    format!("ip saddr {client} meta l4proto udp ip daddr != {relay}"),
                ),
            ],
        )
        .expect("count the client host's UDP");
    grid.put_and_get(4);
    assert_eq!(
        grid.path_to_storage().as_deref(),
        Some("relayed"),
        "strict mode without --punch never goes direct"
    );
    let counts = grid.lab.packets(&router).expect("counters");
    assert!(
        counts["udp"] > 0,
        "the client's shim sent no UDP: {counts:?}"
    );
    assert_eq!(
        counts["udp_elsewhere"], 0,
        "strict mode sent UDP to something other than its relay: {counts:?}"
    );
}
