//! Nodes on different relays of a fleet reach each other over the overlay (#19 item
//! 2), on a real NATS JetStream cluster (three Debian `nats-server`s on loopback) and
//! three relays in one fleet. One test, so the file starts one cluster:
//!
//! - node B is configured only with relay 3, node A only with relay 1: A's dial is
//!   answered by relay 1 with "B is at relay 3", A visits relay 3, and 64 MiB go A→B
//!   and back SHA-256 identical; A's status shows the visit, relay 3 lists A;
//! - a strict-mode node configured only with relay 1 does not visit relay 3: its dial
//!   fails with the reason and the fix (`may_reach`), and relay 3 never sees it;
//!   with `--may-reach <relay 3>` it does;
//! - `ferry-relay fleet-import` moves a lone relay's deny list and its open 2-use
//!   invite into another fleet, whose relay then admits two nodes with the invite and
//!   refuses the denied node;
//! - relay 1's panel lists the fleet's three relays, and its engine operations are
//!   counted;
//! - a standalone `ferry-rendezvous --fleet` shares path records with the relays: a
//!   record published at it is found by a lookup at relay 2, and one published at
//!   relay 1 is found at it, each exactly as its node signed it;
//! - a relay killed with SIGKILL leaves `locate` answers (`/api/info`'s fleet relays)
//!   within 6 s (measured and printed).

use std::time::{Duration, Instant};

use ferry_tests::nats::{NatsCluster, fleet_relay, fleet_relays, info};
use ferry_tests::*;

const NATS_BASE: u16 = 25500;

/// The standalone rendezvous in the fleet: records published at it are found at the
/// relays and the other way round, unaltered (each lookup's record verifies).
fn standalone_rendezvous_shares_records(
    dir: &std::path::Path,
    urls: &str,
    one: &Relay,
    two: &Relay,
) {
    use ferry_proto::frame::Control;
    use ferry_tests::node_session::NodeSession;
    let rdv = Rendezvous::start(
        dir,
        &[
            "--stun",
            "127.0.0.1:0",
            "--fleet",
            urls,
            "--fleet-name",
            "overlay",
            "--fleet-replicas",
            "3",
        ],
    );
    wait_for(
        "the rendezvous to reach its fleet",
        Duration::from_secs(60),
        || {
            let info = http_get(&format!("{}/api/info", rdv.admin)).ok()?;
            (info["fleet"]["name"] == "overlay" && info["fleet"]["up"] == true).then_some(())
        },
    );
    let rdv_listen: std::net::SocketAddr = rdv.proc.ready_field("listen").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        /// Looks `node` up through `asker` until a record comes (it crosses the
        /// engine), then checks it is `expected` and verifies.
        async fn found(
            asker: &mut NodeSession,
            node: ferry_proto::NodeId,
            expected: &ferry_proto::record::SignedRecord,
        ) -> Duration {
            let started = Instant::now();
            loop {
                asker.send(Control::Lookup { node_id: node }).await;
                match asker.next().await {
                    Control::Found {
                        record: Some(record),
                        ..
                    } if *record == *expected => {
                        record.verify(std::time::SystemTime::now()).unwrap();
                        return started.elapsed();
                    }
                    Control::Found { .. } => {}
                    other => panic!("expected Found, got {other:?}"),
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the record never crossed the fleet"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (mut at_rdv, _) = NodeSession::open(&rdv.url, rdv_listen).await;
        let (mut at_two, _) = NodeSession::open(&two.url, two.listen_addr()).await;
        let (mut at_one, _) = NodeSession::open(&one.url, one.listen_addr()).await;

        let record = at_rdv.record(3, "198.51.100.7:4000");
        at_rdv
            .send(Control::Publish {
                record: Box::new(record.clone()),
            })
            .await;
        assert_eq!(
            at_rdv.next().await,
            Control::Published {
                seq: 3,
                error: None
            }
        );
        let took = found(&mut at_two, at_rdv.key.node_id(), &record).await;
        println!(
            "a record published at the standalone rendezvous was found at relay 2 after {} ms",
            took.as_millis()
        );

        let record = at_one.record(8, "203.0.113.9:5000");
        at_one
            .send(Control::Publish {
                record: Box::new(record.clone()),
            })
            .await;
        assert_eq!(
            at_one.next().await,
            Control::Published {
                seq: 8,
                error: None
            }
        );
        let took = found(&mut at_rdv, at_one.key.node_id(), &record).await;
        println!(
            "a record published at relay 1 was found at the standalone rendezvous after {} ms",
            took.as_millis()
        );
        for session in [at_rdv, at_two, at_one] {
            session.link.close("done");
        }
    });
    assert!(
        metric_at(
            &rdv.admin,
            "ferry_rendezvous_fleet_operations_total{operation=\"write_record\",outcome=\"ok\"}"
        ) >= 1.0
    );
    assert_eq!(metric_at(&rdv.admin, "ferry_rendezvous_fleet_up"), 1.0);
}

#[test]
fn nodes_on_different_relays_of_a_fleet_reach_each_other() {
    let dir = TempDir::new("fleet-overlay");
    let Some(cluster) = NatsCluster::start(dir.path(), NATS_BASE) else {
        return;
    };
    let urls = cluster.urls();
    let one = fleet_relay(dir.path(), "one", "25520-25529", &urls, "overlay", &[]);
    let two = fleet_relay(dir.path(), "two", "25530-25539", &urls, "overlay", &[]);
    let mut three = fleet_relay(dir.path(), "three", "25540-25549", &urls, "overlay", &[]);
    for relay in [&one, &two, &three] {
        wait_for("the fleet's three relays", Duration::from_secs(60), || {
            (fleet_relays(relay) == 2).then_some(())
        });
    }

    // The panel shows the fleet's relays; the engine's operations are counted.
    let panel = ureq::get(&format!("{}/panel", one.admin))
        .call()
        .expect("relay 1's panel")
        .body_mut()
        .read_to_string()
        .expect("the panel's HTML");
    assert!(panel.contains("fleet-relays"), "a fleet table on the panel");
    for relay in [&one, &two, &three] {
        assert!(
            panel.contains(relay.url.as_str()),
            "the panel lists {}",
            relay.url
        );
    }
    assert!(
        one.metric("ferry_relay_fleet_operations_total{operation=\"announce\",outcome=\"ok\"}")
            > 0.0
    );
    standalone_rendezvous_shares_records(dir.path(), &urls, &one, &two);

    // B only on relay 3; A (and the strict nodes below) only on relay 1.
    let b = Shim::expose_echo(dir.path(), "b", &three.url, &["--allow-any"]);
    b.wait_connected();
    let a = Shim::connect(dir.path(), "a", &format!("{}/echo", b.node_id), &one.url);
    let started = Instant::now();
    let (sent, received, n) = echo_transfer(a.forward_addr(), 19, 64 << 20);
    assert_eq!(n, 64 << 20);
    assert_eq!(sent, received, "64 MiB A→B and back arrive identical");
    println!(
        "64 MiB A (relay 1) → B (relay 3) and back in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let status = a.status();
    let visit = status["relays"]
        .as_array()
        .and_then(|relays| relays.iter().find(|r| r["role"] == "visit"))
        .unwrap_or_else(|| panic!("A's status shows its visit to relay 3: {status}"));
    assert_eq!(visit["url"], three.url.as_str());
    assert_eq!(visit["state"], "connected");
    assert_eq!(visit["fleet"], "overlay");
    assert!(three.holds(&a.node_id), "relay 3 holds A's visit");
    assert!(!two.holds(&a.node_id), "relay 2 never saw A");

    // Strict mode reaches only the relays it is configured with...
    let strict = Shim::connect_with(
        dir.path(),
        "strict",
        &format!("{}/echo", b.node_id),
        &one.url,
        &["--mode", "strict"],
    );
    let refused = echo_once(strict.forward_addr(), b"hello");
    assert!(refused.is_err() || refused.as_ref().is_ok_and(Vec::is_empty));
    let reason = wait_for(
        "the reason in strict's status",
        Duration::from_secs(20),
        || {
            let status = strict.status();
            status["refusals"]
                .as_array()?
                .iter()
                .find(|r| r["node_id"] == b.node_id.as_str())?["reason"]
                .as_str()
                .map(str::to_string)
        },
    );
    assert!(
        reason.contains(&three.url) && reason.contains("may_reach"),
        "{reason}"
    );
    assert!(!three.holds(&strict.node_id), "strict mode never visits");
    drop(strict);
    // ...and those it may reach.
    let allowed = Shim::connect_with(
        dir.path(),
        "strict-allowed",
        &format!("{}/echo", b.node_id),
        &one.url,
        &["--mode", "strict", "--may-reach", &three.url],
    );
    let (sent, received, _) = echo_transfer(allowed.forward_addr(), 20, 1 << 20);
    assert_eq!(sent, received);
    assert!(three.holds(&allowed.node_id));

    // `ferry-relay fleet-import`: a lone relay's lists and open invites move into a
    // fleet, and a relay of that fleet honours them.
    let solo_home = dir.path().join("solo");
    std::fs::create_dir_all(&solo_home).unwrap();
    let mut solo = Relay::start_args(&solo_home, "25550-25559", &["--policy", "grid"]);
    let code = solo.post_admin(
        "/api/invites",
        serde_json::json!({"expires": "1h", "uses": 2}),
    )["code"]
        .as_str()
        .expect("an invite from the lone relay")
        .to_string();
    let unwelcome = {
        let out = std::process::Command::new(bin("ferry-shim"))
            .args([
                "init",
                "--data-dir",
                dir.path().join("unwelcome").to_str().unwrap(),
            ])
            .output()
            .expect("run ferry-shim init");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    solo.post_admin(
        "/api/policy",
        serde_json::json!({"action": "deny", "node": unwelcome}),
    );
    solo.proc.terminate();
    let import = std::process::Command::new(bin("ferry-relay"))
        .args([
            "--data-dir",
            solo.data_dir.to_str().unwrap(),
            "--policy",
            "grid",
            "--fleet",
            &urls,
            "--fleet-name",
            "imported",
            "--fleet-replicas",
            "3",
            "fleet-import",
        ])
        .output()
        .expect("run ferry-relay fleet-import");
    let said = String::from_utf8_lossy(&import.stdout).to_string();
    assert!(
        import.status.success()
            && said.contains("1 listed node(s)")
            && said.contains("1 outstanding invite(s)"),
        "{said}{}",
        String::from_utf8_lossy(&import.stderr)
    );
    let heir_home = dir.path().join("heir");
    std::fs::create_dir_all(&heir_home).unwrap();
    let heir = Relay::start_args(
        &heir_home,
        "25560-25569",
        &[
            "--policy",
            "grid",
            "--fleet",
            &urls,
            "--fleet-name",
            "imported",
            "--fleet-replicas",
            "3",
        ],
    );
    wait_for(
        "the heir to reach its fleet",
        Duration::from_secs(60),
        || (info(&heir)["fleet"]["up"] == true).then_some(()),
    );
    let secret = code.split_once('?').expect("?invite=").1;
    for (n, name) in ["heir-1", "heir-2"].iter().enumerate() {
        let joined = std::process::Command::new(bin("ferry-shim"))
            .args([
                "join",
                &format!("{}?{secret}", heir.url),
                "--data-dir",
                dir.path().join(name).to_str().unwrap(),
            ])
            .output()
            .expect("run ferry-shim join");
        assert!(
            joined.status.success(),
            "use {} of the imported invite: {}",
            n + 1,
            String::from_utf8_lossy(&joined.stderr)
        );
    }
    let refused = Shim::start(
        dir.path(),
        "unwelcome",
        &["expose", "--relay", &heir.url, "--service", "x=127.0.0.1:9"],
    );
    let why = wait_for(
        "the heir to refuse the denied node",
        Duration::from_secs(20),
        || {
            let status = refused.status();
            (status["relays"][0]["state"] == "refused")
                .then(|| status["relays"][0]["error"].to_string())
        },
    );
    assert!(why.contains("deny"), "{why}");
    drop(refused);

    // A relay killed without a word leaves the others' answers within 6 s.
    three.proc.kill9();
    let killed = Instant::now();
    wait_for("relay 3 to leave the fleet", Duration::from_secs(6), || {
        (fleet_relays(&one) == 1 && fleet_relays(&two) == 1).then_some(())
    });
    println!(
        "a relay killed with SIGKILL left the fleet's answers in {} ms",
        killed.elapsed().as_millis()
    );
    drop(cluster);
}
