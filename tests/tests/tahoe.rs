//! Stock Tahoe-LAFS 1.20 (from the Python registry, in the virtualenv `.ci/run`
//! installs) through Ferry (issue #18). `ferry-shim tahoe serve NODEDIR` on a real
//! storage node: `--dry-run` shows the change to tahoe.cfg and makes none; the real
//! run backs tahoe.cfg up, sets `tub.port` on loopback and `tub.location` to the
//! relay's public port, and a stock Tahoe client with no shim uploads and downloads a
//! file through that port, SHA-256 identical.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

const INTRODUCER_PORT: u16 = 25200;
const STORAGE_PORT: u16 = 25201;
const CLIENT_WEB_PORT: u16 = 25202;

fn run_tahoe(tahoe: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(tahoe).args(args).output().expect("run tahoe");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn tahoe_ok(tahoe: &Path, args: &[&str]) -> String {
    let (ok, out) = run_tahoe(tahoe, args);
    assert!(ok, "tahoe {args:?}: {out}");
    out
}

/// `tahoe run NODEDIR`, kept running though the test gives it no stdin.
fn start_node(tahoe: &Path, dir: &Path, name: &str) -> Proc {
    let node = dir.join(name);
    Proc::start_unready(
        tahoe,
        &[
            "run".to_string(),
            "--allow-stdin-close".to_string(),
            node.to_str().unwrap().to_string(),
        ],
        dir.join(format!("tahoe-{name}.log")),
    )
}

#[test]
fn tahoe_serve_puts_a_stock_storage_node_behind_the_relay() {
    let Some(tahoe) = tahoe() else {
        return;
    };
    let dir = TempDir::new("tahoe-serve");
    let relay = Relay::start(dir.path(), "25210-25219");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    tahoe_ok(
        &tahoe,
        &[
            "create-introducer",
            "--listen=tcp",
            &format!("--port=tcp:{INTRODUCER_PORT}:interface=127.0.0.1"),
            &format!("--location=tcp:127.0.0.1:{INTRODUCER_PORT}"),
            &path("introducer"),
        ],
    );
    let _introducer = start_node(&tahoe, dir.path(), "introducer");
    let furl = introducer_furl(&dir.path().join("introducer"));
    let args = tahoe_create(
        &furl,
        "storage",
        Some(STORAGE_PORT),
        &[],
        &dir.path().join("storage"),
    );
    tahoe_ok(&tahoe, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let cfg = dir.path().join("storage/tahoe.cfg");
    let original = std::fs::read_to_string(&cfg).unwrap();

    // A dry run shows the change and makes none.
    let out = Command::new(bin("ferry-shim"))
        .args([
            "tahoe",
            "serve",
            &path("storage"),
            "--relay",
            &relay.url,
            "--dry-run",
            "--data-dir",
            &path("shim"),
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains(&format!(
            "+tub.port = tcp:{STORAGE_PORT}:interface=127.0.0.1"
        )) && shown.contains("+tub.location = tcp:127.0.0.1:")
            && shown.contains("-tub.location = AUTO")
            && shown.contains("dry run"),
        "{shown}"
    );
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        original,
        "a dry run wrote"
    );

    // The real run: backed up, then loopback and the relay's address.
    let shim = Shim::start(
        dir.path(),
        "shim",
        &["tahoe", "serve", &path("storage"), "--relay", &relay.url],
    );
    let public = shim.public_addr("storage");
    wait_for("tub.location set", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&cfg).ok()?;
        text.contains(&format!("tub.location = tcp:{public}\n"))
            .then_some(())
    });
    let backup = dir.path().join("storage/tahoe.cfg.ferry-backup");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
    wait_for("the shim to say so", Duration::from_secs(5), || {
        shim.proc
            .log()
            .contains("restart the Tahoe node")
            .then_some(())
    });

    // Stock Tahoe on both sides; the client has no shim.
    let _storage = start_node(&tahoe, dir.path(), "storage");
    let web = format!("--webport=tcp:{CLIENT_WEB_PORT}:interface=127.0.0.1");
    let args = tahoe_create(&furl, "client", None, &[web], &dir.path().join("client"));
    tahoe_ok(&tahoe, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let _client = start_node(&tahoe, dir.path(), "client");
    let file = dir.path().join("file.bin");
    let data = pattern(18, 2 << 20);
    std::fs::write(&file, &data).unwrap();
    let client_dir = path("client");
    // Until the client has heard of the storage server and reached it, put fails.
    let cap = wait_for(
        "an upload through the public port",
        Duration::from_secs(60),
        || {
            let (ok, out) = run_tahoe(&tahoe, &["-d", &client_dir, "put", file.to_str().unwrap()]);
            // The capability on stdout; "201 Created" and the like on stderr.
            let cap = out.lines().map(str::trim).find(|l| l.starts_with("URI:"))?;
            ok.then(|| cap.to_string())
        },
    );
    let back = dir.path().join("back.bin");
    tahoe_ok(
        &tahoe,
        &["-d", &client_dir, "get", &cap, back.to_str().unwrap()],
    );
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));
    let carried = shim.metric("ferry_shim_bytes_total{direction=\"in\",path=\"public\"}");
    assert!(
        carried >= data.len() as f64,
        "the shim carried {carried} bytes in"
    );
}
