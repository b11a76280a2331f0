//! The NAT lab: small Internets built from Linux network namespaces, veth pairs and
//! nftables, so hole punching is tested across real NATs (SPEC §7, issue #3).
//!
//! This module owns building a lab, running code and processes inside it, injecting
//! faults, and tearing it down. It shells out to `ip` (iproute2) and `nft` (nftables)
//! and needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN). `docs/netlab.md` is the user guide.
//! Hand-written: no crate builds NATs, and these are the commands one would type by hand.
//!
//! # Topology and address plan
//!
//! Every lab has one `core` router namespace standing in for the Internet. Each site
//! gets its own point-to-point link to the core, numbered `k = 1, 2, …` in the order
//! the sites were added to the builder, so every packet between two sites is *routed*
//! by the core and loses one TTL there, as on the Internet:
//!
//! | what | addresses |
//! |---|---|
//! | core link `k` ("public") | `198.18.k.0/24`: core `198.18.k.1` (interface `s<k>`), site `198.18.k.2` |
//! | NAT site `k` LAN | `192.168.k.0/24`: home router `192.168.k.1` (bridge `lan`), hosts `192.168.k.2`, `.3`, … |
//! | CGNAT site `k`, carrier LAN | `100.64.k.0/24`: carrier router `100.64.k.1`, home router WAN `100.64.k.2` |
//! | core link `k`, IPv6 | `2001:db8:k::/64` (`k` in hex): core `::1`, public host `::2`; NAT sites have none |
//!
//! `198.18.0.0/15` is benchmark space (RFC 2544): it cannot clash with anything the
//! machine really talks to, yet `Ipv4Addr::is_private()` is false for it and it is
//! outside `100.64.0.0/10`, so Ferry's address classification sees it as public. (Code
//! that must treat the lab as public must not reject benchmark addresses.) The core knows
//! only its connected `/24`s, so private and CGNAT addresses never cross it.
//!
//! A packet from a host behind a NAT to a host at another site passes host → own router
//! → core → peer router → peer host; each router forwards and so decrements the TTL. A
//! packet sent with TTL 2 leaves its own NAT and dies at the core, which answers with
//! ICMP time-exceeded; behind carrier-grade NAT TTL 3 is needed to clear both NATs (and
//! still dies at the core). Nothing in the lab filters ICMP.
//!
//! # NAT kinds
//!
//! See [`NatKind`]; each kind's nftables rules are in [`nat_rules`] and listed in
//! `docs/netlab.md`. The inbound behaviour that is *not* configured is Linux's: an
//! unsolicited packet to a router's WAN address is delivered to the router itself,
//! which has no listener and answers ICMP port-unreachable — and, importantly for hole
//! punching, leaves a conntrack entry behind (SPEC §3, "Linux conntrack clash").
//!
//! # Isolation and cleanup
//!
//! nextest runs each test in its own process, in parallel. Namespaces are named
//! `fl<pid>-<n>-<node>` (process ID, per-process lab counter, node name), and veth pairs
//! are created directly inside their namespaces, so nothing is added to the root
//! namespace and interface names (`eth0`, `wan`, `lan`, `s<k>`) need not be unique.
//! Dropping a [`Lab`] kills every process inside its namespaces and deletes them. The
//! first lab of a process also deletes namespaces left by dead processes (a crashed or
//! killed test run). `FERRY_TEST_KEEP=1` keeps the namespaces (and skips that stale
//! cleanup, so kept labs survive the next test process) and prints how to inspect them.
//!
//! # Availability
//!
//! [`LabBuilder::build`] returns `None` after printing `SKIPPED: <test>: <reason>` when
//! the lab cannot be built here (no `ip` or `nft`, or `ip netns add` fails: not root,
//! or a sandbox without namespaces). With `FERRY_REQUIRE_NETLAB=1` (CI) it panics
//! instead. Any failure after the namespaces exist is a bug and always panics.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::reorder::Reorderer;

/// Where `ip netns` keeps its namespace handles (bind mounts of nsfs files).
const NETNS_DIR: &str = "/var/run/netns";

/// The node name of the core router.
pub const CORE: &str = "core";

/// How long a new lab's links may take to come up (normally milliseconds).
const LINK_UP_LIMIT: Duration = Duration::from_secs(5);

/// The interface index of the first veth end; see `Lab::configure`.
const FIRST_VETH_INDEX: usize = 10;

/// nftables table holding a router's NAT rules.
const NAT_TABLE: &str = "ferrylab";
/// A public host's IPv6 address on core link `k`.
fn v6_site_side(k: u8) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0x2001, 0xdb8, k.into(), 0, 0, 0, 0, 2)
}

/// nftables table holding the packet counters of [`Lab::watch`].
const WATCH_TABLE: &str = "ferry_watch";

/// nftables table holding injected faults, separate so faults never touch NAT rules.
const FAULT_TABLE: &str = "ferrylab_faults";

/// How a NAT site's router (or routers) translate and filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Linux `masquerade`: keeps the source port when it is free (endpoint-independent
    /// mapping in practice), endpoint-dependent filtering (only replies get in).
    Masquerade,
    /// Endpoint-independent mapping and filtering, from explicit rules: `snat` to the
    /// WAN address keeping the port, and every new inbound UDP flow to the WAN address
    /// is `dnat`ed to the site's single host, port unchanged. One host per site.
    FullCone,
    /// `masquerade fully-random`: a random source port for every new flow, so the
    /// mapping differs per destination (endpoint-dependent mapping).
    Symmetric,
    /// A home `Masquerade` router whose WAN is in `100.64.k.0/24`, behind a carrier
    /// `Masquerade` router whose WAN is public: two NAT hops.
    Cgnat,
    /// `Masquerade`, plus a forward rule dropping all UDP from the LAN to the WAN. TCP
    /// works.
    UdpBlocked,
}

/// Why a lab operation failed: the command and its stderr, or the system call.
#[derive(Debug, Clone)]
pub struct LabError(String);

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

impl LabError {
    fn new(message: impl Into<String>) -> LabError {
        LabError(message.into())
    }
}

/// What a node is, for addressing and routing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Core,
    /// A host directly on the core; `relay` marks the one [`Lab::relay_ip`] returns.
    /// Public hosts have IPv6 as well as IPv4, or (`v4` false) IPv6 only.
    Public {
        relay: bool,
        v4: bool,
    },
    /// A site's home router (the NAT the hosts sit behind).
    Router,
    /// A CGNAT site's carrier-grade router.
    Carrier,
    /// A host on a NAT site's LAN.
    Host,
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    ns: String,
    role: Role,
    /// The node's own address: a host's only address, a router's WAN address.
    addr: Ipv4Addr,
    /// The address this node's packets carry when they cross the core.
    public: Ipv4Addr,
    /// Site name (NAT sites only).
    site: Option<String>,
}

#[derive(Debug, Clone)]
enum SiteSpec {
    Public {
        name: String,
        relay: bool,
        v4: bool,
    },
    Nat {
        site: String,
        kind: NatKind,
        hosts: Vec<String>,
    },
}

/// Describes a lab; [`LabBuilder::build`] creates it in one go, batching commands (one
/// `ip` process for all namespaces, one for all links, one per namespace) so a lab
/// takes 50–150 ms on an idle machine.
#[derive(Debug, Clone)]
pub struct LabBuilder {
    test: String,
    sites: Vec<SiteSpec>,
}

impl LabBuilder {
    /// A host directly on the core with a public address.
    pub fn public(mut self, name: &str) -> Self {
        self.sites.push(SiteSpec::Public {
            name: name.to_string(),
            relay: false,
            v4: true,
        });
        self
    }

    /// A host directly on the core with only an IPv6 address ([`Lab::ipv6`]).
    pub fn public_v6_only(mut self, name: &str) -> Self {
        self.sites.push(SiteSpec::Public {
            name: name.to_string(),
            relay: false,
            v4: false,
        });
        self
    }

    /// A public host where the relay and rendezvous will run; see [`Lab::relay_ip`].
    pub fn relay(mut self, name: &str) -> Self {
        self.sites.push(SiteSpec::Public {
            name: name.to_string(),
            relay: true,
            v4: true,
        });
        self
    }

    /// A NAT site named `site` with the given hosts on its LAN. Its home router is the
    /// node `<site>-nat`; under [`NatKind::Cgnat`] the carrier router is `<site>-cgn`.
    pub fn nat(mut self, site: &str, kind: NatKind, hosts: &[&str]) -> Self {
        self.sites.push(SiteSpec::Nat {
            site: site.to_string(),
            kind,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        });
        self
    }

    /// Builds the lab. `None` (after printing `SKIPPED: …`) if this machine cannot run
    /// labs; panics instead if `FERRY_REQUIRE_NETLAB=1`. Panics on any other failure,
    /// including a malformed description, since that is a bug.
    pub fn build(self) -> Option<Lab> {
        if let Err(reason) = tools_available() {
            return skip(&self.test, &reason);
        }
        let lab = match self.plan() {
            Ok(lab) => lab,
            Err(e) => panic!("netlab: bad lab description in {}: {e}", self.test),
        };
        clean_stale_once();
        if let Err(e) = lab.create_namespaces() {
            let uid = current_euid();
            let reason = if uid == 0 {
                e.to_string()
            } else {
                format!("not root (euid {uid}): {e}")
            };
            return skip(&self.test, &reason);
        }
        // From here on a panic drops `lab`, which removes its namespaces.
        let mut lab = lab;
        lab.live = true;
        if let Err(e) = lab.configure() {
            panic!("netlab: building the lab for {} failed: {e}", self.test);
        }
        Some(lab)
    }

    /// Assigns namespaces, links and addresses without touching the system.
    fn plan(&self) -> Result<Lab, LabError> {
        let id = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("fl{}-{id}-", std::process::id());
        let mut lab = Lab {
            test: self.test.clone(),
            prefix: prefix.clone(),
            nodes: Vec::new(),
            links: Vec::new(),
            sites: Vec::new(),
            live: false,
        };
        let mut names = HashSet::new();
        let mut add = |lab: &mut Lab,
                       name: &str,
                       role: Role,
                       addr: Ipv4Addr,
                       public: Ipv4Addr,
                       site: Option<&str>|
         -> Result<(), LabError> {
            check_name(name)?;
            if !names.insert(name.to_string()) {
                return Err(LabError::new(format!("node name {name:?} used twice")));
            }
            lab.nodes.push(Node {
                name: name.to_string(),
                ns: format!("{prefix}{name}"),
                role,
                addr,
                public,
                site: site.map(str::to_string),
            });
            Ok(())
        };
        add(
            &mut lab,
            CORE,
            Role::Core,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            None,
        )?;
        if self.sites.len() > 250 {
            return Err(LabError::new("at most 250 sites per lab"));
        }
        for (i, spec) in self.sites.iter().enumerate() {
            let k = u8::try_from(i + 1).map_err(|_| LabError::new("too many sites"))?;
            let site_side = Ipv4Addr::new(198, 18, k, 2);
            match spec {
                SiteSpec::Public { name, relay, v4 } => {
                    add(
                        &mut lab,
                        name,
                        Role::Public {
                            relay: *relay,
                            v4: *v4,
                        },
                        site_side,
                        site_side,
                        None,
                    )?;
                    lab.links
                        .push(Link::new(CORE, &format!("s{k}"), name, "eth0"));
                }
                SiteSpec::Nat { site, kind, hosts } => {
                    if hosts.is_empty() || hosts.len() > 200 {
                        return Err(LabError::new(format!("site {site:?} needs 1 to 200 hosts")));
                    }
                    if *kind == NatKind::FullCone && hosts.len() != 1 {
                        return Err(LabError::new(format!(
                            "full-cone site {site:?} forwards inbound UDP to its one host; \
                             give it exactly one"
                        )));
                    }
                    let router = format!("{site}-nat");
                    if *kind == NatKind::Cgnat {
                        let carrier = format!("{site}-cgn");
                        add(
                            &mut lab,
                            &carrier,
                            Role::Carrier,
                            site_side,
                            site_side,
                            Some(site),
                        )?;
                        lab.links
                            .push(Link::new(CORE, &format!("s{k}"), &carrier, "wan"));
                        add(
                            &mut lab,
                            &router,
                            Role::Router,
                            Ipv4Addr::new(100, 64, k, 2),
                            site_side,
                            Some(site),
                        )?;
                        lab.links.push(Link::new(&carrier, "lan", &router, "wan"));
                    } else {
                        add(
                            &mut lab,
                            &router,
                            Role::Router,
                            site_side,
                            site_side,
                            Some(site),
                        )?;
                        lab.links
                            .push(Link::new(CORE, &format!("s{k}"), &router, "wan"));
                    }
                    for (j, host) in hosts.iter().enumerate() {
                        let last =
                            u8::try_from(j + 2).map_err(|_| LabError::new("too many hosts"))?;
                        add(
                            &mut lab,
                            host,
                            Role::Host,
                            Ipv4Addr::new(192, 168, k, last),
                            site_side,
                            Some(site),
                        )?;
                        lab.links
                            .push(Link::new(&router, &format!("h{j}"), host, "eth0"));
                    }
                    lab.sites.push(Site {
                        name: site.clone(),
                        kind: *kind,
                        k,
                    });
                }
            }
        }
        Ok(lab)
    }
}

/// A veth pair between two nodes.
#[derive(Debug, Clone)]
struct Link {
    a: String,
    a_dev: String,
    b: String,
    b_dev: String,
}

impl Link {
    fn new(a: &str, a_dev: &str, b: &str, b_dev: &str) -> Link {
        Link {
            a: a.to_string(),
            a_dev: a_dev.to_string(),
            b: b.to_string(),
            b_dev: b_dev.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
struct Site {
    name: String,
    kind: NatKind,
    k: u8,
}

/// A running lab. Dropping it kills everything inside and deletes its namespaces.
#[derive(Debug)]
pub struct Lab {
    test: String,
    prefix: String,
    nodes: Vec<Node>,
    links: Vec<Link>,
    sites: Vec<Site>,
    /// Whether the namespaces exist (so Drop has something to remove).
    live: bool,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Starts describing a lab for the test named `test` (used in skip messages).
    pub fn builder(test: &str) -> LabBuilder {
        LabBuilder {
            test: test.to_string(),
            sites: Vec::new(),
        }
    }

    /// The network namespace name of a node (for `ip netns exec` by hand).
    pub fn ns(&self, node: &str) -> &str {
        &self.node(node).ns
    }

    /// All of this lab's namespace names.
    pub fn namespaces(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.ns.clone()).collect()
    }

    /// A host's own address: its LAN address behind a NAT, its public address on the
    /// core. For a router, its WAN address (`100.64.k.2` for a CGNAT home router).
    pub fn lan_ip(&self, node: &str) -> Ipv4Addr {
        let n = self.node(node);
        assert!(n.role != Role::Core, "the core has one address per link");
        n.addr
    }

    /// The public address a node's packets carry across the core: the outermost NAT's
    /// WAN address for hosts and routers of a NAT site, its own address for a public host.
    pub fn wan_ip(&self, node: &str) -> Ipv4Addr {
        let n = self.node(node);
        assert!(n.role != Role::Core, "the core has one address per link");
        n.public
    }

    /// A node's next hop towards the core: a host's home router (`192.168.k.1`), a CGNAT
    /// home router's carrier router (`100.64.k.1`), otherwise the core. This is the
    /// router that answers a packet sent from `node` with TTL 1 with ICMP time-exceeded.
    pub fn gateway_ip(&self, node: &str) -> Ipv4Addr {
        gateway(self.lan_ip(node))
    }

    /// The core's address on the link to `node`'s site (`198.18.k.1`): the source of the
    /// ICMP time-exceeded for a packet from `node` that dies at the core.
    pub fn core_ip(&self, node: &str) -> Ipv4Addr {
        gateway(self.wan_ip(node))
    }

    /// The address of the host added with [`LabBuilder::relay`].
    pub fn relay_ip(&self) -> Ipv4Addr {
        self.nodes
            .iter()
            .find(|n| matches!(n.role, Role::Public { relay: true, .. }))
            .map(|n| n.addr)
            .unwrap_or_else(|| panic!("lab of {} has no relay host", self.test))
    }

    /// The IPv6 address of a public host (or the relay host): `2001:db8:k::2` on core
    /// link `k` (documentation space: never routed outside the lab). NAT sites have no
    /// IPv6.
    pub fn ipv6(&self, node: &str) -> std::net::Ipv6Addr {
        let n = self.node(node);
        assert!(
            matches!(n.role, Role::Public { .. }),
            "only public hosts have IPv6 in the lab; {node:?} does not"
        );
        v6_site_side(n.addr.octets()[2])
    }

    /// The name of the home router (the NAT) a host sits behind.
    pub fn router(&self, host: &str) -> String {
        let site = self.site_of(host);
        format!("{}-nat", site.name)
    }

    /// The NAT kind of the site a host (or router) belongs to.
    pub fn nat_kind(&self, node: &str) -> NatKind {
        self.site_of(node).kind
    }

    /// A command that runs `program` inside a node's namespace (`ip netns exec`).
    pub fn command(&self, node: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(self.ns(node)).arg(program);
        cmd
    }

    /// Runs `program args…` inside a node's namespace; its stdout, or an error with its
    /// stderr if it fails.
    pub fn run(&self, node: &str, program: &str, args: &[&str]) -> Result<String, LabError> {
        let mut cmd = self.command(node, program);
        cmd.args(args);
        run_command(cmd, None)
    }

    /// Runs `f` on a fresh thread that has first entered the node's network namespace
    /// (`setns(2)`), and returns its result. Sockets `f` creates stay in that namespace
    /// for their whole life, whichever thread uses them later. A panic in `f` is
    /// re-raised here, so assertions inside work.
    pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(&self, node: &str, f: F) -> Result<T, LabError> {
        run_in_netns(&ns_path(self.ns(node)), f)
    }

    /// Loads an nftables script (`nft -f -`) into a node's namespace.
    pub fn nft(&self, node: &str, script: &str) -> Result<(), LabError> {
        self.nft_output(node, script, &[]).map(|_| ())
    }

    /// Drops all UDP between addresses `a` and `b`, both directions, at `node` (on a
    /// router: packets it forwards; on a host: packets it sends or receives). Packets
    /// are matched as they arrive, before conntrack and NAT see them, so no NAT state is
    /// created or refreshed. The usual place is [`CORE`] with public addresses (a NAT
    /// host's [`Lab::wan_ip`]): that cuts the direct path between two sites while both
    /// still reach the relay. Undo with [`Lab::clear`].
    pub fn block_udp(&self, node: &str, a: Ipv4Addr, b: Ipv4Addr) -> Result<Fault, LabError> {
        self.add_fault(
            node,
            &[
                format!("ip saddr {a} ip daddr {b} meta l4proto udp drop"),
                format!("ip saddr {b} ip daddr {a} meta l4proto udp drop"),
            ],
        )
    }

    /// Drops UDP from `from` to `to`'s port `port` (one way, and so the answers that
    /// never come), at `node`: for example a node's QUIC to its relay, while the
    /// relay's STUN port and everything else still pass. Undo with [`Lab::clear`].
    pub fn block_udp_port(
        &self,
        node: &str,
        from: Ipv4Addr,
        to: Ipv4Addr,
        port: u16,
    ) -> Result<Fault, LabError> {
        self.add_fault(
            node,
            &[format!(
                "ip saddr {from} ip daddr {to} udp dport {port} drop"
            )],
        )
    }

    /// Drops `percent`% of all IPv4 packets passing (or entering and leaving) `node`,
    /// at random. Undo with [`Lab::clear`].
    pub fn loss(&self, node: &str, percent: u8) -> Result<Fault, LabError> {
        if percent > 100 {
            return Err(LabError::new(format!(
                "loss of {percent}% is not a percentage"
            )));
        }
        // `numgen random mod 100` yields 0..=99, so `< 100` is out of nft's range.
        let rule = if percent == 100 {
            "meta nfproto ipv4 drop".to_string()
        } else {
            format!("meta nfproto ipv4 numgen random mod 100 < {percent} counter drop")
        };
        self.add_fault(node, &[rule])
    }

    /// Reorders IPv4 packets arriving at `node` (forwarded or addressed to it):
    /// `percent`% of them, at random, are held back for `hold` while the rest go on,
    /// so later packets of the same flow overtake them ([`crate::reorder`]). Stops
    /// when the returned [`Reorderer`] is dropped; the rule that feeds it stays until
    /// the lab is torn down, and lets packets pass while no reorderer listens.
    pub fn reorder(&self, node: &str, percent: u8, hold: Duration) -> Result<Reorderer, LabError> {
        if percent > 100 {
            return Err(LabError::new(format!(
                "reordering {percent}% is not a percentage"
            )));
        }
        let queue = self
            .in_ns(node, crate::reorder::open_queue)?
            .map_err(|e| LabError::new(format!("cannot open an NFQUEUE in {node}: {e}")))?;
        let reorderer = Reorderer::start(queue, percent, hold);
        // iptables, not nft: kernels without nft's own `queue` expression
        // (CONFIG_NFT_QUEUE) still have the xtables NFQUEUE target, which iptables-nft
        // reaches through nft's compat layer.
        let queue = crate::reorder::QUEUE.to_string();
        self.run(
            node,
            "iptables",
            &[
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-j",
                "NFQUEUE",
                "--queue-num",
                &queue,
                "--queue-bypass",
            ],
        )
        .map_err(|e| {
            LabError::new(format!(
                "reordering needs iptables (apt install iptables): {e}"
            ))
        })?;
        Ok(reorderer)
    }

    /// Counts packets entering `node` (its prerouting hook, before conntrack and NAT:
    /// on a host's router, everything the host sends past its own LAN, forwarded or
    /// addressed to the router). Each `(name, matches)` is a named nft counter with
    /// its match, e.g. `("udp", "ip saddr 192.168.2.2 meta l4proto udp")`. Read them
    /// with [`Lab::packets`].
    pub fn watch(&self, node: &str, counters: &[(&str, String)]) -> Result<(), LabError> {
        let mut script = format!(
            "add table inet {WATCH_TABLE}\n\
             add chain inet {WATCH_TABLE} pre {{ type filter hook prerouting priority raw - 10; policy accept; }}\n"
        );
        // Counter names get a prefix: words such as `all` or `udp` are nft keywords.
        for (name, matches) in counters {
            script.push_str(&format!(
                "add counter inet {WATCH_TABLE} c_{name}\n\
                 add rule inet {WATCH_TABLE} pre {matches} counter name c_{name}\n"
            ));
        }
        self.nft(node, &script)
    }

    /// Packets counted so far by each [`Lab::watch`] counter on `node`, read in one
    /// listing so that counters of the same traffic can be compared.
    pub fn packets(&self, node: &str) -> Result<std::collections::BTreeMap<String, u64>, LabError> {
        self.counted(node, "packets")
    }

    /// Bytes (IP packets, headers included) counted so far by each [`Lab::watch`]
    /// counter on `node`.
    pub fn bytes(&self, node: &str) -> Result<std::collections::BTreeMap<String, u64>, LabError> {
        self.counted(node, "bytes")
    }

    fn counted(
        &self,
        node: &str,
        what: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, LabError> {
        let mut cmd = self.command(node, "nft");
        cmd.args(["list", "counters", "table", "inet", WATCH_TABLE]);
        let out = run_command(cmd, None)?;
        let mut counts = std::collections::BTreeMap::new();
        let mut name = None;
        for word in out.split_whitespace().collect::<Vec<_>>().windows(2) {
            match word {
                ["counter", n] => name = n.strip_prefix("c_").map(str::to_string),
                [w, n] if *w == what => {
                    if let (Some(name), Ok(n)) = (name.take(), n.parse()) {
                        counts.insert(name, n);
                    }
                }
                _ => {}
            }
        }
        if counts.is_empty() {
            return Err(LabError::new(format!(
                "no {what} counts in nft output {out:?}"
            )));
        }
        Ok(counts)
    }

    /// Removes the rules a fault added.
    pub fn clear(&self, fault: Fault) -> Result<(), LabError> {
        let script: String = fault
            .handles
            .iter()
            .map(|(chain, handle)| {
                format!("delete rule inet {FAULT_TABLE} {chain} handle {handle}\n")
            })
            .collect();
        self.nft(&fault.node, &script)
    }

    /// Adds each rule to the fault table's prerouting (everything arriving, forwarded or
    /// not) and output (everything the node itself sends) chains; both at raw priority,
    /// before conntrack.
    fn add_fault(&self, node: &str, rules: &[String]) -> Result<Fault, LabError> {
        let mut script = format!(
            "add table inet {FAULT_TABLE}\n\
             add chain inet {FAULT_TABLE} pre {{ type filter hook prerouting priority raw; policy accept; }}\n\
             add chain inet {FAULT_TABLE} out {{ type filter hook output priority raw; policy accept; }}\n"
        );
        for rule in rules {
            for chain in ["pre", "out"] {
                script.push_str(&format!("add rule inet {FAULT_TABLE} {chain} {rule}\n"));
            }
        }
        // `--echo --handle` prints each added rule with its handle, which is how a
        // single rule is deleted later.
        let out = self.nft_output(node, &script, &["-e", "-a"])?;
        let mut handles = Vec::new();
        for line in out.lines() {
            let Some(rest) = line.strip_prefix(&format!("add rule inet {FAULT_TABLE} ")) else {
                continue;
            };
            let chain = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            let handle = line
                .rsplit_once("# handle ")
                .and_then(|(_, h)| h.trim().parse::<u64>().ok())
                .ok_or_else(|| LabError::new(format!("no rule handle in nft output {line:?}")))?;
            handles.push((chain, handle));
        }
        if handles.len() != rules.len() * 2 {
            return Err(LabError::new(format!(
                "expected {} rule handles from nft, got output:\n{out}",
                rules.len() * 2
            )));
        }
        Ok(Fault {
            node: node.to_string(),
            handles,
        })
    }

    fn nft_output(&self, node: &str, script: &str, flags: &[&str]) -> Result<String, LabError> {
        let mut cmd = self.command(node, "nft");
        cmd.args(flags).args(["-f", "-"]);
        run_command(cmd, Some(script))
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("lab of {} has no node {name:?}", self.test))
    }

    fn site_of(&self, node: &str) -> &Site {
        let n = self.node(node);
        let name = n
            .site
            .as_deref()
            .unwrap_or_else(|| panic!("node {node:?} is not on a NAT site"));
        self.sites
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("site {name:?} missing"))
    }

    /// Step 1, the only one whose failure means "cannot run labs here".
    fn create_namespaces(&self) -> Result<(), LabError> {
        let script: String = self
            .nodes
            .iter()
            .map(|n| format!("netns add {}\n", n.ns))
            .collect();
        let mut cmd = Command::new("ip");
        cmd.args(["-batch", "-"]);
        if let Err(e) = run_command(cmd, Some(&script)) {
            // Some may exist; the caller returns without a Lab, so nothing else will
            // remove them.
            self.delete_namespaces();
            return Err(e);
        }
        Ok(())
    }

    fn configure(&self) -> Result<(), LabError> {
        // Sysctls before links: a new interface copies `conf.default`, so rp_filter
        // must already be off when the veths appear.
        std::thread::scope(|s| {
            let jobs: Vec<_> = self
                .nodes
                .iter()
                .map(|n| s.spawn(move || self.sysctls(n)))
                .collect();
            join_all(jobs)
        })?;

        // All veth pairs in one `ip` process, each end created in its namespace. Every
        // end gets an interface index unique in the lab: the kernel finishes bringing a
        // veth up (operstate, transmit queue) at once only if its index differs from
        // its peer's; fresh namespaces would otherwise number both ends 2, and then the
        // link waits for the kernel's rate-limited "linkwatch" run, up to a second.
        let script: String = self
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!(
                    "link add name {} index {} netns {} type veth peer name {} index {} netns {}\n",
                    l.a_dev,
                    FIRST_VETH_INDEX + 2 * i,
                    self.ns(&l.a),
                    l.b_dev,
                    FIRST_VETH_INDEX + 2 * i + 1,
                    self.ns(&l.b)
                )
            })
            .collect();
        let mut cmd = Command::new("ip");
        cmd.args(["-batch", "-"]);
        run_command(cmd, Some(&script))?;

        // Per namespace: addresses, routes, bridges, NAT rules; in parallel.
        std::thread::scope(|s| {
            let jobs: Vec<_> = self
                .nodes
                .iter()
                .map(|n| s.spawn(move || self.configure_node(n)))
                .collect();
            join_all(jobs)
        })
    }

    fn sysctls(&self, node: &Node) -> Result<(), LabError> {
        let forwards = matches!(node.role, Role::Core | Role::Router | Role::Carrier);
        let mut settings = vec![
            (
                "net/ipv6/conf/all/forwarding",
                if node.role == Role::Core { "1" } else { "0" },
            ),
            // No duplicate address detection: link-local addresses would stay
            // tentative for a second or two after a link comes up, and neighbour
            // discovery (so every IPv6 packet) waits for them meanwhile.
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            // Routing here is symmetric, but reverse-path filtering only ever hides
            // lab mistakes behind silent drops.
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/ip_forward", if forwards { "1" } else { "0" }),
        ];
        if node.role == Role::Router {
            // If br_netfilter is loaded, bridged LAN frames would otherwise traverse
            // the router's IP hooks (conntrack, NAT, faults); a real LAN switch doesn't.
            settings.push(("net/bridge/bridge-nf-call-iptables", "0"));
        }
        let path = ns_path(&node.ns);
        run_in_netns(&path, || -> Result<(), LabError> {
            for (key, value) in &settings {
                let file = Path::new("/proc/sys").join(key);
                match std::fs::write(&file, value) {
                    Ok(()) => {}
                    // br_netfilter not loaded: nothing to turn off.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && key.starts_with("net/bridge") => {}
                    Err(e) => {
                        return Err(LabError::new(format!(
                            "{}: write {value} to {}: {e}",
                            node.ns,
                            file.display()
                        )));
                    }
                }
            }
            Ok(())
        })?
    }

    fn configure_node(&self, node: &Node) -> Result<(), LabError> {
        let mut ip = vec!["link set lo up".to_string()];
        fn up(dev: &str, addr: Option<String>, ip: &mut Vec<String>) {
            ip.push(format!("link set {dev} up"));
            if let Some(addr) = addr {
                ip.push(format!("addr add {addr} dev {dev}"));
            }
        }
        match node.role {
            Role::Core => {
                for l in self.links.iter().filter(|l| l.a == CORE) {
                    let k = l.a_dev.trim_start_matches('s');
                    up(&l.a_dev, Some(format!("198.18.{k}.1/24")), &mut ip);
                    // Every core link carries IPv6 too; only public hosts use it.
                    if let Ok(k) = k.parse::<u8>() {
                        ip.push(format!(
                            "addr add 2001:db8:{k:x}::1/64 dev {} nodad",
                            l.a_dev
                        ));
                    }
                }
            }
            Role::Public { v4, .. } => {
                let k = node.addr.octets()[2];
                if v4 {
                    up("eth0", Some(format!("{}/24", node.addr)), &mut ip);
                    ip.push(format!("route add default via {}", gateway(node.addr)));
                } else {
                    up("eth0", None, &mut ip);
                }
                // `nodad`: usable at once, without duplicate address detection's wait.
                ip.push(format!("addr add {}/64 dev eth0 nodad", v6_site_side(k)));
                ip.push(format!("route add ::/0 via 2001:db8:{k:x}::1"));
            }
            Role::Host => {
                let gw = gateway(node.addr);
                up("eth0", Some(format!("{}/24", node.addr)), &mut ip);
                ip.push(format!("route add default via {gw}"));
            }
            Role::Carrier => {
                let k = self.site_of(&node.name).k;
                up("wan", Some(format!("{}/24", node.addr)), &mut ip);
                up("lan", Some(format!("100.64.{k}.1/24")), &mut ip);
                ip.push(format!("route add default via {}", gateway(node.addr)));
            }
            Role::Router => {
                let k = self.site_of(&node.name).k;
                up("wan", Some(format!("{}/24", node.addr)), &mut ip);
                ip.push(format!("route add default via {}", gateway(node.addr)));
                // The LAN is a bridge, so hosts on it talk directly at layer 2, like a
                // home switch, without the router forwarding (or NATing) between them.
                ip.push("link add name lan type bridge".to_string());
                up("lan", Some(format!("192.168.{k}.1/24")), &mut ip);
                for l in self
                    .links
                    .iter()
                    .filter(|l| l.a == node.name && l.a_dev.starts_with('h'))
                {
                    ip.push(format!("link set {} master lan", l.a_dev));
                    up(&l.a_dev, None, &mut ip);
                }
            }
        }
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &node.ns, "-batch", "-"]);
        let mut script = ip.join("\n");
        script.push('\n');
        run_command(cmd, Some(&script))?;

        if matches!(node.role, Role::Router | Role::Carrier) {
            let site = self.site_of(&node.name);
            let rules = nat_rules(site.kind, node.addr, site.k);
            self.nft(&node.name, &rules)?;
        }
        self.wait_until_up(node)
    }

    /// Waits until `node` can send on all its links: each veth operationally up, each
    /// bridge port forwarding, each bridge with carrier. A packet sent earlier is
    /// dropped, and if it was an ARP request the neighbour entry retries only a second
    /// later, so a test's first packet would silently take a second or be lost. (A
    /// bridge's own operstate may stay UNKNOWN for up to a second, until the kernel's
    /// rate-limited linkwatch run; it forwards meanwhile, so it is not waited for.)
    fn wait_until_up(&self, node: &Node) -> Result<(), LabError> {
        let deadline = Instant::now() + LINK_UP_LIMIT;
        loop {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", &node.ns, "-d", "-o", "link"]);
            let out = run_command(cmd, None)?;
            let down: Vec<&str> = out.lines().filter(|l| !link_ready(l)).collect();
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let summary: Vec<&str> = down
                    .iter()
                    .map(|l| l.split(" link/").next().unwrap_or(l))
                    .collect();
                return Err(LabError::new(format!(
                    "{}: links not up after {LINK_UP_LIMIT:?}:\n{}",
                    node.ns,
                    summary.join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills every process in the lab's namespaces and deletes them.
    fn delete_namespaces(&self) {
        if let Err(e) = delete_namespaces(&self.namespaces()) {
            eprintln!(
                "netlab: deleting the namespaces of {} failed: {e}",
                self.test
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !std::mem::take(&mut self.live) {
            return;
        }
        if keep() {
            let core = self.ns(CORE).to_string();
            // Straight to stderr, past libtest's capture: the point is to be seen.
            let _ = writeln!(
                std::io::stderr(),
                "netlab: FERRY_TEST_KEEP is set; kept the namespaces of {} ({}*):\n  {}\n\
                 inspect with e.g. `ip netns exec {core} ip addr`, `ip -n {core} route`, \
                 `ip netns exec <ns> nft list ruleset`;\n\
                 remove with `for n in $(ip netns list | grep -o '^{}[^ ]*'); do ip netns pids $n | xargs -r kill -9; ip netns del $n; done`",
                self.test,
                self.prefix,
                self.namespaces().join("\n  "),
                self.prefix,
            );
            return;
        }
        self.delete_namespaces();
    }
}

/// Rules removed by [`Lab::clear`]: a node and the handles of rules in its fault table.
#[derive(Debug)]
#[must_use = "a fault stays in place until passed to Lab::clear"]
pub struct Fault {
    node: String,
    handles: Vec<(String, u64)>,
}

/// The nftables ruleset of a site's router (both routers of a CGNAT site): `wan` is its
/// WAN address, `k` the site number (LAN `192.168.k.0/24`).
pub fn nat_rules(kind: NatKind, wan: Ipv4Addr, k: u8) -> String {
    let postrouting = |rule: &str| {
        format!(
            "  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"wan\" {rule}\n  }}\n"
        )
    };
    let body = match kind {
        NatKind::Masquerade | NatKind::Cgnat => postrouting("masquerade"),
        NatKind::Symmetric => postrouting("masquerade fully-random"),
        NatKind::FullCone => {
            let host = Ipv4Addr::new(192, 168, k, 2);
            // Mapping: snat to the WAN address; without a port range Linux keeps the
            // source port if free, so one LAN port maps to one WAN port for every
            // destination. Filtering: a new inbound UDP flow (replies match conntrack
            // and never reach this chain) goes to the host, port unchanged.
            format!(
                "  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                 iifname \"wan\" meta l4proto udp dnat ip to {host}\n  }}\n{}",
                postrouting(&format!("snat ip to {wan}"))
            )
        }
        NatKind::UdpBlocked => format!(
            "  chain udpblock {{\n    type filter hook forward priority filter; policy accept;\n    \
             iifname \"lan\" oifname \"wan\" meta l4proto udp drop\n  }}\n{}",
            postrouting("masquerade")
        ),
    };
    format!("table ip {NAT_TABLE} {{\n{body}}}\n")
}

/// Runs the closure on a fresh thread inside the network namespace at `path`.
/// [`Lab::in_ns`] by the namespace's name.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> Result<T, LabError> {
    run_in_netns(&ns_path(ns), f)
}

fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(path: &Path, f: F) -> Result<T, LabError> {
    let file =
        File::open(path).map_err(|e| LabError::new(format!("open {}: {e}", path.display())))?;
    let joined = std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) on a valid open nsfs descriptor; it only changes this
            // (fresh, short-lived) thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(LabError::new(format!("setns into {}: {e}", path.display()))),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs a command (with `stdin` if given); stdout on success, otherwise an error naming
/// the command and carrying its stderr.
fn run_command(mut cmd: Command, stdin: Option<&str>) -> Result<String, LabError> {
    let describe = || {
        let mut s = cmd.get_program().to_string_lossy().into_owned();
        for a in cmd.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    };
    let what = describe();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| LabError::new(format!("`{what}` could not start: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early closes the pipe; its status and stderr then say why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::new(format!("`{what}`: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let input = stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default();
    Err(LabError::new(format!(
        "`{what}` failed ({}): {}{input}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn join_all(
    jobs: Vec<std::thread::ScopedJoinHandle<'_, Result<(), LabError>>>,
) -> Result<(), LabError> {
    let mut first = Ok(());
    for job in jobs {
        let result = match job.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        if first.is_ok() {
            first = result;
        }
    }
    first
}

/// Whether one line of `ip -d -o link` shows an interface ready to carry packets.
fn link_ready(line: &str) -> bool {
    let flags = line
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags)
        .unwrap_or_default();
    let flag = |f: &str| flags.split(',').any(|x| x == f);
    if flag("LOOPBACK") {
        return true;
    }
    if line.contains(" bridge forward_delay ") {
        // The bridge itself: carrier comes on as soon as a port forwards.
        return flag("UP") && flag("LOWER_UP");
    }
    if line.contains(" bridge_slave ") && !line.contains(" bridge_slave state forwarding ") {
        return false;
    }
    line.contains(" state UP ")
}

/// `x.y.z.1` for an address in `x.y.z.0/24`: every lab link has its upstream at `.1`.
fn gateway(addr: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = addr.octets();
    Ipv4Addr::new(a, b, c, 1)
}

fn ns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

fn check_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::new(format!(
            "node name {name:?}: use 1 to 24 of a-z, 0-9 and -"
        )))
    }
}

fn keep() -> bool {
    std::env::var_os("FERRY_TEST_KEEP").is_some()
}

pub fn require() -> bool {
    std::env::var("FERRY_REQUIRE_NETLAB").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn skip(test: &str, reason: &str) -> Option<Lab> {
    skip_test(test, reason);
    None
}

/// Reports that `test` cannot run here and why: prints `SKIPPED: <test>: <reason>`, or
/// panics with the reason if `FERRY_REQUIRE_NETLAB=1` (CI), where a skip is a failure.
/// For lab tests that need more than the lab itself (a tool such as a stock client).
pub fn skip_test(test: &str, reason: &str) {
    if require() {
        panic!("the NAT lab is required (FERRY_REQUIRE_NETLAB=1) but {test} cannot run: {reason}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` in passing tests,
    // which would hide the skip from `cargo test`.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}

fn current_euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// Checks that `ip` and `nft` can be run at all.
fn tools_available() -> Result<(), String> {
    for (program, arg, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        let mut cmd = Command::new(program);
        cmd.arg(arg);
        run_command(cmd, None)
            .map_err(|e| format!("`{program}` ({package}) is not usable: {e}"))?;
    }
    Ok(())
}

/// Once per process: deletes lab namespaces of processes that no longer exist.
fn clean_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Kept labs are meant to outlive their test process.
        if !keep() {
            remove_stale_labs();
        }
    });
}

/// Deletes the lab namespaces of test processes that no longer exist (killed before
/// their `Lab` was dropped), with anything still running inside them.
pub fn remove_stale_labs() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| {
            owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    // Parallel test processes may race to delete the same stale namespace; the loser's
    // error is harmless.
    let _ = delete_namespaces(&stale);
}

/// Deletes namespaces and kills every process inside them. The names are removed
/// first, so nothing new can enter by name; then /proc is scanned for processes still
/// inside, which also catches one that was entering just then. Open handles on the
/// namespaces are held across the scan: a namespace freed by the deletion would let
/// the kernel reuse its inode number for another test's new namespace, whose
/// processes the scan would then kill.
fn delete_namespaces(names: &[String]) -> Result<(), LabError> {
    let handles: Vec<File> = names
        .iter()
        .filter_map(|n| File::open(ns_path(n)).ok())
        .collect();
    let targets: HashSet<(u64, u64)> = handles
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let script: String = names
        .iter()
        .filter(|n| ns_path(n).exists())
        .map(|n| format!("netns del {n}\n"))
        .collect();
    let deleted = if script.is_empty() {
        Ok(())
    } else {
        let mut cmd = Command::new("ip");
        cmd.args(["-force", "-batch", "-"]);
        run_command(cmd, Some(&script)).map(|_| ())
    };
    kill_processes_in(&targets);
    drop(handles);
    deleted
}

/// The process ID in a lab namespace name `fl<pid>-<n>-<node>`.
fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix("fl")?;
    let (pid, rest) = rest.split_once('-')?;
    let (n, node) = rest.split_once('-')?;
    if node.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// SIGKILLs every process (other than this one) whose network namespace is one of
/// `targets` (device and inode of nsfs files): the check `ip netns pids` makes, but one
/// scan of /proc for all namespaces instead of one `ip` process each.
fn kill_processes_in(targets: &HashSet<(u64, u64)>) {
    if targets.is_empty() {
        return;
    }
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(meta) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if targets.contains(&(meta.dev(), meta.ino())) {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_lab_names() {
        assert_eq!(owner_pid("fl123-0-core"), Some(123));
        assert_eq!(owner_pid("fl123-4-a-nat"), Some(123));
        assert_eq!(owner_pid("fl123-core"), None);
        assert_eq!(owner_pid("flannel"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn plan_assigns_the_documented_addresses() {
        let lab = Lab::builder("plan")
            .relay("relay")
            .nat("a", NatKind::Masquerade, &["a1", "a2"])
            .nat("c", NatKind::Cgnat, &["c1"])
            .plan()
            .expect("valid plan");
        assert_eq!(lab.relay_ip(), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(lab.lan_ip("a2"), Ipv4Addr::new(192, 168, 2, 3));
        assert_eq!(lab.wan_ip("a2"), Ipv4Addr::new(198, 18, 2, 2));
        assert_eq!(lab.lan_ip("c-nat"), Ipv4Addr::new(100, 64, 3, 2));
        assert_eq!(lab.wan_ip("c1"), Ipv4Addr::new(198, 18, 3, 2));
        assert_eq!(lab.router("c1"), "c-nat");
        assert_eq!(lab.gateway_ip("c1"), Ipv4Addr::new(192, 168, 3, 1));
        assert_eq!(lab.gateway_ip("c-nat"), Ipv4Addr::new(100, 64, 3, 1));
        assert_eq!(lab.gateway_ip("c-cgn"), Ipv4Addr::new(198, 18, 3, 1));
        assert_eq!(lab.core_ip("c1"), Ipv4Addr::new(198, 18, 3, 1));
        assert_eq!(lab.core_ip("relay"), Ipv4Addr::new(198, 18, 1, 1));
        for ip in [lab.relay_ip(), lab.wan_ip("a1"), lab.wan_ip("c1")] {
            assert!(!ip.is_private() && !ip.is_loopback());
            assert!(!(ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64));
        }
    }

    #[test]
    fn plan_rejects_bad_descriptions() {
        assert!(Lab::builder("t").public("x").public("x").plan().is_err());
        assert!(Lab::builder("t").public("Bad_Name").plan().is_err());
        assert!(
            Lab::builder("t")
                .nat("f", NatKind::FullCone, &["f1", "f2"])
                .plan()
                .is_err()
        );
    }
}
