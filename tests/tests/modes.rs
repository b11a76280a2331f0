//! Each mode's promise, proven from outside the shim (issue #6, SPEC §4): nft counters
//! on the lab's NAT router count every packet the shim's host sends, while the shim
//! serves a public port and the overlay and fails a peer connection.
//!
//! - strict: packets go to the configured relay's address and port and nowhere else;
//!   the refused peer connection is named in the log.
//! - private: with Debian's `dante-server` on the home router as the only way out and
//!   UDP dropped there, the node joins a grid with an invite and then works through
//!   the relay, the counters show zero UDP and nothing but the proxy; the relay's name
//!   is resolved by the proxy (only the router can resolve it). Stock curl fetches a page from the private node through
//!   another node's SOCKS door and through the relay's public port, sha256-identical.
//! - HTTP CONNECT: the same through Debian's `tinyproxy`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::labrun::{Daemon, EchoLab, LabRelay, LabShim, RELAY_PORT, echo_in, transfer_in};
use ferry_tests::netlab::{Lab, NatKind, skip_test};
use ferry_tests::{TempDir, http_file_server, pattern, sha256, wait_for};

/// A name for the relay that only the home router (where the proxy runs) can resolve.
const RELAY_NAME: &str = "relay.ferry-lab";

const SOCKS_PORT: u16 = 1080;
const HTTP_PROXY_PORT: u16 = 8888;

/// Bytes of the page the private node serves.
const PAGE: usize = 1 << 20;

fn have(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).exists())
}

fn relay_ip(url: &str) -> Ipv4Addr {
    let authority = url.rsplit('@').next().expect("relay url");
    let addr: SocketAddr = authority.parse().expect("relay address");
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => panic!("lab relays are IPv4"),
    }
}

fn wait_connected(lab: &Lab, shim: &LabShim) -> serde_json::Value {
    wait_for(
        &format!("the shim on {} to register", shim.host),
        Duration::from_secs(30),
        || {
            let s = shim.status(lab);
            (s["relays"][0]["state"] == "connected").then_some(s)
        },
    )
}

fn public_addr(lab: &Lab, shim: &LabShim, service: &str) -> SocketAddr {
    wait_for("a public port", Duration::from_secs(20), || {
        let s = shim.status(lab);
        s["services"]
            .as_array()?
            .iter()
            .find(|x| x["name"] == service)?["public"]
            .as_str()?
            .parse()
            .ok()
    })
}

fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, body).expect("write config");
    path
}

/// Stock curl inside `host`'s namespace; the body it fetched, or its error.
fn curl(lab: &Lab, host: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = lab
        .command(host, "curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .map_err(|e| format!("run curl: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "curl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A file under /etc/netns/<ns>/ that `ip netns exec` mounts over /etc/<name> for
/// processes started in that namespace; removed on drop.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn hosts(lab: &Lab, node: &str, lines: &str) -> NetnsEtc {
        let dir = Path::new("/etc/netns").join(lab.ns(node));
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{lines}"))
            .expect("write hosts");
        NetnsEtc(dir)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_listening(lab: &Lab, node: &str, addr: SocketAddr, what: &str, log: &Path) {
    let ok = lab
        .in_ns(node, move || {
            (0..100).any(|_| {
                let up =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok();
                if !up {
                    std::thread::sleep(Duration::from_millis(50));
                }
                up
            })
        })
        .expect("enter namespace");
    assert!(
        ok,
        "{what} did not listen on {addr}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn strict_mode_sends_only_to_its_relay_and_names_each_failure() {
    let test = "strict_mode_sends_only_to_its_relay_and_names_each_failure";
    let Some(net) = EchoLab::builder(test)
        .nat("home", NatKind::Masquerade, &["strict"])
        .nat("away", NatKind::FullCone, &["peer"])
        .public("client")
        .hosts("peer", "strict")
        .build()
    else {
        return;
    };
    let (lab, dir, relay) = (&net.lab, &net.dir, &net.relay);
    let relay_addr = relay_ip(&relay.url);

    // On the peer host: one node that lets anyone in, one that lets nobody in.
    let open = net.expose(&[]);
    let service = format!("echo={}", net.echo);
    let closed = LabShim::start(
        lab,
        "peer",
        dir.path(),
        "closed",
        &["expose", "--relay", &relay.url, "--service", &service],
    );
    wait_connected(lab, &closed);

    // Count everything the strict host sends past its LAN, from before it starts.
    let router = lab.router("strict");
    let host = lab.lan_ip("strict");
    lab.watch(
        &router,
        &[
            ("all", format!("ip saddr {host}")),
            (
                "to_relay",
                format!("ip saddr {host} ip daddr {relay_addr} th dport {RELAY_PORT}"),
            ),
            // IPv6 from the LAN other than neighbour discovery: none at all.
            (
                "ipv6",
                "iifname \"lan\" meta nfproto ipv6 meta l4proto != ipv6-icmp".to_string(),
            ),
        ],
    )
    .expect("install counters");

    let echo = echo_in(lab, "strict");
    let config = write_config(
        dir.path(),
        "strict",
        &format!(
            "mode = \"strict\"\nrelays = [\"{}\"]\n\n[[service]]\nname = \"echo\"\ntarget = \"{echo}\"\npublic = true\n\n\
             [[forward]]\nto = \"{}/echo\"\nlisten = \"127.0.0.1:0\"\n\n[[forward]]\nto = \"{}/echo\"\nlisten = \"127.0.0.1:0\"\n",
            relay.url, open.node_id, closed.node_id
        ),
    );
    let strict = LabShim::start(
        lab,
        "strict",
        dir.path(),
        "strict",
        &["run", "--config", &config.display().to_string()],
    );
    let status = wait_connected(lab, &strict);
    assert_eq!(status["mode"], "strict", "{status}");
    let forbids = status["forbids"].to_string();
    for what in ["address discovery", "hole punching", "port mapping"] {
        assert!(forbids.contains(what), "{forbids}");
    }
    assert_eq!(
        status["network"]["candidates"],
        serde_json::json!([]),
        "strict mode found addresses by itself: {status}"
    );
    // `ferry-shim status` says the same to a person.
    let shown = lab
        .run(
            "strict",
            &ferry_tests::bin("ferry-shim").display().to_string(),
            &["status", "--admin", &strict.admin.to_string()],
        )
        .expect("ferry-shim status");
    assert!(
        shown.contains("mode strict (forbids: ") && shown.contains("hole punching"),
        "{shown}"
    );

    // A public-port connection from a stock client and an overlay connection work.
    let public = public_addr(lab, &strict, "echo");
    let (sent, received, n) = transfer_in(lab, "client", public, 1, 256 * 1024);
    assert_eq!((sent, n), (received, 256 * 1024), "public port");
    let forwards = status["forwards"].as_array().expect("forwards").clone();
    let forward_to = |node: &str| -> SocketAddr {
        forwards
            .iter()
            .find(|f| f["to"].as_str().is_some_and(|t| t.starts_with(node)))
            .and_then(|f| f["listen"].as_str())
            .and_then(|a| a.parse().ok())
            .expect("forward listed")
    };
    let (sent, received, n) = transfer_in(lab, "strict", forward_to(&open.node_id), 2, 1 << 20);
    assert_eq!((sent, n), (received, 1 << 20), "overlay");
    // The open peer asks for a hole punch (it is in p2p mode) and the rendezvous
    // hands it to both nodes; strict mode ignores it and stays relayed. Both sides
    // show it: the strict node logs that it ignored the punch, and the open peer's
    // attempt ends unanswered. Only after that does "still relayed" mean anything.
    let ignored = format!(
        "ignored a hole punch from node {}: hole punching is off in strict mode",
        open.node_id
    );
    wait_for(
        "the strict node to ignore the open peer's hole punch",
        Duration::from_secs(20),
        || strict.proc.log().contains(&ignored).then_some(()),
    );
    let unanswered = "ferry_shim_punch_attempts_total{outcome=\"no_response\"}";
    wait_for(
        "the open peer's punch attempt to go unanswered",
        Duration::from_secs(20),
        || (open.metric(lab, unanswered) >= 1.0).then_some(()),
    );
    let direct = "ferry_shim_punch_attempts_total{outcome=\"direct\"}";
    assert_eq!(open.metric(lab, direct), 0.0, "{}", open.proc.log());
    let peer = strict.peer(lab, &open.node_id).expect("peer in status");
    assert_eq!(peer["path"], "relayed", "{peer}");
    let peer = open.peer(lab, &strict.node_id).expect("peer in status");
    assert_eq!(peer["path"], "relayed", "{peer}");

    // The refused connection: the log says why.
    let refused = forward_to(&closed.node_id);
    let carried = lab
        .in_ns("strict", move || {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect(refused).expect("connect to the forward");
            tcp.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let _ = tcp.write_all(b"hello");
            let mut got = Vec::new();
            let _ = tcp.read_to_end(&mut got);
            got.len()
        })
        .expect("enter namespace");
    assert_eq!(carried, 0, "a node that allows nobody carried bytes");
    let log = wait_for("the refusal in the log", Duration::from_secs(10), || {
        let log = strict.proc.log();
        log.contains("is not allowed to connect").then_some(log)
    });
    assert!(log.contains(&closed.node_id), "{log}");

    let counts = lab.packets(&router).expect("count");
    let (all, to_relay) = (counts["all"], counts["to_relay"]);
    assert_eq!(counts["ipv6"], 0, "{counts:?}");
    println!("strict host: {all} packets past its LAN, {to_relay} to {relay_addr}:{RELAY_PORT}");
    assert!(
        to_relay > 100,
        "the session itself was not counted: {to_relay}"
    );
    assert_eq!(
        all,
        to_relay,
        "strict mode sent {} packets to something other than its relay; log:\n{}",
        all - to_relay,
        strict.proc.log()
    );
}

/// What a proxied node's test needs running: the lab, the relay, the proxied node
/// serving a page (public port and overlay), and a p2p node with a SOCKS door.
struct Proxied {
    lab: Lab,
    _dir: TempDir,
    _relay: LabRelay,
    node: LabShim,
    door: LabShim,
    page: Vec<u8>,
    router: String,
    _daemon: Daemon,
    _hosts: NetnsEtc,
}

/// Builds the lab for a node at `home` that reaches out only through a proxy on its
/// router: `proxy(lab, router, gateway, dir)` starts the proxy and returns the child,
/// its URL and its port. The router forwards nothing from the node's host; counters
/// `all`, `udp`, `tcp` and `to_proxy` count what the host sends.
/// With `grid`, the relay admits only grid members: both nodes first redeem an
/// invite with `ferry-shim join`, the proxied one through the proxy (with
/// `node_args`, e.g. its mode).
fn proxied(
    test: &str,
    start_proxy: impl Fn(&Lab, &str, Ipv4Addr, &Path) -> (Daemon, String, u16),
    node_args: &[&str],
    grid: bool,
) -> Option<Proxied> {
    let lab = Lab::builder(test)
        .relay("relay")
        .nat("home", NatKind::Masquerade, &["hidden"])
        .public("peer")
        .build()?;
    let dir = TempDir::new(test);
    let policy: &[&str] = if grid { &["--policy", "grid"] } else { &[] };
    let relay = LabRelay::start_args(&lab, "relay", dir.path(), policy);
    let relay_addr = relay_ip(&relay.url);
    let router = lab.router("hidden");
    let gateway = lab.gateway_ip("hidden");
    let hidden = lab.lan_ip("hidden");

    // Only the router can resolve the relay's name: the node must leave it to the
    // proxy (remote DNS).
    let hosts = NetnsEtc::hosts(&lab, &router, &format!("{relay_addr} {RELAY_NAME}\n"));
    let (daemon, proxy_url, proxy_port) = start_proxy(&lab, &router, gateway, dir.path());
    lab.nft(
        &router,
        &format!(
            "table inet ferry_only_proxy {{\n  chain noforward {{\n    type filter hook forward priority filter - 5; policy accept;\n    \
             ip saddr {hidden} drop\n  }}\n}}\n"
        ),
    )
    .expect("block forwarding");
    lab.watch(
        &router,
        &[
            ("all", format!("ip saddr {hidden}")),
            ("udp", format!("ip saddr {hidden} meta l4proto udp")),
            ("tcp", format!("ip saddr {hidden} meta l4proto tcp")),
            (
                "to_proxy",
                format!("ip saddr {hidden} ip daddr {gateway} tcp dport {proxy_port}"),
            ),
            (
                "udp6",
                "iifname \"lan\" meta nfproto ipv6 meta l4proto udp".to_string(),
            ),
        ],
    )
    .expect("install counters");

    let page = pattern(0x5eed, PAGE);
    let web = lab
        .in_ns("hidden", {
            let page = page.clone();
            move || http_file_server(page)
        })
        .expect("enter namespace");
    let relay_id = relay.url.trim_start_matches("ferry://");
    let relay_id = relay_id.split('@').next().expect("relay id");
    let named_relay = format!("ferry://{relay_id}@{RELAY_NAME}:{RELAY_PORT}");
    let service = format!("web={web}");
    let mut args = vec![
        "expose",
        "--relay",
        &named_relay,
        "--service",
        &service,
        "--public",
        "--allow-any",
        "--proxy",
        &proxy_url,
    ];
    args.extend_from_slice(node_args);
    if grid {
        let mut join = vec!["--proxy", &proxy_url];
        join.extend_from_slice(node_args);
        relay.join(&lab, "hidden", dir.path(), "hidden", &join);
        relay.join(&lab, "peer", dir.path(), "door", &[]);
    }
    let node = LabShim::start(&lab, "hidden", dir.path(), "hidden", &args);
    let status = wait_connected(&lab, &node);
    assert_eq!(status["relays"][0]["transport"], "tcp", "{status}");
    assert_eq!(
        status["relays"][0]["remote_addr"],
        format!("{gateway}:{proxy_port}"),
        "the relay link does not run through the proxy: {status}"
    );

    let door = LabShim::start(
        &lab,
        "peer",
        dir.path(),
        "door",
        &["socks", "--listen", "127.0.0.1:0", "--relay", &relay.url],
    );
    wait_connected(&lab, &door);
    Some(Proxied {
        lab,
        _dir: dir,
        _relay: relay,
        node,
        door,
        page,
        router,
        _daemon: daemon,
        _hosts: hosts,
    })
}

impl Proxied {
    /// Stock curl on the peer host fetches the node's page through the relay's public
    /// port and through the SOCKS door, both sha256-identical.
    fn fetch_both_ways(&self) {
        let lab = &self.lab;
        let public = public_addr(lab, &self.node, "web");
        let body = curl(lab, "peer", &[&format!("http://{public}/page")]).expect("public port");
        assert_eq!(
            sha256(&body),
            sha256(&self.page),
            "public port page differs"
        );

        let socks = self.door.status(lab)["socks"]
            .as_str()
            .expect("socks address in status")
            .to_string();
        let url = format!("http://web.{}.ferry/page", self.node.node_id);
        let body = curl(lab, "peer", &["--socks5-hostname", &socks, &url]).unwrap_or_else(|e| {
            panic!(
                "{e}\ndoor log:\n{}\nnode log:\n{}",
                self.door.proc.log(),
                self.node.proc.log()
            )
        });
        assert_eq!(sha256(&body), sha256(&self.page), "SOCKS door page differs");
        // NODE_ID.ferry is the node's default (first) service: the same page.
        let url = format!("http://{}.ferry/page", self.node.node_id);
        let body =
            curl(lab, "peer", &["--socks5-hostname", &socks, &url]).expect("default service");
        assert_eq!(
            sha256(&body),
            sha256(&self.page),
            "default service page differs"
        );
        let peer = self
            .door
            .peer(lab, &self.node.node_id)
            .expect("peer in status");
        assert_eq!(peer["path"], "relayed", "{peer}");

        // Names outside .ferry are refused by a door without passthrough.
        let err = curl(
            lab,
            "peer",
            &["--socks5-hostname", &socks, "http://example.com/"],
        )
        .expect_err("the door passed example.com through");
        assert!(err.contains("SOCKS5"), "{err}");
        assert!(
            self.door.metric(
                lab,
                "ferry_shim_streams_total{kind=\"socks\",outcome=\"refused\"}"
            ) >= 1.0
        );
    }

    fn packets(&self) -> std::collections::BTreeMap<String, u64> {
        self.lab.packets(&self.router).expect("count")
    }
}

/// Writes `conf` to `<dir>/<program>.conf`, starts `program` on `router` with
/// `flags` before the config file's path, waits until it listens on
/// `gateway:port`, and returns it with its URL (`scheme://gateway:port`) and port.
fn start_proxy(
    lab: &Lab,
    router: &str,
    dir: &Path,
    (program, flags, conf): (&str, &[&str], String),
    (scheme, gateway, port): (&str, Ipv4Addr, u16),
) -> (Daemon, String, u16) {
    let path = dir.join(format!("{program}.conf"));
    std::fs::write(&path, conf).expect("write the proxy's config");
    let log = dir.join(format!("{program}.log"));
    let path = path.display().to_string();
    let mut args = flags.to_vec();
    args.push(&path);
    let child = Daemon::start(lab, router, program, &args, &log);
    let addr = SocketAddr::from((gateway, port));
    wait_listening(lab, router, addr, program, &log);
    (child, format!("{scheme}://{addr}"), port)
}

fn start_dante(lab: &Lab, router: &str, gateway: Ipv4Addr, dir: &Path) -> (Daemon, String, u16) {
    let conf = format!(
        "logoutput: stderr\ninternal: {gateway} port = {SOCKS_PORT}\nexternal: wan\n\
         clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
         client pass {{ from: 192.168.0.0/16 to: 0.0.0.0/0 }}\n\
         socks pass {{ from: 192.168.0.0/16 to: 0.0.0.0/0 command: connect }}\n"
    );
    let daemon = ("danted", &["-N", "1", "-f"][..], conf);
    start_proxy(lab, router, dir, daemon, ("socks5", gateway, SOCKS_PORT))
}

fn start_tinyproxy(
    lab: &Lab,
    router: &str,
    gateway: Ipv4Addr,
    dir: &Path,
) -> (Daemon, String, u16) {
    let conf = format!(
        "User nobody\nGroup nogroup\nPort {HTTP_PROXY_PORT}\nListen {gateway}\nTimeout 600\n\
         Allow 192.168.0.0/16\nConnectPort {RELAY_PORT}\nMaxClients 100\nLogLevel Info\n"
    );
    let daemon = ("tinyproxy", &["-d", "-c"][..], conf);
    start_proxy(lab, router, dir, daemon, ("http", gateway, HTTP_PROXY_PORT))
}

#[test]
fn private_mode_goes_only_through_socks5_and_sends_no_udp() {
    let test = "private_mode_goes_only_through_socks5_and_sends_no_udp";
    if !have("danted") || !have("curl") {
        skip_test(test, "needs danted (dante-server) and curl");
        return;
    }
    let Some(p) = proxied(test, start_dante, &["--mode", "private"], true) else {
        return;
    };
    let status = p.node.status(&p.lab);
    assert_eq!(status["mode"], "private", "{status}");
    assert!(
        status["forbids"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("UDP"),
        "{status}"
    );
    assert_eq!(status["network"]["candidates"], serde_json::json!([]));
    p.fetch_both_ways();

    let counts = p.packets();
    let (all, udp, to_proxy) = (counts["all"], counts["udp"], counts["to_proxy"]);
    assert_eq!(
        counts["udp6"], 0,
        "private mode sent UDP over IPv6: {counts:?}"
    );
    println!("private host: {all} packets past its LAN, {udp} UDP, {to_proxy} to the proxy");
    assert_eq!(udp, 0, "private mode sent UDP; log:\n{}", p.node.proc.log());
    assert!(to_proxy > 100, "{to_proxy}");
    assert_eq!(
        all,
        to_proxy,
        "private mode sent packets past the proxy; log:\n{}",
        p.node.proc.log()
    );
}

#[test]
fn an_http_connect_proxy_carries_the_relay_link() {
    let test = "an_http_connect_proxy_carries_the_relay_link";
    if !have("tinyproxy") || !have("curl") {
        skip_test(test, "needs tinyproxy and curl");
        return;
    }
    let Some(p) = proxied(test, start_tinyproxy, &[], false) else {
        return;
    };
    p.fetch_both_ways();
    let counts = p.packets();
    let (tcp, to_proxy) = (counts["tcp"], counts["to_proxy"]);
    println!("proxied host (p2p mode): {counts:?}");
    assert!(to_proxy > 100, "{to_proxy}");
    assert_eq!(tcp, to_proxy, "TCP went around the proxy");
}
