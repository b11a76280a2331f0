//! Port mapping in p2p mode (issue #6), against Debian's `miniupnpd` (UPnP-IGD,
//! NAT-PMP and PCP) on a lab NAT router. A node behind a port-preserving Linux NAT and
//! a node behind a symmetric NAT stay relayed without help (`nat_matrix`'s
//! `masq_to_symmetric`); with the mapping the symmetric side reaches the mapped port
//! and the path goes direct. Each protocol maps, shows in status and is removed on
//! shutdown.
//!
//! miniupnpd refuses to forward ports when its WAN address is reserved, and the lab's
//! public addresses are benchmark space (198.18.0.0/15), so it is told another
//! external address with `ext_ip`. The shim pairs the mapped port with the address
//! the relay sees (see `node-shim/src/portmap.rs`), so nothing is ever sent to that
//! label; its forwarding rules match the WAN interface, not the address.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_tests::labrun::{Daemon, EchoLab, LabShim, transfer_and_go_direct};
use ferry_tests::netlab::{Lab, NatKind, skip_test};
use ferry_tests::wait_for;

/// Longest PCP lease miniupnpd grants here, in seconds: short, so a renewal happens
/// within the test (the shim renews at half the lease).
const PCP_LEASE: u64 = 12;

/// What miniupnpd reports as the router's external address (see the module docs).
const REPORTED_EXTERNAL: &str = "192.0.1.1";

fn start_miniupnpd(lab: &Lab, router: &str, dir: &Path) -> Daemon {
    // miniupnpd's nftables backend adds its rules to these chains (Debian's
    // nft_init.sh makes the same ones, but with a dropping forward policy).
    lab.nft(
        router,
        "table inet filter {\n\
           chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n\
           chain miniupnpd { }\n\
           chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n\
           chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }\n\
           chain prerouting_miniupnpd { }\n\
           chain postrouting_miniupnpd { }\n\
         }\n",
    )
    .expect("miniupnpd's tables");
    let conf = dir.join("miniupnpd.conf");
    std::fs::write(
        &conf,
        format!(
            "ext_ifname=wan\next_ip={REPORTED_EXTERNAL}\nlistening_ip=lan\nenable_natpmp=yes\n\
             enable_upnp=yes\nsecure_mode=yes\nuuid=3f3bd7a1-6e4c-4c36-9c41-6b2f3a0c9e51\n\
             min_lifetime=2\nmax_lifetime={PCP_LEASE}\n\
             allow 1024-65535 192.168.0.0/16 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
        ),
    )
    .expect("write miniupnpd.conf");
    Daemon::start(
        lab,
        router,
        "miniupnpd",
        &["-f", &conf.display().to_string(), "-d"],
        &dir.join("miniupnpd.log"),
    )
}

/// miniupnpd's port forwards on `router`, as nft shows them.
fn forwards(lab: &Lab, router: &str) -> String {
    lab.run(
        router,
        "nft",
        &["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
    )
    .expect("list miniupnpd's rules")
}

/// Waits until the shim shows a port mapping; returns it.
fn mapping(lab: &Lab, shim: &LabShim) -> serde_json::Value {
    wait_for("a port mapping", Duration::from_secs(20), || {
        let s = shim.status(lab);
        let m = &s["network"]["port_mapping"];
        (!m.is_null()).then(|| m.clone())
    })
}

fn server_config(dir: &Path, relay: &str, echo: SocketAddr, protocols: &str) -> String {
    let path = dir.join(format!(
        "server-{}.toml",
        protocols.replace(['"', ',', ' '], "")
    ));
    std::fs::write(
        &path,
        format!(
            "relays = [\"{relay}\"]\nallow_any = true\nport_mapping = [{protocols}]\n\n\
             [[service]]\nname = \"echo\"\ntarget = \"{echo}\"\n"
        ),
    )
    .expect("write config");
    path.display().to_string()
}

#[test]
fn a_mapped_port_turns_a_relayed_pair_direct_and_is_removed_on_shutdown() {
    let test = "a_mapped_port_turns_a_relayed_pair_direct_and_is_removed_on_shutdown";
    let have = ["/usr/sbin/miniupnpd", "/sbin/miniupnpd"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !have {
        skip_test(test, "needs miniupnpd (miniupnpd-nftables)");
        return;
    }
    let Some(net) = EchoLab::builder(test)
        .nats(NatKind::Masquerade, NatKind::Symmetric)
        .build()
    else {
        return;
    };
    let (lab, dir, echo) = (&net.lab, net.dir.path(), net.echo);
    let router = lab.router("server");
    let _miniupnpd = start_miniupnpd(lab, &router, dir);

    // Default: every protocol, PCP first.
    let config = server_config(dir, &net.url, echo, "\"pcp\", \"nat-pmp\", \"upnp\"");
    let mut server = LabShim::start(lab, "server", dir, "server", &["run", "--config", &config]);
    server.wait_ready(lab);
    let m = mapping(lab, &server);
    assert_eq!(m["protocol"], "pcp", "{m}");
    let external: SocketAddr = m["external"]
        .as_str()
        .expect("external")
        .parse()
        .expect("addr");
    assert_eq!(external.ip().to_string(), REPORTED_EXTERNAL);
    let mapped = SocketAddr::new(lab.wan_ip("server").into(), external.port());
    assert!(
        forwards(lab, &router).contains(&format!("dport {}", external.port())),
        "{}",
        forwards(lab, &router)
    );
    // The mapped port, on the address the relay sees, is a candidate from the mapping.
    let status = server.status(lab);
    let candidate = status["network"]["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .find(|c| c["addr"] == mapped.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{mapped} not among {status}"));
    assert!(
        candidate["sources"].to_string().contains("port_mapping"),
        "{candidate}"
    );

    let client = net.connect(&server);
    let (took, peer) =
        transfer_and_go_direct(lab, "client", &client, &server, "through the mapped port");
    assert_eq!(peer["remote_addr"], mapped.to_string(), "{peer}");
    println!("direct through the mapped port {mapped} after {took:?}");

    // The router granted a short lease: the shim renews it before it runs out, and
    // the same port stays mapped.
    let first_expiry = m["expires"].as_u64().expect("expiry");
    let renewed = wait_for("a renewal", Duration::from_secs(PCP_LEASE + 5), || {
        let m = mapping(lab, &server);
        (m["expires"].as_u64() > Some(first_expiry)).then_some(m)
    });
    assert_eq!(renewed["external"], m["external"], "{renewed}");
    assert!(
        forwards(lab, &router).contains(&format!("dport {}", external.port())),
        "the mapping lapsed"
    );

    // Shutdown removes the mapping.
    server.proc.terminate();
    wait_for("the mapping to be removed", Duration::from_secs(5), || {
        (!forwards(lab, &router).contains(&format!("dport {}", external.port()))).then_some(())
    });
    assert!(
        server.proc.log().contains("removed the port mapping"),
        "{}",
        server.proc.log()
    );

    // Each protocol on its own.
    for protocol in ["nat-pmp", "upnp"] {
        let config = server_config(dir, &net.url, echo, &format!("\"{protocol}\""));
        server = LabShim::start(lab, "server", dir, "server", &["run", "--config", &config]);
        let m = mapping(lab, &server);
        assert_eq!(m["protocol"], protocol, "{m}");
        let port: SocketAddr = m["external"]
            .as_str()
            .expect("external")
            .parse()
            .expect("addr");
        let rule = format!("dport {}", port.port());
        assert!(
            forwards(lab, &router).contains(&rule),
            "{protocol}: {}",
            forwards(lab, &router)
        );
        server.proc.terminate();
        wait_for(
            &format!("the {protocol} mapping to be removed"),
            Duration::from_secs(5),
            || (!forwards(lab, &router).contains(&rule)).then_some(()),
        );
    }
}
