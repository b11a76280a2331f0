//! Relay URLs: `ferry://<relay-node-id>@host:port`. The node ID pins the relay's key,
//! so a URL is all a shim needs to reach a relay safely.
//!
//! Hand-written rather than `url`'s parser: relay URLs go into signed records, so only
//! what prints and parses back the same is accepted (`valid_host`); `url` accepts
//! more (escapes in hosts, paths, queries) and would need the same checks after it.

use std::fmt;
use std::str::FromStr;

use crate::identity::NodeId;

/// Port a relay listens on when a URL or flag gives none.
pub const DEFAULT_RELAY_PORT: u16 = 7842;

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid relay URL {url:?}: {why}; expected ferry://<relay-node-id>@host:port as printed by ferry-relay at start"
)]
pub struct UrlError {
    url: String,
    why: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RelayUrl {
    pub relay_id: NodeId,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl RelayUrl {
    /// `host:port` suitable for DNS resolution (`[v6]:port` for IPv6 literals).
    pub fn authority(&self) -> String {
        crate::net::host_port(&self.host, self.port)
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ferry://{}@{}", self.relay_id, self.authority())
    }
}

impl FromStr for RelayUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| UrlError {
            url: s.to_string(),
            why: why.to_string(),
        };
        let rest = s
            .strip_prefix("ferry://")
            .ok_or_else(|| err("it must start with ferry://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (id, hostport) = rest
            .split_once('@')
            .ok_or_else(|| err("the relay's node ID and '@' are missing"))?;
        let relay_id: NodeId = id
            .parse()
            .map_err(|_| err("the part before '@' is not a valid node ID"))?;
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("an IPv6 address is missing its closing ']'"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("unexpected text after ']'"))?,
                ),
            };
            (host, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if !valid_host(host) {
            return Err(err(
                "the host must be a DNS name (letters, digits, '-', '.', '_') or an IP address",
            ));
        }
        let port = match port {
            None => DEFAULT_RELAY_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("the port is not a number from 1 to 65535"))?,
        };
        Ok(RelayUrl {
            relay_id,
            host: host.to_string(),
            port,
        })
    }
}

/// A DNS name or an IP address literal. Nothing else: a relay URL is printed into
/// signed path records and parsed back by peers, so only hosts that print and parse
/// to the same thing are accepted (an unbracketed "a]:b" once did not).
fn valid_host(host: &str) -> bool {
    if host.contains(':') {
        return host.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl serde::Serialize for RelayUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RelayUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    #[test]
    fn parses_and_prints_round_trip() {
        let id = SecretKey::generate().node_id();
        for (text, host, port) in [
            (
                format!("ferry://{id}@relay.example:9000"),
                "relay.example",
                9000,
            ),
            (
                format!("ferry://{id}@192.0.2.1"),
                "192.0.2.1",
                DEFAULT_RELAY_PORT,
            ),
            (
                format!("ferry://{id}@[2001:db8::1]:443/"),
                "2001:db8::1",
                443,
            ),
        ] {
            let url: RelayUrl = text.parse().unwrap();
            assert_eq!(url.relay_id, id);
            assert_eq!(url.host, host);
            assert_eq!(url.port, port);
            let again: RelayUrl = url.to_string().parse().unwrap();
            assert_eq!(again, url);
        }
    }

    #[test]
    fn rejects_broken_urls_with_the_expected_shape() {
        let id = SecretKey::generate().node_id();
        for bad in [
            "http://x@y:1".to_string(),
            format!("ferry://{id}"),
            "ferry://notakey@host:1".to_string(),
            format!("ferry://{id}@host:0"),
            format!("ferry://{id}@host:99999"),
            format!("ferry://{id}@[::1"),
            format!("ferry://{id}@:5"),
            // Hosts that would not print and parse back the same (found by fuzzing).
            format!("ferry://{id}@a]:b:80"),
            format!("ferry://{id}@d0[1:201]:7842"),
            format!("ferry://{id}@relay\u{15}x:1"),
            format!("ferry://{id}@not:an:ipv6:80"),
        ] {
            let err = bad.parse::<RelayUrl>().unwrap_err().to_string();
            assert!(err.contains("ferry://<relay-node-id>@host:port"), "{err}");
        }
    }
}
