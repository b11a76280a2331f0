//! Sockets on both address families. The unspecified IPv6 address (`[::]`, the
//! default listen address of the relay and the rendezvous, and the shim's socket)
//! means *dual stack*: one IPv6 socket that also carries IPv4 as `::ffff:a.b.c.d`,
//! set explicitly rather than left to the `net.ipv6.bindv6only` sysctl. On a host
//! without IPv6 it falls back to the unspecified IPv4 address on the same port.
//!
//! Addresses from a dual-stack socket arrive IPv4-mapped; [`canonical`] turns them
//! back into plain IPv4 wherever they are shown, compared with configured addresses
//! or handed to peers.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// IPv4-mapped IPv6 addresses as plain IPv4; everything else unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// `host:port` as stock clients and resolvers take it: an IPv6 literal (given without
/// brackets) gets brackets, names and IPv4 addresses do not.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Whether two host names or address literals name the same host as written: case
/// does not matter, nor brackets around an IPv6 literal (no resolution).
pub fn same_host(a: &str, b: &str) -> bool {
    let bare = |h: &str| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    };
    bare(a) == bare(b)
}

/// IPv4 addresses as IPv4-mapped IPv6 (what a dual-stack socket takes).
pub fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// Whether `host` (a name or an address, IPv6 with or without brackets) is this
/// machine: `localhost` or a loopback address.
pub fn is_this_machine(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_dual_stack_request(addr: SocketAddr) -> bool {
    addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

/// The IPv4 fallback of a dual-stack request, used when the host has no IPv6.
fn ipv4_fallback(addr: SocketAddr, why: &io::Error, what: &str) -> SocketAddr {
    tracing::info!("no IPv6 for {what} ({why}); listening on IPv4 only");
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port())
}

fn dual_stack_socket(
    ty: socket2::Type,
    protocol: socket2::Protocol,
) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, ty, Some(protocol))?;
    socket.set_only_v6(false)?;
    Ok(socket)
}

/// Binds a UDP socket; `[::]:port` is dual-stack (IPv4 only if the host has no IPv6).
pub fn bind_udp(addr: SocketAddr, what: &str) -> io::Result<std::net::UdpSocket> {
    if is_dual_stack_request(addr) {
        let dual = dual_stack_socket(socket2::Type::DGRAM, socket2::Protocol::UDP)
            .and_then(|s| s.bind(&addr.into()).map(|()| s));
        match dual {
            Ok(socket) => return Ok(socket.into()),
            Err(e) if no_ipv6(&e) => {
                return std::net::UdpSocket::bind(ipv4_fallback(addr, &e, what));
            }
            Err(e) => return Err(e),
        }
    }
    std::net::UdpSocket::bind(addr)
}

/// Binds a listening TCP socket (non-blocking, `SO_REUSEADDR` so a restarted server
/// gets its port back while old connections linger in TIME_WAIT); `[::]:port` is
/// dual-stack as for [`bind_udp`].
pub fn bind_tcp(addr: SocketAddr, what: &str) -> io::Result<std::net::TcpListener> {
    let listen = |socket: socket2::Socket, addr: SocketAddr| -> io::Result<std::net::TcpListener> {
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    if is_dual_stack_request(addr) {
        match dual_stack_socket(socket2::Type::STREAM, socket2::Protocol::TCP)
            .and_then(|s| listen(s, addr))
        {
            Ok(listener) => return Ok(listener),
            Err(e) if no_ipv6(&e) => {
                let v4 = ipv4_fallback(addr, &e, what);
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                return listen(socket, v4);
            }
            Err(e) => return Err(e),
        }
    }
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    listen(socket, addr)
}

/// Whether an error means the host has no IPv6 (the family is off or unsupported).
fn no_ipv6(e: &io::Error) -> bool {
    // EAFNOSUPPORT (97 on Linux) when IPv6 is off; EADDRNOTAVAIL without any address.
    e.raw_os_error() == Some(97) || e.kind() == io::ErrorKind::AddrNotAvailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_is_localhost_and_loopback() {
        for host in [
            "localhost",
            "LocalHost",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_this_machine(host), "{host}");
        }
        for host in [
            "relay.example",
            "192.0.2.1",
            "2001:db8::1",
            "localhost.example",
        ] {
            assert!(!is_this_machine(host), "{host}");
        }
    }

    #[test]
    fn host_port_brackets_ipv6_literals_only() {
        assert_eq!(host_port("relay.example", 443), "relay.example:443");
        assert_eq!(host_port("192.0.2.1", 7000), "192.0.2.1:7000");
        assert_eq!(host_port("2001:db8::1", 7000), "[2001:db8::1]:7000");
    }

    #[test]
    fn mapped_and_canonical_undo_each_other() {
        let v4: SocketAddr = "192.0.2.9:5000".parse().unwrap();
        let m: SocketAddr = "[::ffff:192.0.2.9]:5000".parse().unwrap();
        assert_eq!(mapped(v4), m);
        assert_eq!(canonical(m), v4);
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!((mapped(v6), canonical(v6)), (v6, v6));
    }

    #[test]
    fn the_unspecified_ipv6_address_takes_both_families() {
        let udp = bind_udp("[::]:0".parse().unwrap(), "test").unwrap();
        let port = udp.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"v4", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 8];
        udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, from) = udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"v4");
        assert_eq!(canonical(from), sender.local_addr().unwrap());

        let tcp = bind_tcp("[::]:0".parse().unwrap(), "test").unwrap();
        let port = tcp.local_addr().unwrap().port();
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        if std::net::TcpStream::connect(("::1", port)).is_err() {
            // A host whose loopback has no IPv6 still got a working IPv4 listener.
            eprintln!("no IPv6 loopback here");
        }
    }
}
