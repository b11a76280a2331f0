//! Proves the NAT lab (`ferry_tests::netlab`) behaves as its docs claim: how each NAT
//! kind maps and filters, where low-TTL packets die, that hosts on one LAN see each
//! other, that faults cut and restore paths, and that a dropped lab leaves nothing.
//!
//! Everything uses plain std sockets created inside the lab's namespaces, and a UDP
//! reflector that answers every datagram with the source address it saw ("IP:PORT").
//! Each test builds its own lab and is skipped (or, with FERRY_REQUIRE_NETLAB=1, fails)
//! where labs cannot be built.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ferry_tests::TiedToTest;
use ferry_tests::netlab::{CORE, Lab, NatKind};

/// How long one probe waits for an answer before sending again.
const PROBE_WAIT: Duration = Duration::from_millis(250);
/// Probes per question; a lost or unanswered probe is retried this often.
const PROBE_TRIES: usize = 3;

/// Starts a UDP reflector inside `node` on `port`: it answers every datagram with the
/// source address it observed. Returns its address.
fn reflector(lab: &Lab, node: &str, port: u16) -> SocketAddr {
    let ip = lab.lan_ip(node);
    let sock = lab
        .in_ns(node, move || UdpSocket::bind((ip, port)))
        .expect("enter namespace")
        .expect("bind reflector");
    let addr = sock.local_addr().expect("reflector address");
    // The thread ends with the test process; its socket stays in `node`'s namespace.
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(from.to_string().as_bytes(), from);
        }
    });
    addr
}

/// A UDP socket bound inside `node` to `0.0.0.0:port` (0 = any port).
fn udp_in(lab: &Lab, node: &str, port: u16) -> UdpSocket {
    let sock = lab
        .in_ns(node, move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
        .expect("enter namespace")
        .expect("bind UDP socket");
    sock.set_read_timeout(Some(PROBE_WAIT))
        .expect("set timeout");
    sock
}

/// Asks the reflector at `dest` which address `sock`'s packets arrive from; `None` if
/// no answer came back.
fn observed(sock: &UdpSocket, dest: SocketAddr) -> Option<SocketAddr> {
    let mut buf = [0u8; 128];
    for _ in 0..PROBE_TRIES {
        sock.send_to(b"who am i", dest).expect("send probe");
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == dest => {
                    let text = std::str::from_utf8(&buf[..n]).expect("utf-8 answer");
                    return Some(text.parse().expect("reflector answers IP:PORT"));
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    None
}

/// Waits `PROBE_WAIT × PROBE_TRIES` for any datagram on `sock`; returns its payload and
/// sender.
fn receive(sock: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + PROBE_WAIT * PROBE_TRIES as u32;
    while Instant::now() < deadline {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            return Some((buf[..n].to_vec(), from));
        }
    }
    None
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

#[test]
fn masquerade_keeps_the_port_and_filters_by_endpoint() {
    let Some(lab) = Lab::builder("masquerade_keeps_the_port_and_filters_by_endpoint")
        .public("p1")
        .public("p2")
        .public("p3")
        .nat("a", NatKind::Masquerade, &["a1"])
        .build()
    else {
        return;
    };
    let r1 = reflector(&lab, "p1", 3478);
    let r2 = reflector(&lab, "p2", 3479);
    let sock = udp_in(&lab, "a1", 40001);
    let mapped = v4(lab.wan_ip("a1"), 40001);

    assert_eq!(
        observed(&sock, r1),
        Some(mapped),
        "mapped to the WAN address, same port"
    );
    assert_eq!(
        observed(&sock, r2),
        Some(mapped),
        "same mapping for a second destination"
    );

    // A third public host that the host never talked to cannot get in.
    let stranger = udp_in(&lab, "p3", 0);
    for _ in 0..PROBE_TRIES {
        stranger.send_to(b"unsolicited", mapped).expect("send");
    }
    assert_eq!(receive(&sock), None, "endpoint-dependent filtering");
}

#[test]
fn symmetric_maps_each_destination_to_its_own_port() {
    let Some(lab) = Lab::builder("symmetric_maps_each_destination_to_its_own_port")
        .public("p1")
        .public("p2")
        .nat("s", NatKind::Symmetric, &["s1"])
        .build()
    else {
        return;
    };
    let r1 = reflector(&lab, "p1", 3478);
    let r2 = reflector(&lab, "p2", 3479);
    let sock = udp_in(&lab, "s1", 40001);

    let m1 = observed(&sock, r1).expect("reflector 1 answers");
    let m2 = observed(&sock, r2).expect("reflector 2 answers");
    assert_eq!(m1.ip(), IpAddr::V4(lab.wan_ip("s1")));
    assert_eq!(m2.ip(), IpAddr::V4(lab.wan_ip("s1")));
    // fully-random picks each port at random: equal by chance with p ≈ 1/64k.
    assert_ne!(m1.port(), m2.port(), "endpoint-dependent mapping");
    // The mapping is stable for one destination.
    assert_eq!(observed(&sock, r1), Some(m1));
}

#[test]
fn full_cone_maps_once_and_lets_anyone_in() {
    let Some(lab) = Lab::builder("full_cone_maps_once_and_lets_anyone_in")
        .public("p1")
        .public("p2")
        .public("p3")
        .nat("f", NatKind::FullCone, &["f1"])
        .build()
    else {
        return;
    };
    let r1 = reflector(&lab, "p1", 3478);
    let r2 = reflector(&lab, "p2", 3479);
    let sock = udp_in(&lab, "f1", 40001);
    let mapped = v4(lab.wan_ip("f1"), 40001);

    assert_eq!(observed(&sock, r1), Some(mapped));
    assert_eq!(
        observed(&sock, r2),
        Some(mapped),
        "endpoint-independent mapping"
    );

    // p3 never heard from f1, yet reaches it at the mapped address.
    let stranger = udp_in(&lab, "p3", 5555);
    stranger.send_to(b"hello from p3", mapped).expect("send");
    let (payload, from) = receive(&sock).expect("endpoint-independent filtering lets p3 in");
    assert_eq!(payload, b"hello from p3");
    assert_eq!(from, v4(lab.lan_ip("p3"), 5555), "sender address unchanged");
}

#[test]
fn cgnat_maps_to_the_carrier_address_and_needs_ttl_4() {
    let Some(lab) = Lab::builder("cgnat_maps_to_the_carrier_address_and_needs_ttl_4")
        .relay("relay")
        .nat("c", NatKind::Cgnat, &["c1"])
        .build()
    else {
        return;
    };
    let r = reflector(&lab, "relay", 3478);
    let sock = udp_in(&lab, "c1", 40001);
    let mapped = observed(&sock, r).expect("reflector answers");
    assert_eq!(
        mapped.ip(),
        IpAddr::V4(lab.wan_ip("c1")),
        "the carrier's public WAN address"
    );
    assert_ne!(lab.lan_ip("c-nat"), lab.wan_ip("c1"));
    assert_eq!(
        lab.lan_ip("c-nat"),
        Ipv4Addr::new(100, 64, 2, 2),
        "home router's WAN is in CGNAT space"
    );
    // Both masquerades keep the port when it is free.
    assert_eq!(mapped.port(), 40001);

    // Hops: home router (TTL 1 dies there), carrier (2), core (3), relay host (4).
    assert_eq!(lab.gateway_ip("c1"), Ipv4Addr::new(192, 168, 2, 1));
    assert_eq!(lab.gateway_ip("c-nat"), Ipv4Addr::new(100, 64, 2, 1));
    assert_eq!(lab.core_ip("c1"), Ipv4Addr::new(198, 18, 2, 1));
    assert_eq!(
        ttl_probe(&lab, "c1", r, 1),
        Probe::TimeExceeded(lab.gateway_ip("c1"))
    );
    assert_eq!(
        ttl_probe(&lab, "c1", r, 2),
        Probe::TimeExceeded(lab.gateway_ip("c-nat"))
    );
    assert_eq!(
        ttl_probe(&lab, "c1", r, 3),
        Probe::TimeExceeded(lab.core_ip("c1"))
    );
    assert_eq!(
        ttl_probe(&lab, "c1", r, 4),
        Probe::Reply(v4(lab.wan_ip("c1"), 0))
    );
}

#[test]
fn masquerade_ttl_2_leaves_the_nat_and_dies_at_the_core() {
    let Some(lab) = Lab::builder("masquerade_ttl_2_leaves_the_nat_and_dies_at_the_core")
        .relay("relay")
        .nat("a", NatKind::Masquerade, &["a1"])
        .build()
    else {
        return;
    };
    let r = reflector(&lab, "relay", 3478);
    assert_eq!(
        ttl_probe(&lab, "a1", r, 1),
        Probe::TimeExceeded(lab.gateway_ip("a1"))
    );
    // The "low-TTL priming" of SPEC §3: out of the own NAT, never reaching the peer.
    assert_eq!(
        ttl_probe(&lab, "a1", r, 2),
        Probe::TimeExceeded(lab.core_ip("a1"))
    );
    assert_eq!(
        ttl_probe(&lab, "a1", r, 3),
        Probe::Reply(v4(lab.wan_ip("a1"), 0))
    );
}

#[test]
fn udp_blocked_drops_udp_but_tcp_connects() {
    let Some(lab) = Lab::builder("udp_blocked_drops_udp_but_tcp_connects")
        .public("p1")
        .nat("u", NatKind::UdpBlocked, &["u1"])
        .build()
    else {
        return;
    };
    let r = reflector(&lab, "p1", 3478);
    let sock = udp_in(&lab, "u1", 40001);
    assert_eq!(observed(&sock, r), None, "UDP must not get out");

    let p1 = lab.lan_ip("p1");
    let listener = lab
        .in_ns("p1", move || TcpListener::bind((p1, 8080)))
        .expect("enter namespace")
        .expect("bind TCP listener");
    let server = std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().expect("accept");
        conn.write_all(from.to_string().as_bytes()).expect("write");
    });
    let mut conn = lab
        .in_ns("u1", move || {
            TcpStream::connect_timeout(&v4(p1, 8080), Duration::from_secs(3))
        })
        .expect("enter namespace")
        .expect("TCP connects through the UDP-blocking NAT");
    conn.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut seen = String::new();
    conn.read_to_string(&mut seen).expect("read");
    server.join().expect("server thread");
    let seen: SocketAddr = seen.parse().expect("IP:PORT");
    assert_eq!(seen.ip(), lab.wan_ip("u1"), "TCP is masqueraded");
}

#[test]
fn hosts_behind_the_same_nat_reach_each_other_on_the_lan() {
    let Some(lab) = Lab::builder("hosts_behind_the_same_nat_reach_each_other_on_the_lan")
        .nat("s", NatKind::Masquerade, &["s1", "s2"])
        .build()
    else {
        return;
    };
    let (ip1, ip2) = (lab.lan_ip("s1"), lab.lan_ip("s2"));
    assert_eq!(
        lab.wan_ip("s1"),
        lab.wan_ip("s2"),
        "one NAT, one public address"
    );
    let a = udp_in(&lab, "s1", 4000);
    let b = udp_in(&lab, "s2", 4000);
    // TTL 1 suffices: the LAN is one layer-2 segment, no router in between.
    a.set_ttl(1).expect("set TTL");
    a.send_to(b"hi s2", v4(ip2, 4000)).expect("send");
    assert_eq!(receive(&b), Some((b"hi s2".to_vec(), v4(ip1, 4000))));
    b.send_to(b"hi s1", v4(ip1, 4000)).expect("send");
    assert_eq!(receive(&a), Some((b"hi s1".to_vec(), v4(ip2, 4000))));
}

#[test]
fn faults_cut_a_path_and_lift_again() {
    let Some(lab) = Lab::builder("faults_cut_a_path_and_lift_again")
        .public("p1")
        .public("p2")
        .nat("a", NatKind::Masquerade, &["a1"])
        .build()
    else {
        return;
    };
    let r1 = reflector(&lab, "p1", 3478);
    let r2 = reflector(&lab, "p2", 3478);
    let sock = udp_in(&lab, "a1", 40001);
    assert!(observed(&sock, r1).is_some());

    // Cut a1 ↔ p1 in the core; a1 ↔ p2 must keep working meanwhile.
    let cut = lab
        .block_udp(CORE, lab.wan_ip("a1"), lab.lan_ip("p1"))
        .expect("block");
    assert_eq!(observed(&sock, r1), None, "path cut");
    assert!(observed(&sock, r2).is_some(), "other paths unaffected");
    lab.clear(cut).expect("unblock");
    assert!(observed(&sock, r1).is_some(), "path restored");

    let loss = lab.loss(CORE, 100).expect("loss");
    assert_eq!(observed(&sock, r2), None, "100% loss");
    lab.clear(loss).expect("clear loss");
    assert!(observed(&sock, r2).is_some(), "loss lifted");
}

#[test]
fn dropping_the_lab_kills_its_processes_and_removes_its_namespaces() {
    let Some(lab) = Lab::builder("dropping_the_lab_removes_its_namespaces")
        .relay("relay")
        .nat("a", NatKind::Cgnat, &["a1"])
        .build()
    else {
        return;
    };
    let namespaces = lab.namespaces();
    let listed = netns_list();
    for ns in &namespaces {
        assert!(listed.contains(ns), "{ns} exists while the lab lives");
    }
    // Wait until it runs inside (prints), so the test does not race its start.
    let mut sleeper = lab
        .command("a1", "sh")
        .args(["-c", "echo in; exec sleep 60"])
        .stdout(std::process::Stdio::piped())
        .spawn_tied()
        .expect("start sleep in the lab");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sleeper.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read from the process");
    assert_eq!(line, "in\n");

    drop(lab);

    let listed = netns_list();
    for ns in &namespaces {
        assert!(!listed.contains(ns), "{ns} still exists after drop");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = sleeper.try_wait().expect("poll sleep") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "process in the lab survived its drop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "killed, not finished");
}

fn netns_list() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(out.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// What became of one UDP packet sent with a given TTL.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// The reflector answered; port zeroed (it is fresh per probe).
    Reply(SocketAddr),
    /// A router answered ICMP time-exceeded; its address.
    TimeExceeded(Ipv4Addr),
    Nothing,
}

/// Sends one datagram (retried) from a fresh socket in `node` with IP_TTL `ttl` to the
/// reflector `dest`, with IP_RECVERR on so ICMP errors (and the router that sent them)
/// are readable from the socket's error queue.
fn ttl_probe(lab: &Lab, node: &str, dest: SocketAddr, ttl: u32) -> Probe {
    let sock = udp_in(lab, node, 0);
    sock.set_ttl(ttl).expect("set TTL");
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_RECVERR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
    sock.connect(dest).expect("connect");
    let mut buf = [0u8; 128];
    for _ in 0..PROBE_TRIES {
        sock.send(b"ttl probe").expect("send");
        if let Ok(n) = sock.recv(&mut buf) {
            let text = std::str::from_utf8(&buf[..n]).expect("utf-8");
            let mut seen: SocketAddr = text.parse().expect("IP:PORT");
            seen.set_port(0);
            return Probe::Reply(seen);
        }
        // Otherwise a timeout, or a queued ICMP error surfacing as EHOSTUNREACH; the
        // error queue says which router sent it.
        if let Some(router) = icmp_time_exceeded_from(&sock) {
            return Probe::TimeExceeded(router);
        }
    }
    Probe::Nothing
}

/// Reads one entry of the socket's error queue; the offender address if it is an ICMP
/// time-exceeded.
fn icmp_time_exceeded_from(sock: &UdpSocket) -> Option<Ipv4Addr> {
    let mut data = [0u8; 256];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no buffers" value; the buffers
    // set below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return None;
    }
    // SAFETY: walking the control messages recvmsg just filled in, within
    // msg_controllen, with the libc CMSG_* helpers.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_IP && (*cmsg).cmsg_type == libc::IP_RECVERR {
                let p = libc::CMSG_DATA(cmsg);
                let err: libc::sock_extended_err = std::ptr::read_unaligned(p.cast());
                // SO_EE_OFFENDER: the sender's address follows the struct.
                let offender: libc::sockaddr_in = std::ptr::read_unaligned(
                    p.add(std::mem::size_of::<libc::sock_extended_err>()).cast(),
                );
                const ICMP_TIME_EXCEEDED: u8 = 11;
                if err.ee_origin == libc::SO_EE_ORIGIN_ICMP && err.ee_type == ICMP_TIME_EXCEEDED {
                    return Some(Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    None
}
