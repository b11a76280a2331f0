//! The test harness's own promise: a test process that is killed outright (SIGKILL, as
//! the OOM killer or a timeout does) leaves nothing running. Its relay, its shims, a
//! third-party helper, a program started from a thread that has since ended, and a
//! program inside a NAT-lab namespace all die with it (`children.rs`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::netlab::{Lab, NatKind};
use ferry_tests::*;

/// Set for the helper run: the directory it works in.
const HELPER_DIR: &str = "FERRY_TEST_KILLED_HELPER_DIR";
const HELPER: &str = "helper_for_the_kill_test_starts_programs_and_waits_to_be_killed";

/// True while `pid` runs: it exists and is not a zombie waiting to be reaped.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Run only as the child of the test below (with `HELPER_DIR` set); on its own it has
/// nothing to do and returns.
#[test]
fn helper_for_the_kill_test_starts_programs_and_waits_to_be_killed() {
    let Some(dir) = std::env::var_os(HELPER_DIR).map(PathBuf::from) else {
        return;
    };
    let relay = Relay::start(&dir, "24930-24939");
    let shim = Shim::expose_echo(&dir, "shim", &relay.url, &["--public"]);
    let from_thread = {
        let (dir, url) = (dir.clone(), relay.url.clone());
        std::thread::spawn(move || Shim::expose_echo(&dir, "from-thread", &url, &[]))
            .join()
            .expect("start a shim from a thread")
    };
    let sleeper = Proc::start_unready(
        Path::new("/bin/sleep"),
        &["600".to_string()],
        dir.join("sleep.log"),
    );
    let mut pids = vec![
        ("relay", relay.proc.pid()),
        ("shim", shim.proc.pid()),
        ("shim-from-ended-thread", from_thread.proc.pid()),
        ("helper", sleeper.pid()),
    ];
    let lab = Lab::builder("kill_test_helper")
        .nat("a", NatKind::Masquerade, &["a1"])
        .build();
    let in_lab = lab.as_ref().map(|lab| {
        lab.command("a1", "/bin/sleep")
            .arg("600")
            .spawn_tied()
            .expect("start sleep in the lab")
    });
    if let Some(child) = &in_lab {
        pids.push(("in-lab", child.id()));
    }
    let listed: Vec<String> = pids.iter().map(|(n, p)| format!("{n}={p}")).collect();
    println!("PIDS {}", listed.join(" "));
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn programs_a_killed_test_started_die_with_it() {
    let dir = TempDir::new("harness-killed");
    let log = std::fs::File::create(dir.path().join("helper.log")).unwrap();
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", HELPER, "--nocapture", "--test-threads=1"])
        .env(HELPER_DIR, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn_tied()
        .expect("start the helper test process");
    let stdout = helper.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test NAME ... " before the test's own output.
            if let Some((_, pids)) = line.split_once("PIDS ") {
                let _ = tx.send(pids.to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(90))
        .unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.path().join("helper.log")).unwrap_or_default();
            panic!("the helper did not start its programs; its log:\n{log}")
        });
    let pids: Vec<(String, u32)> = line
        .split_whitespace()
        .filter_map(|w| {
            let (name, pid) = w.split_once('=')?;
            Some((name.to_string(), pid.parse().ok()?))
        })
        .collect();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.len() >= 4, "{line}");
    if netlab::require() {
        assert!(names.contains(&"in-lab"), "no process in the lab: {line}");
    }
    // The shim whose starting thread has ended is still up: only the process's death
    // may end it.
    std::thread::sleep(Duration::from_secs(1));
    for (name, pid) in &pids {
        assert!(
            running(*pid),
            "{name} ({pid}) is not running before the kill"
        );
    }

    helper.kill().unwrap();
    helper.wait().unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left: Vec<String> = pids
            .iter()
            .filter(|(_, pid)| running(*pid))
            .map(|(name, pid)| format!("{name} ({pid})"))
            .collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Its lab's namespaces are left for the next lab to clear (with anything still
    // inside); clear them now, and whatever else outlived it.
    netlab::remove_stale_labs();
    for (_, pid) in pids.iter().filter(|(_, pid)| running(*pid)) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
    }
    assert!(
        left.is_empty(),
        "still running 10 s after their test process was killed: {}",
        left.join(", ")
    );
    eprintln!("HARNESS | killed test's programs all ended: {line}");
}

/// A relay restarted on its old port waits while something else holds that port for a
/// moment (another process's connection the kernel gave it as a source port), rather
/// than failing the test that restarts it.
#[test]
fn a_relay_restarted_while_its_port_is_briefly_taken_waits_for_it() {
    let dir = TempDir::new("harness-busy-port");
    let mut relay = Relay::start(dir.path(), "22990-22999");
    let addr = relay.listen_addr();
    relay.proc.kill9();
    let squatter = std::net::TcpListener::bind(addr).expect("take the relay's port");
    let released = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(squatter);
    });
    relay.restart(dir.path());
    released.join().expect("the squatter thread");
    assert_eq!(relay.listen_addr(), addr, "back on its old port");
}
