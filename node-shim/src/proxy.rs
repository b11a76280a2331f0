//! Egress proxies for relay links (Tahoe ticket #1007): SOCKS5 with the relay's host
//! name handed to the proxy (remote DNS: the shim itself resolves nothing, which
//! private mode over Tor needs), and HTTP CONNECT. The link's TLS runs inside the
//! tunnel, so the proxy sees only ciphertext.
//!
//! SOCKS5 is `fast-socks5`'s client. HTTP CONNECT is written here: it is one request
//! and one status line, and the crates for it are thin wrappers that are not kept up.
//! Proxy URLs are parsed by `url` (user and password percent-decoded).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use fast_socks5::client::{Config as SocksConfig, Socks5Stream};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{AuthenticationMethod, Socks5Command};
use ferry_proto::net::host_port;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::{Host, Url};

/// How long reaching the relay through the proxy may take. Generous: over Tor a new
/// circuit takes seconds.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest HTTP CONNECT answer header read; a proxy sending more is refused.
const MAX_CONNECT_RESPONSE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Socks5,
    HttpConnect,
}

/// `socks5://[user:password@]host:port` (also `socks5h://`: the host name always goes
/// to the proxy) or `http://[user:password@]host[:port]` (port 80 when none is given,
/// as in any `http://` URL). A user or password holding `@`, `:` or `/` is written
/// percent-encoded (`us%40er`).
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub kind: ProxyKind,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// User and password, percent-decoded.
    pub credentials: Option<(String, String)>,
}

/// What a user name cannot hold unencoded in a URL (the URL standard's userinfo set,
/// and `%` so that the name reads back the same).
const USERINFO: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "invalid proxy {url:?}: {why}; expected socks5://HOST:PORT or http://HOST:PORT (optionally with user:password@)"
    )]
    Invalid { url: String, why: String },
    #[error("cannot reach the proxy {proxy}: {why}")]
    Unreachable { proxy: String, why: String },
    #[error("the proxy {proxy} did not open a tunnel to {target}: {why}")]
    Refused {
        proxy: String,
        target: String,
        why: String,
    },
    #[error("the proxy {proxy} did not answer within {} s", PROXY_TIMEOUT.as_secs())]
    Timeout { proxy: String },
}

impl fmt::Display for ProxyUrl {
    /// The URL with the password hidden (it is shown in status and logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            ProxyKind::Socks5 => "socks5",
            ProxyKind::HttpConnect => "http",
        };
        write!(f, "{scheme}://")?;
        if let Some((user, _)) = &self.credentials {
            write!(f, "{}:***@", utf8_percent_encode(user, USERINFO))?;
        }
        f.write_str(&host_port(&self.host, self.port))
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for ProxyUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ProxyUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for ProxyUrl {
    type Err = ProxyError;

    fn from_str(text: &str) -> Result<Self, ProxyError> {
        let invalid = |why: &str| ProxyError::Invalid {
            url: hide_password(text),
            why: why.to_string(),
        };
        let url = Url::parse(text).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => invalid("no scheme"),
            e => invalid(&e.to_string()),
        })?;
        let kind = match url.scheme() {
            "socks5" | "socks5h" => ProxyKind::Socks5,
            "http" => ProxyKind::HttpConnect,
            "https" => return Err(invalid("TLS to the proxy itself is not supported")),
            _ => return Err(invalid("unknown scheme")),
        };
        let host = match url.host() {
            Some(Host::Domain(name)) if !name.is_empty() => name.to_string(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(invalid("no host")),
        };
        // `socks5` has no default port, `http` has 80.
        let port = match url.port_or_known_default() {
            None => return Err(invalid("no port")),
            Some(0) => return Err(invalid("bad port")),
            Some(port) => port,
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("a proxy URL ends after the port"));
        }
        let decode = |part: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| invalid("the user or password is not UTF-8 once percent-decoded"))
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((decode(user)?, decode(password.unwrap_or(""))?)),
        };
        Ok(ProxyUrl {
            kind,
            host,
            port,
            credentials,
        })
    }
}

/// A proxy URL as typed, with any password replaced by `***`: errors quote what was
/// typed, and they end up in logs.
fn hide_password(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return text.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => text.to_string(),
    }
}

/// The proxy from the usual variables (`ALL_PROXY`, then `HTTPS_PROXY`, either
/// case), unless `NO_PROXY` exempts `host` ([`no_proxy_exempts`]), or `host` is this
/// machine (`localhost`, a loopback address), which no proxy can reach for us. For p2p
/// mode only: strict and private modes use only what is configured.
pub fn from_env(
    host: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<ProxyUrl>, ProxyError> {
    if ferry_proto::net::is_this_machine(host) {
        return Ok(None);
    }
    let get = |name: &str| {
        var(name)
            .or_else(|| var(&name.to_ascii_lowercase()))
            .filter(|v| !v.trim().is_empty())
    };
    if get("NO_PROXY").is_some_and(|list| no_proxy_exempts(&list, host)) {
        return Ok(None);
    }
    match get("ALL_PROXY").or_else(|| get("HTTPS_PROXY")) {
        Some(url) => url.parse().map(Some),
        None => Ok(None),
    }
}

/// Whether the `NO_PROXY` list exempts `host` (a name or an IP address), by curl's
/// rules as hyper-util's matcher implements them: comma-separated entries, each an IP
/// address, a CIDR block (`10.0.0.0/8`, `fd00::/8`), a domain that also covers its
/// subdomains (`example.com` or `.example.com`), or `*` for every host.
fn no_proxy_exempts(list: &str, host: &str) -> bool {
    // The matcher applies `*` to host names only; curl, and this, to IP addresses too.
    if list.split(',').any(|entry| entry.trim() == "*") {
        return true;
    }
    // A host that makes no URL cannot be matched: it keeps the proxy.
    let Ok(dst) = format!("https://{}/", host_port(host, 443)).parse::<axum::http::Uri>() else {
        return false;
    };
    // Only the matcher's NO_PROXY half is wanted (the proxy is a `ProxyUrl`, with
    // errors that name it), so the proxy it is given is a stand-in that is never used:
    // it answers "no proxy" exactly when NO_PROXY exempts the host.
    hyper_util::client::proxy::matcher::Matcher::builder()
        .https("http://stand-in.invalid:1")
        .no(list)
        .build()
        .intercept(&dst)
        .is_none()
}

/// The proxy for links to a relay at `host`: the configured one, else (when the mode
/// allows it) the one the environment names. An error when there is none and the
/// mode may not reach relays directly (private mode).
pub fn for_relay(
    configured: Option<&ProxyUrl>,
    policy: &crate::mode::Policy,
    host: &str,
) -> Result<Option<ProxyUrl>, String> {
    let proxy = match configured {
        Some(p) => Some(p.clone()),
        None if policy.proxy_from_env => {
            from_env(host, |name| std::env::var(name).ok()).map_err(|e| e.to_string())?
        }
        None => None,
    };
    if proxy.is_none() && !policy.quic_relay {
        return Err(format!(
            "{} mode reaches relays only through its SOCKS5 proxy, and none is configured: pass --proxy or set proxy = \"socks5://IP:PORT\"",
            policy.mode.name()
        ));
    }
    Ok(proxy)
}

impl ProxyUrl {
    /// Whether the proxy itself is named by an IP address (no DNS needed to reach it).
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }

    /// The proxy's own address, resolved.
    pub async fn addr(&self) -> Result<SocketAddr, ProxyError> {
        let unreachable = |why: String| ProxyError::Unreachable {
            proxy: self.to_string(),
            why,
        };
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(format!("cannot resolve {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| unreachable(format!("{} resolves to no address", self.host)))
    }

    /// Opens a TCP tunnel to `host:port` through the proxy. `host` goes to the proxy
    /// as given (a name is resolved by the proxy). Returns the tunnel and the proxy's
    /// address.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let attempt = async {
            let addr = self.addr().await?;
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| ProxyError::Unreachable {
                    proxy: self.to_string(),
                    why: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            let tcp = match self.kind {
                ProxyKind::Socks5 => self.socks5(tcp, host, port).await?,
                ProxyKind::HttpConnect => self.http_connect(tcp, host, port).await?,
            };
            Ok((tcp, addr))
        };
        tokio::time::timeout(PROXY_TIMEOUT, attempt)
            .await
            .map_err(|_| ProxyError::Timeout {
                proxy: self.to_string(),
            })?
    }

    /// A relay link through the proxy: TLS over TCP inside the tunnel (QUIC cannot
    /// cross a SOCKS or HTTP CONNECT proxy), with the relay's host name resolved by
    /// the proxy.
    pub async fn relay_link(
        &self,
        relay: &ferry_proto::RelayUrl,
        tls: rustls::ClientConfig,
    ) -> Result<ferry_proto::link::Link, String> {
        let (tcp, proxy_addr) = self
            .connect(&relay.host, relay.port)
            .await
            .map_err(|e| e.to_string())?;
        let alpn = ferry_proto::tls::ALPN_RELAY;
        ferry_proto::link::connect_tcp_stream(tcp, proxy_addr, tls.clone(), tls, alpn)
            .await
            .map_err(|e| format!("through the proxy {self}: {e}"))
    }

    fn refused(&self, host: &str, port: u16, why: impl fmt::Display) -> ProxyError {
        ProxyError::Refused {
            proxy: self.to_string(),
            target: host_port(host, port),
            why: why.to_string(),
        }
    }

    async fn socks5(&self, tcp: TcpStream, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let auth = self
            .credentials
            .clone()
            .map(|(username, password)| AuthenticationMethod::Password { username, password });
        let mut stream = Socks5Stream::use_stream(tcp, auth, SocksConfig::default())
            .await
            .map_err(|e| self.refused(host, port, format!("SOCKS5 greeting failed: {e}")))?;
        let target = match host.parse::<IpAddr>() {
            Ok(ip) => TargetAddr::Ip(SocketAddr::new(ip, port)),
            Err(_) => TargetAddr::Domain(host.to_string(), port),
        };
        stream
            .request(Socks5Command::TCPConnect, target)
            .await
            .map_err(|e| self.refused(host, port, e))?;
        Ok(stream.get_socket())
    }

    async fn http_connect(
        &self,
        mut tcp: TcpStream,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, ProxyError> {
        let target = host_port(host, port);
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((user, password)) = &self.credentials {
            let token = data_encoding::BASE64.encode(format!("{user}:{password}").as_bytes());
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        let io_err = |e: std::io::Error| self.refused(host, port, e);
        tcp.write_all(request.as_bytes()).await.map_err(io_err)?;
        // Byte by byte up to the blank line: the tunnel's first bytes must stay in the
        // socket for TLS. Done once per link, so the cost does not matter.
        let mut header = Vec::with_capacity(256);
        loop {
            let byte = tcp.read_u8().await.map_err(io_err)?;
            header.push(byte);
            if header.ends_with(b"\r\n\r\n") {
                break;
            }
            if header.len() >= MAX_CONNECT_RESPONSE {
                return Err(self.refused(host, port, "its answer header is too long"));
            }
        }
        check_connect_response(&header).map_err(|why| self.refused(host, port, why))?;
        Ok(tcp)
    }
}

/// Checks an HTTP CONNECT answer header: any 2xx opens the tunnel.
pub fn check_connect_response(header: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(header);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let reason = parts.next().unwrap_or_default().trim();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP answer: {status_line:?}"));
    }
    match code.parse::<u16>() {
        Ok(200..=299) => Ok(()),
        Ok(407) => {
            Err("407 Proxy Authentication Required: give user:password@ in the proxy URL".into())
        }
        Ok(code) => Err(format!("HTTP {code} {reason}")),
        Err(_) => Err(format!("bad status line {status_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_proxy_url_is_quoted_without_its_password() {
        for bad in [
            "http://user:s3cret@",
            "ftp://user:s3cret@proxy:21",
            "socks5://user:s3cret@proxy",
        ] {
            let err = bad.parse::<ProxyUrl>().unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("user:***@"), "{err}");
        }
        assert_eq!(hide_password("socks5://proxy"), "socks5://proxy");
    }

    #[test]
    fn proxy_urls_parse_and_hide_passwords() {
        let p: ProxyUrl = "socks5://127.0.0.1:9050".parse().unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (ProxyKind::Socks5, "127.0.0.1", 9050)
        );
        assert!(p.is_ip());
        let p: ProxyUrl = "socks5h://alice:s3cret@proxy.example:1080/"
            .parse()
            .unwrap();
        assert_eq!(p.credentials, Some(("alice".into(), "s3cret".into())));
        assert_eq!(p.to_string(), "socks5://alice:***@proxy.example:1080");
        assert!(!format!("{p:?}").contains("s3cret"));
        let p: ProxyUrl = "http://[::1]:3128".parse().unwrap();
        assert_eq!((p.kind, p.host.as_str()), (ProxyKind::HttpConnect, "::1"));
        assert_eq!(p.to_string(), "http://[::1]:3128");
        let p: ProxyUrl = "HTTP://Proxy.Example".parse().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 80));
        for bad in [
            "127.0.0.1:1080",
            "ftp://h:1",
            "socks5://h",
            "socks5://:1",
            "http://h:0",
            "http://h:65536",
            "https://h:443",
            "socks5://h:1/path",
            "http://h:1/?q",
            "socks5://u:%FF@h:1",
        ] {
            let err = bad.parse::<ProxyUrl>().unwrap_err().to_string();
            assert!(err.contains("expected socks5://HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn user_and_password_are_percent_decoded() {
        let p: ProxyUrl = "http://us%40er:p%3Ass@host:8080".parse().unwrap();
        assert_eq!(p.credentials, Some(("us@er".into(), "p:ss".into())));
        assert_eq!((p.host.as_str(), p.port), ("host", 8080));
        // Shown encoded again, so the user's `@` cannot be read as the host's start.
        assert_eq!(p.to_string(), "http://us%40er:***@host:8080");
        let again: ProxyUrl = "http://us%40er:p%3Ass@host:8080".parse().unwrap();
        assert_eq!(again, p);
        // An unencoded `@` in the password: the last `@` ends the user part.
        let p: ProxyUrl = "socks5://alice:p@ss@10.0.0.1:1080".parse().unwrap();
        assert_eq!(p.credentials, Some(("alice".into(), "p@ss".into())));
        assert_eq!(p.host, "10.0.0.1");
        // A user without a password, and non-ASCII.
        let p: ProxyUrl = "socks5://%C3%BCser@h:1".parse().unwrap();
        assert_eq!(p.credentials, Some(("üser".into(), String::new())));
    }

    #[test]
    fn environment_proxies_follow_the_usual_rules() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let got = from_env(
            "relay.example",
            env(&[("all_proxy", "socks5://10.0.0.1:1080")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.port, 1080);
        let got = from_env(
            "relay.example",
            env(&[("HTTPS_PROXY", "http://10.0.0.1:3128")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.kind, ProxyKind::HttpConnect);
        let both = env(&[
            ("ALL_PROXY", "socks5://10.0.0.1:1080"),
            ("HTTPS_PROXY", "http://10.0.0.1:3128"),
        ]);
        assert_eq!(
            from_env("r", both).unwrap().unwrap().kind,
            ProxyKind::Socks5
        );
        for no_proxy in ["*", "example", ".example", "relay.example,other"] {
            let vars: &'static [(&str, &str)] = Box::leak(Box::new([
                ("ALL_PROXY", "socks5://10.0.0.1:1080"),
                ("NO_PROXY", no_proxy),
            ]));
            assert!(
                from_env("relay.example", env(vars)).unwrap().is_none(),
                "{no_proxy}"
            );
        }
        let vars: &'static [(&str, &str)] = &[
            ("ALL_PROXY", "socks5://10.0.0.1:1080"),
            ("NO_PROXY", "ample"),
        ];
        assert!(from_env("relay.example", env(vars)).unwrap().is_some());
        assert!(from_env("r", env(&[])).unwrap().is_none());
        for local in ["localhost", "127.0.0.1", "::1"] {
            let vars: &'static [(&str, &str)] = &[("ALL_PROXY", "socks5://10.0.0.1:1080")];
            assert!(from_env(local, env(vars)).unwrap().is_none(), "{local}");
        }
        let err = from_env("r", env(&[("ALL_PROXY", "nonsense")])).unwrap_err();
        assert!(err.to_string().contains("nonsense"));
        // IP addresses and CIDR blocks in NO_PROXY apply to relays named by address.
        let vars: &'static [(&str, &str)] = &[
            ("ALL_PROXY", "socks5://192.0.2.1:1080"),
            ("no_proxy", "10.0.0.0/8, example.com"),
        ];
        assert!(from_env("10.1.2.3", env(vars)).unwrap().is_none());
        assert!(from_env("relay.example.com", env(vars)).unwrap().is_none());
        assert!(from_env("11.0.0.1", env(vars)).unwrap().is_some());
    }

    #[test]
    fn no_proxy_takes_addresses_blocks_and_domains() {
        let list = "10.0.0.0/8,example.com,.local,::1";
        for exempt in [
            "10.0.0.1",
            "10.255.255.255",
            "example.com",
            "relay.example.com",
            "EXAMPLE.com",
            "printer.local",
            "local",
            "::1",
        ] {
            assert!(no_proxy_exempts(list, exempt), "{exempt}");
        }
        for proxied in [
            "11.0.0.1",
            "192.168.1.1",
            "notexample.com",
            "example.com.evil",
            "localhost.org",
            "::2",
            "2001:db8::1",
        ] {
            assert!(!no_proxy_exempts(list, proxied), "{proxied}");
        }
        assert!(no_proxy_exempts("fd00::/8", "fd12:3456::1"));
        assert!(no_proxy_exempts("192.0.2.7", "192.0.2.7"));
        assert!(!no_proxy_exempts("192.0.2.7", "192.0.2.8"));
        // `*` is every host, addresses included; an empty list exempts none.
        assert!(no_proxy_exempts("a.example, *", "192.0.2.7"));
        assert!(no_proxy_exempts("*", "relay.example"));
        assert!(!no_proxy_exempts("", "relay.example"));
        assert!(!no_proxy_exempts(" , ", "10.0.0.1"));
    }

    #[test]
    fn connect_answers_are_checked() {
        assert!(check_connect_response(b"HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(check_connect_response(b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\n").is_ok());
        let e = check_connect_response(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap_err();
        assert_eq!(e, "HTTP 403 Forbidden");
        let e = check_connect_response(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            .unwrap_err();
        assert!(e.contains("user:password@"), "{e}");
        assert!(check_connect_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(check_connect_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }
}
