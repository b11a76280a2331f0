//! Finding the priming TTL: how many hops a packet must survive to leave every NAT of
//! our own — and no more, so it never reaches the peer's NAT (SPEC §3).
//!
//! Like traceroute: STUN Binding requests go towards the rendezvous's STUN port with
//! TTL 1, 2, 3, …; each router where one expires answers with ICMP "time exceeded",
//! which Linux hands to the socket's error queue (`IP_RECVERR`). Home and carrier NATs
//! answer from private or shared (100.64/10) addresses; the first router answering
//! from a public address is the first hop past our last NAT, and a packet sent with
//! exactly that TTL dies there. The request that reaches the STUN service is answered
//! normally and ends the search.
//!
//! The error queue is read with nix's `recvmsg(MSG_ERRQUEUE)`, which also parses the
//! `IP_RECVERR` control message (and checks that the router's address is inside it):
//! neither tokio nor socket2 exposes the error queue. This runs once per relay
//! registration on a throwaway socket in a blocking thread, so it never touches the
//! shim's shared socket.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};

use crate::paths::is_public;

/// Routers probed at most: two NATs plus a few ISP hops is the usual case.
pub const MAX_HOPS: u8 = 8;

/// What the probes found: `hops[k-1]` answered for TTL k (`None`: no answer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HopReport {
    pub hops: Vec<Option<Ipv4Addr>>,
    /// TTL of the first probe the STUN service itself answered.
    pub reached_at: Option<u8>,
}

impl HopReport {
    /// The priming TTL: the hop number of the first router with a public address
    /// (the first hop past our own NATs), provided it comes before the target.
    /// `None` when no such router answered — then the TTL is unknown, not guessed.
    pub fn prime_ttl(&self) -> Option<u8> {
        for (i, hop) in self.hops.iter().enumerate() {
            let ttl = (i + 1) as u8;
            if self.reached_at.is_some_and(|r| ttl >= r) {
                return None;
            }
            if let Some(ip) = hop
                && is_public((*ip).into())
            {
                return Some(ttl);
            }
        }
        None
    }
}

/// Probes towards `target` (the rendezvous's STUN address) and waits up to `wait`.
pub async fn discover(target: SocketAddrV4, wait: Duration) -> io::Result<HopReport> {
    tokio::task::spawn_blocking(move || probe_blocking(target, wait))
        .await
        .map_err(|e| io::Error::other(format!("hop discovery task failed: {e}")))?
}

fn transaction_id(ttl: u8) -> [u8; 12] {
    let mut id = *b"ferry-hops\0\0";
    id[11] = ttl;
    id
}

fn probe_blocking(target: SocketAddrV4, wait: Duration) -> io::Result<HopReport> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    setsockopt(&socket, sockopt::Ipv4RecvErr, &true)?;
    socket.set_nonblocking(true)?;
    for ttl in 1..=MAX_HOPS {
        socket.set_ttl(ttl.into())?;
        let request = ferry_rendezvous::stun::binding_request(&transaction_id(ttl));
        // With IP_RECVERR, an ICMP error for an earlier probe is also reported by
        // the next send (once). That is expected here: send again.
        let mut last = Ok(0);
        for _ in 0..3 {
            last = socket.send_to(&request, target);
            if last.is_ok() {
                break;
            }
        }
        last?;
    }
    let mut report = HopReport {
        hops: vec![None; MAX_HOPS as usize],
        reached_at: None,
    };
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || complete(&report) {
            break;
        }
        let mut pfd = [PollFd::new(
            socket.as_fd(),
            PollFlags::POLLIN | PollFlags::POLLERR,
        )];
        // At most a second (fits u16): the deadline is checked between waits.
        let timeout = PollTimeout::from(left.as_millis().min(1000) as u16);
        match poll(&mut pfd, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        while let Some((ttl, from)) = read_error(&socket) {
            if let Some(slot) = ttl
                .checked_sub(1)
                .and_then(|i| report.hops.get_mut(i as usize))
            {
                *slot = Some(from);
            }
        }
        let mut buf = [0u8; 512];
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            // The STUN service answered: the probe with this TTL reached it.
            if n >= 20 && buf[8..19] == transaction_id(0)[..11] {
                let ttl = buf[19];
                report.reached_at = Some(report.reached_at.map_or(ttl, |r| r.min(ttl)));
            }
        }
    }
    Ok(report)
}

/// Enough is known once the target answered and every hop before it was heard from
/// (or a public router was found before it).
fn complete(report: &HopReport) -> bool {
    let Some(reached) = report.reached_at else {
        return false;
    };
    report
        .hops
        .iter()
        .take(reached.saturating_sub(1) as usize)
        .all(Option::is_some)
}

/// Reads one ICMP "time exceeded" from the error queue: (TTL of the probe, router).
/// Other queued errors are consumed and skipped. `None` when the queue is empty.
fn read_error(socket: &UdpSocket) -> Option<(u8, Ipv4Addr)> {
    loop {
        let mut data = [0u8; 512];
        // Room for what IP_RECVERR sends: the extended error and the router's address.
        let mut control = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
        let mut iov = [IoSliceMut::new(&mut data)];
        let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
        let msg =
            recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut control), flags).ok()?;
        let n = msg.bytes;
        // A message whose control data did not fit (`Err`) is skipped.
        let router = msg.cmsgs().ok().and_then(|mut cmsgs| {
            cmsgs.find_map(|cmsg| match cmsg {
                // Type 11: time exceeded in transit; a router that gave no address
                // (AF_UNSPEC) does not count.
                ControlMessageOwned::Ipv4RecvErr(err, Some(offender))
                    if err.ee_origin == libc::SO_EE_ORIGIN_ICMP
                        && err.ee_type == 11
                        && offender.sin_family == libc::AF_INET as libc::sa_family_t =>
                {
                    Some(Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr)))
                }
                _ => None,
            })
        });
        // The payload is our STUN request: its transaction ID's last byte is the TTL.
        let ttl = (n >= 20).then(|| data[19]);
        if let (Some(ttl), Some(router)) = (ttl, router) {
            return Some((ttl, router));
        }
    }
}

/// The IPv4 STUN target for hop discovery, when the rendezvous has one.
pub fn target(stun: SocketAddr) -> Option<SocketAddrV4> {
    match stun {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(hops: &[Option<&str>], reached_at: Option<u8>) -> HopReport {
        HopReport {
            hops: hops.iter().map(|h| h.map(|s| s.parse().unwrap())).collect(),
            reached_at,
        }
    }

    #[test]
    fn the_first_public_router_gives_the_ttl() {
        // Home NAT, then the core: TTL 2 leaves the home NAT and dies at the core.
        let one = report(&[Some("192.168.1.1"), Some("198.18.0.1"), None], Some(4));
        assert_eq!(one.prime_ttl(), Some(2));
        // Home NAT behind carrier-grade NAT: TTL 3 (SPEC §3's lab finding).
        let two = report(
            &[Some("192.168.1.1"), Some("100.64.0.1"), Some("198.18.0.1")],
            Some(5),
        );
        assert_eq!(two.prime_ttl(), Some(3));
        // A silent hop before the first public router does not change the answer.
        let silent = report(&[None, Some("203.0.113.1")], Some(4));
        assert_eq!(silent.prime_ttl(), Some(2));
    }

    #[test]
    fn unknown_when_no_public_router_answers_before_the_target() {
        // No router answered at all (ICMP filtered): unknown, not guessed.
        assert_eq!(report(&[None, None, None], Some(4)).prime_ttl(), None);
        // Only private routers, then the target itself.
        let private = report(&[Some("10.0.0.1"), Some("10.0.1.1")], Some(3));
        assert_eq!(private.prime_ttl(), None);
        // A "public" hop at or beyond the target's distance does not count.
        let beyond = report(&[Some("192.168.1.1"), Some("198.18.0.1")], Some(2));
        assert_eq!(beyond.prime_ttl(), None);
    }

    #[test]
    fn transaction_ids_carry_the_ttl() {
        assert_eq!(transaction_id(3)[11], 3);
        assert_eq!(transaction_id(3)[..11], transaction_id(0)[..11]);
    }
}
