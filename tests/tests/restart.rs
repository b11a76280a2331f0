//! Public ports are durable: after the relay is killed with SIGKILL and started again,
//! the same service is back on the same port within seconds, without touching the shim
//! (over QUIC, because the relay tells its last nodes it restarted; over TCP, because
//! the kernel resets the dead process's connections).

use std::time::{Duration, Instant};

use ferry_tests::*;

fn relay_restart_keeps_the_port(transport_proxy: bool) {
    let dir = TempDir::new(if transport_proxy {
        "restart-tcp"
    } else {
        "restart-quic"
    });
    let ports = if transport_proxy {
        "22210-22219"
    } else {
        "22200-22209"
    };
    let mut relay = Relay::start(dir.path(), ports);
    let echo = echo_server();
    // A second service registered first takes the first port, so the one we check is
    // not simply "the lowest port" again after the restart.
    let echo2 = echo_server();
    let url = if transport_proxy {
        let proxy = tcp_only_proxy(relay.listen_addr());
        url_with_port(&relay.url, proxy.port())
    } else {
        relay.url.clone()
    };
    let shim = Shim::start(
        dir.path(),
        "home",
        &[
            "expose",
            "--relay",
            &url,
            "--service",
            &format!("first={echo2}"),
            "--service",
            &format!("echo={echo}"),
            "--public",
        ],
    );
    let public = shim.public_addr("echo");
    assert_eq!(echo_once(public, b"before").unwrap(), b"before");
    assert!(relay.data_dir.join("ports.json").exists());

    // Let the link go quiet: the shim's start-up probing is over, and its next
    // session ping is seconds away (over QUIC only the relay's restart notice brings
    // it back within 5 s).
    std::thread::sleep(Duration::from_secs(4));
    eprintln!("T before kill {:?}", std::time::SystemTime::now());
    relay.proc.kill9();
    eprintln!("T after kill {:?}", std::time::SystemTime::now());
    assert!(
        echo_once(public, b"while down").is_err()
            || echo_once(public, b"x").unwrap_or_default().is_empty()
    );

    eprintln!("T before restart {:?}", std::time::SystemTime::now());
    relay.restart(dir.path());
    let back = Instant::now();
    wait_for(
        "the service on its old public port",
        Duration::from_secs(5),
        || (echo_once(public, b"after").ok()? == b"after").then_some(()),
    );
    println!(
        "service back {:?} after the relay restarted",
        back.elapsed()
    );
    assert_eq!(shim.public_addr("echo"), public, "the public port changed");
    if !transport_proxy {
        // Over QUIC the shim was told: its keepalives alone would take far longer.
        let log = relay.proc.log();
        assert!(
            log.contains("told 1 node address(es) of the last run that this relay restarted"),
            "{log}"
        );
    }
    assert_eq!(shim.public_addr("first").port() + 1, public.port());
}

#[test]
fn sigkilled_relay_gives_the_same_public_port_back_within_5s_over_quic() {
    relay_restart_keeps_the_port(false);
}

#[test]
fn sigkilled_relay_gives_the_same_public_port_back_within_5s_over_tcp() {
    relay_restart_keeps_the_port(true);
}
