//! A stock STUN client (coturn's `turnutils_stunclient`) against the real `ferry-relay`'s
//! STUN service, across the NAT lab: behind a Linux masquerading NAT and behind
//! carrier-grade NAT, the mapped address it reports must be the outermost NAT's public
//! WAN address. This pins the relay's STUN answers to what third-party clients expect,
//! independently of Ferry's own STUN code.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::netlab::{Lab, NatKind, skip_test};
use ferry_tests::{Proc, TempDir, TiedToTest, bin};

const STUN_CLIENT: &str = "turnutils_stunclient";

#[test]
fn stock_stun_client_sees_the_nat_wan_address() {
    const TEST: &str = "stock_stun_client_sees_the_nat_wan_address";
    let Some(lab) = Lab::builder(TEST)
        .relay("relay")
        .nat("m", NatKind::Masquerade, &["m1"])
        .nat("c", NatKind::Cgnat, &["c1"])
        .build()
    else {
        return;
    };
    if Command::new(STUN_CLIENT).arg("-h").output().is_err() {
        // CI installs coturn (.ci/run), so there this fails instead.
        skip_test(
            TEST,
            &format!("{STUN_CLIENT} is not installed (Debian package coturn)"),
        );
        return;
    }

    let dir = TempDir::new("stun-client");
    let relay_ip = lab.relay_ip().to_string();
    let relay_bin = bin("ferry-relay");
    let data_dir = dir.path().join("relay");
    let args: Vec<String> = [
        "netns",
        "exec",
        lab.ns("relay"),
        relay_bin.to_str().expect("utf-8 path"),
        "--listen",
        "0.0.0.0:7842",
        "--public-host",
        &relay_ip,
        "--stun",
        "0.0.0.0:3478",
        "--admin",
        "127.0.0.1:0",
        "--ports",
        "23000-23010",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let relay = Proc::start(Path::new("ip"), &args, dir.path().join("relay.log"));
    let stun: SocketAddr = relay
        .ready_field("stun")
        .parse()
        .expect("stun= in the ready line is IP:PORT");
    assert_eq!(stun.port(), 3478, "ready line: {}", relay.ready_line);

    for host in ["m1", "c1"] {
        let mut cmd = lab.command(host, STUN_CLIENT);
        cmd.args(["-p", "3478", &relay_ip]);
        let output = run_with_timeout(cmd, Duration::from_secs(10)).unwrap_or_else(|e| {
            panic!("{STUN_CLIENT} in {host}: {e}\nrelay log:\n{}", relay.log())
        });
        let mapped = reflexive_addr(&output)
            .unwrap_or_else(|| panic!("no reflexive address in {STUN_CLIENT} output:\n{output}"));
        assert_eq!(
            mapped.ip(),
            IpAddr::V4(lab.wan_ip(host)),
            "{host} ({:?}, LAN {}) must be seen at its NAT's public address; output:\n{output}",
            lab.nat_kind(host),
            lab.lan_ip(host),
        );
    }
}

/// The mapped address from `turnutils_stunclient` output. coturn 4.6 prints (once per
/// attribute it found, so usually twice) `0: : IPv4. UDP reflexive addr: IP:PORT`.
fn reflexive_addr(output: &str) -> Option<SocketAddr> {
    output.lines().find_map(|line| {
        let (_, addr) = line.split_once("UDP reflexive addr: ")?;
        addr.trim().parse().ok()
    })
}

/// Runs `cmd` to completion within `limit`; its stdout and stderr. The stock client
/// retries forever when no answer comes, so it is killed at the limit.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn_tied()
        .map_err(|e| format!("could not start: {e}"))?;
    let mut stdout = child.stdout.take().expect("stdout pipe");
    let mut stderr = child.stderr.take().expect("stderr pipe");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader")
    );
    match status {
        Some(s) if s.success() => Ok(text),
        Some(s) => Err(format!("exited with {s}; output:\n{text}")),
        None => Err(format!("no answer within {limit:?}; output:\n{text}")),
    }
}
