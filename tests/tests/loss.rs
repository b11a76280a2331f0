//! 5% random packet loss and reordering (issue #7's faults): nft on the lab's core
//! router drops 5% of all IPv4 packets crossing it, both ways — relay links,
//! public-port connections and direct paths alike — and of those it lets through,
//! holds back another 5% for 3 ms while the rest overtake them (`Lab::reorder`, an
//! NFQUEUE reorderer: the lab's kernel has no netem). Transfers over every path still
//! arrive SHA-256-identical, and the two nodes still punch a direct path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_tests::labrun::{EchoLab, time_to_direct, transfer_in};
use ferry_tests::netlab::{CORE, NatKind};

#[test]
fn transfers_over_every_path_survive_5_percent_loss_and_reordering_intact() {
    let Some(net) = EchoLab::builder("loss")
        .public("outside")
        .nats(NatKind::Masquerade, NatKind::Masquerade)
        .build()
    else {
        return;
    };
    let lab = &net.lab;
    let server = net.expose(&["--public"]);
    let public: SocketAddr = server.public_addr(lab);

    // From here on, 5% of everything crossing the core is lost, and 5% of the rest
    // is overtaken by what follows it.
    let _loss = lab.loss(CORE, 5).expect("loss on the core router");
    let reorderer = lab
        .reorder(CORE, 5, Duration::from_millis(3))
        .expect("reordering on the core router");
    let client = net.connect(&server);

    const BYTES: usize = 16 << 20;
    // A stock client on the Internet through the relay's public port.
    let started = Instant::now();
    let (sent, received, n) = transfer_in(lab, "outside", public, 1, BYTES);
    assert_eq!((sent, n), (received, BYTES), "public port under loss");
    let public_took = started.elapsed();

    // Node to node: relayed first, then direct once punched (under loss too).
    let forward = client.forward_addr(lab);
    let started = Instant::now();
    let (sent, received, n) = transfer_in(lab, "client", forward, 2, BYTES);
    assert_eq!((sent, n), (received, BYTES), "overlay under loss");
    let direct_after = time_to_direct(
        lab,
        &client,
        &server.node_id,
        started,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| {
        panic!(
            "no direct path under 5% loss: {:?}\nclient log:\n{}\nserver log:\n{}",
            client.peer(lab, &server.node_id),
            client.proc.log(),
            server.proc.log()
        )
    });
    let started = Instant::now();
    let (sent, received, n) = transfer_in(lab, "client", forward, 3, BYTES);
    assert_eq!((sent, n), (received, BYTES), "direct path under loss");
    let peer = client.peer(lab, &server.node_id).expect("peer in status");
    assert_eq!(peer["path"], "direct", "{peer}");
    // The loss was real: the rule's counter shows what it dropped.
    let rules = lab.run(CORE, "nft", &["list", "ruleset"]).expect("nft");
    let dropped: u64 = rules
        .lines()
        .find(|l| l.contains("numgen random mod 100 < 5"))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss counter in:\n{rules}"));
    // (veth carries large offloaded segments: 96 MiB is some ten thousand packets.)
    assert!(dropped > 100, "only {dropped} packets dropped");
    // And so was the reordering: packets overtook earlier ones of their own flow.
    let reordered = reorderer.stop().expect("the reorderer ran to the end");
    assert!(
        reordered.overtook > 100 && reordered.held > 100,
        "too little reordering: {reordered:?}"
    );
    println!(
        "FAULT | 5% loss and 5% reordering on the core | public port 16 MiB each way in \
         {public_took:?} | direct path after {direct_after:?} | direct 16 MiB each way in \
         {:?} | all intact, {dropped} packets dropped, {} held for 3 ms, {} overtook an \
         earlier packet of their flow",
        started.elapsed(),
        reordered.held,
        reordered.overtook
    );
}
