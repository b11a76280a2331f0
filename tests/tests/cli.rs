//! The command-line contract: identities and key files, config files that must exist
//! and contain only known keys, and clear errors for bad flags.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use ferry_tests::*;

fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin(program))
        .args(args)
        .output()
        .expect("run a Ferry binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn init_creates_a_private_key_and_id_prints_it() {
    let dir = TempDir::new("cli-init");
    let data = dir.path().join("node");
    let data = data.to_str().unwrap();
    let (ok, id, _) = run("ferry-shim", &["init", "--data-dir", data]);
    assert!(ok);
    let id = id.trim();
    assert_eq!(id.len(), 52);
    assert!(
        id.chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
    );
    let key = dir.path().join("node/node.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, again, _) = run("ferry-shim", &["id", "--data-dir", data]);
    assert!(ok);
    assert_eq!(again.trim(), id);
    // init twice keeps the key.
    let (ok, same, err) = run("ferry-shim", &["init", "--data-dir", data]);
    assert!(ok && same.trim() == id && err.contains("keeping it"));

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = run("ferry-shim", &["id", "--data-dir", data]);
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn id_without_a_key_says_how_to_create_one() {
    let dir = TempDir::new("cli-nokey");
    let (ok, _, err) = run(
        "ferry-shim",
        &["id", "--data-dir", dir.path().to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("ferry-shim init"), "{err}");
}

#[test]
fn a_missing_or_misspelt_config_file_is_an_error() {
    let dir = TempDir::new("cli-config");
    let missing = dir.path().join("nope.toml");
    let (ok, _, err) = run("ferry-relay", &["--config", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");

    let bad = dir.path().join("relay.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\npubilc_host = \"x\"\n").unwrap();
    let (ok, _, err) = run("ferry-relay", &["--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("pubilc_host"), "{err}");

    let (ok, _, err) = run(
        "ferry-shim",
        &["run", "--config", missing.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    std::fs::write(
        &bad,
        "relays = []\n[[service]]\nname = \"web\"\ntarget = \"127.0.0.1:80\"\npublik = true\n",
    )
    .unwrap();
    let (ok, _, err) = run("ferry-shim", &["run", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("publik"), "{err}");
}

#[test]
fn bad_flags_get_clear_errors() {
    let (ok, _, err) = run("ferry-relay", &["--ports", "9000-8000"]);
    assert!(!ok && err.contains("LO-HI"), "{err}");
    let (ok, _, err) = run(
        "ferry-shim",
        &["expose", "--relay", "http://example", "--service", "a=b:1"],
    );
    assert!(
        !ok && err.contains("ferry://<relay-node-id>@host:port"),
        "{err}"
    );
    let dir = TempDir::new("cli-flags");
    let data = dir.path().to_str().unwrap();
    let (_, id, _) = run("ferry-shim", &["init", "--data-dir", data]);
    let url = format!("ferry://{}@127.0.0.1:1", id.trim());
    let (ok, _, err) = run(
        "ferry-shim",
        &[
            "expose",
            "--relay",
            &url,
            "--service",
            "web",
            "--data-dir",
            data,
        ],
    );
    assert!(!ok && err.contains("NAME=HOST:PORT"), "{err}");
    let (ok, _, err) = run(
        "ferry-shim",
        &[
            "expose",
            "--relay",
            &url,
            "--service",
            "web=127.0.0.1:80",
            "--data-dir",
            data,
            "--admin",
            "0.0.0.0:0",
        ],
    );
    assert!(!ok && err.contains("needs a token"), "{err}");

    // `tahoe client` on a directory that is no Tahoe node, and for a node that is
    // no grid member: each says what to do.
    let (ok, _, err) = run(
        "ferry-shim",
        &["tahoe", "client", data, "--relay", &url, "--data-dir", data],
    );
    assert!(!ok && err.contains("Tahoe node directory"), "{err}");
    std::fs::write(dir.path().join("tahoe.cfg"), "[client]\n").unwrap();
    let (ok, _, err) = run(
        "ferry-shim",
        &["tahoe", "client", data, "--relay", &url, "--data-dir", data],
    );
    assert!(
        !ok && err.contains("no grid member") && err.contains("ferry-shim join"),
        "{err}"
    );
}

#[test]
fn help_explains_the_overlay_default() {
    let (ok, out, _) = run("ferry-shim", &["expose", "--help"]);
    assert!(ok);
    assert!(
        out.contains("by default nobody except this node itself"),
        "{out}"
    );
    assert!(out.contains("--allow-any"));
    let (ok, out, _) = run("ferry-relay", &["--help"]);
    assert!(ok);
    for flag in [
        "--data-dir",
        "--listen",
        "--public-host",
        "--ports",
        "--admin",
        "--config",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn the_relay_runs_on_built_in_defaults() {
    // No flags at all except where state goes (HOME), so the test does not touch the
    // real home directory; every network default is the built-in one.
    let dir = TempDir::new("cli-defaults");
    let relay = Proc::start_env(
        &bin("ferry-relay"),
        &[],
        dir.path().join("relay.log"),
        &[
            ("HOME", dir.path().to_str().unwrap()),
            ("XDG_DATA_HOME", ""),
            ("STATE_DIRECTORY", ""),
        ],
    );
    let Some(relay) = relay else {
        eprintln!("skipped: the default ports 7842/7843 are in use on this machine");
        return;
    };
    assert!(relay.ready_line.contains("url=ferry://"));
    assert!(relay.ready_line.contains(":7842"));
    assert!(relay.ready_line.contains("admin=http://127.0.0.1:7843"));
    assert!(
        dir.path()
            .join(".local/share/ferry-relay/relay.key")
            .exists()
    );
}
