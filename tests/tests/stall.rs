//! A stalled host within reason cuts nothing. A machine that thrashes, a VM its
//! hypervisor pauses, or a process the kernel does not schedule for a while stops
//! sending keepalives. When only one program stops, the others rightly count its
//! silence: the stall a link survives is its idle timeout (60 s) minus the keepalive
//! interval before it (15 s for session pings and overlay connections), 45 s. When the
//! whole host stops, nobody was silent: every program's idle timers count only time it
//! was running (`ferry_proto::stall`), so a frozen host keeps its links up to QUIC's
//! five-minute backstop. Here the relay alone and a serving shim alone are frozen with
//! SIGSTOP for `ONE_PROGRAM_STALL`, then the relay and both shims together for
//! `WHOLE_HOST_STALL` (longer than every idle timeout, as long as thrashing was seen to
//! freeze a host); afterwards the same public-port and overlay connections carry data
//! and no relay link was re-established.

use std::net::TcpStream;
use std::time::Duration;

use ferry_tests::*;

/// Comfortably inside the 45 s every timer allows a single silent program, leaving room
/// for a loaded machine to take a while to run the processes again.
const ONE_PROGRAM_STALL: Duration = Duration::from_secs(35);

/// Longer than every idle timeout (60 s) and than the 104 s a host crawling into the
/// OOM killer was seen to freeze for; well inside QUIC's 300 s backstop.
const WHOLE_HOST_STALL: Duration = Duration::from_secs(110);

/// Freezes `pids` for `stall`, then lets them run again.
fn freeze(pids: &[u32], stall: Duration) {
    for signal in [libc::SIGSTOP, libc::SIGCONT] {
        for pid in pids {
            // SAFETY: kill(2) on our own children has no memory-safety preconditions.
            unsafe {
                libc::kill(*pid as libc::pid_t, signal);
            }
        }
        if signal == libc::SIGSTOP {
            std::thread::sleep(stall);
        }
    }
}

#[test]
fn connections_survive_a_relay_or_a_shim_frozen_for_35_seconds_and_the_whole_host_for_110() {
    let dir = TempDir::new("stall");
    let relay = Relay::start(dir.path(), "22410-22419");
    let server = Shim::expose_echo(
        dir.path(),
        "server",
        &relay.url,
        &["--public", "--allow-any"],
    );
    let client = Shim::connect(dir.path(), "client", &server.node_id, &relay.url);
    let mut via_public = TcpStream::connect(server.public_addr("echo")).unwrap();
    let mut via_overlay = TcpStream::connect(client.forward_addr()).unwrap();
    for s in [&mut via_public, &mut via_overlay] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        round_trip(s, b"before").unwrap();
    }
    let since_before = relay.connected_since();

    let whole_host = [relay.proc.pid(), server.proc.pid(), client.proc.pid()];
    let stalls: [(&str, &[u32], Duration); 3] = [
        ("the relay", &whole_host[..1], ONE_PROGRAM_STALL),
        ("the serving shim", &whole_host[1..2], ONE_PROGRAM_STALL),
        ("the relay and both shims", &whole_host, WHOLE_HOST_STALL),
    ];
    for (what, pids, stall) in stalls {
        freeze(pids, stall);
        eprintln!("{what} frozen for {stall:?} and running again");
        let public = round_trip(&mut via_public, b"after a stall, public");
        let overlay = round_trip(&mut via_overlay, b"after a stall, overlay");
        assert!(
            public.is_ok() && overlay.is_ok(),
            "{what} frozen for {stall:?}: public-port connection {public:?}, overlay \
             connection {overlay:?}\nrelay log:\n{}\nserver log:\n{}\nclient log:\n{}",
            relay.proc.log(),
            server.proc.log(),
            client.proc.log()
        );
    }
    assert_eq!(
        since_before,
        relay.connected_since(),
        "a relay link was re-established"
    );
    for shim in [&server, &client] {
        assert!(
            !shim.proc.log().contains("reconnecting"),
            "{}",
            shim.proc.log()
        );
    }
    // Each program saw its own freezes, which is what kept its timers from counting them.
    for log in [relay.proc.log(), server.proc.log(), client.proc.log()] {
        assert!(log.contains("this process did not run for"), "{log}");
    }
}
