//! IPv6 end to end in the NAT lab (issue #6): two hosts with only IPv6 addresses
//! register with a dual-stack relay over IPv6, find each other's IPv6 addresses, and
//! carry an overlay stream over a direct IPv6 path, bytes intact.

use std::net::SocketAddr;

use ferry_tests::labrun::{EchoLab, transfer_and_go_direct};

#[test]
fn an_ipv6_only_pair_connects_directly() {
    let test = "an_ipv6_only_pair_connects_directly";
    let Some(net) = EchoLab::builder(test)
        .public_v6_only("west")
        .public_v6_only("east")
        .hosts("west", "east")
        .relay_over_ipv6()
        .build()
    else {
        return;
    };
    let lab = &net.lab;
    // Really IPv6 only: no IPv4 address but loopback.
    for host in ["west", "east"] {
        let v4 = lab.run(host, "ip", &["-4", "-o", "addr"]).expect("ip addr");
        assert!(
            v4.lines().all(|l| l.contains(" lo ")),
            "{host} has IPv4: {v4}"
        );
    }
    let (server, client) = net.pair();

    let status = server.status(lab);
    assert_eq!(status["relays"][0]["transport"], "quic", "{status}");
    let observed: SocketAddr = status["relays"][0]["observed_addr"]
        .as_str()
        .expect("observed address")
        .parse()
        .expect("address");
    assert_eq!(observed.ip(), std::net::IpAddr::V6(lab.ipv6("west")));
    assert_eq!(status["network"]["nat"], "none", "{status}");

    let (took, peer) = transfer_and_go_direct(lab, "east", &client, &server, "IPv6 only");
    let remote: SocketAddr = peer["remote_addr"]
        .as_str()
        .expect("remote")
        .parse()
        .expect("addr");
    assert_eq!(
        remote.ip(),
        std::net::IpAddr::V6(lab.ipv6("west")),
        "{peer}"
    );
    println!("direct over IPv6 to {remote} after {took:?}");
}
