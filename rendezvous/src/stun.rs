//! STUN Binding (RFC 8489) as a sans-IO codec: bytes in, an optional reply out. No
//! sockets, no clock, so every rule is unit-tested here and the UDP driver stays thin.
//!
//! What the server does with a datagram:
//! - not STUN (wrong leading bits, magic cookie, length or attribute layout): drop;
//! - a FINGERPRINT that does not verify: drop (RFC 8489 §7.3);
//! - anything but a Binding *request* (indications, responses, other methods): drop,
//!   so the service never answers traffic that did not ask for an answer;
//! - a Binding request with a comprehension-required attribute it does not understand:
//!   420 Unknown Attribute listing them (§7.3.1);
//! - otherwise: a success response with XOR-MAPPED-ADDRESS set to the source address,
//!   plus FINGERPRINT when the request carried one.

use std::net::{IpAddr, SocketAddr};

/// The fixed magic cookie of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER_LEN: usize = 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;

const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
const ATTR_FINGERPRINT: u16 = 0x8028;
const ATTR_SOFTWARE: u16 = 0x8022;

/// SOFTWARE value of Ferry's own Binding requests. Its length is chosen so that a
/// request (20 header + 24 SOFTWARE + 8 FINGERPRINT = 52 bytes) is as long as the
/// longest success answer (IPv6 XOR-MAPPED-ADDRESS and FINGERPRINT): a server never
/// has to send a shim more than it received, so shims are never held back by the
/// STUN service's budget for answers that amplify (see `stun_service`).
const REQUEST_SOFTWARE: &[u8; 20] = b"ferry (request pad) ";
const FINGERPRINT_XOR: u32 = 0x5354_554E;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN message: {0}")]
    NotStun(&'static str),
    #[error("STUN FINGERPRINT does not match the message")]
    BadFingerprint,
    #[error("STUN response for another transaction")]
    WrongTransaction,
    #[error("STUN response has no usable XOR-MAPPED-ADDRESS")]
    NoAddress,
}

/// Whether a datagram starts like a STUN message (two zero bits, the magic cookie at
/// bytes 4..8, room for a header): the cheap test a socket shared with other protocols
/// (QUIC, probes) uses to sort packets before anything is parsed. QUIC packets always
/// have their first bit or their fixed bit set, so they never pass it.
pub fn looks_like_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN
        && packet[0] & 0xC0 == 0
        && packet[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// The transaction ID of something that [`looks_like_stun`], to match an answer to
/// the request that is waiting for it.
pub fn transaction_id(packet: &[u8]) -> Option<[u8; 12]> {
    packet.get(8..HEADER_LEN)?.try_into().ok()
}

/// A parsed message header plus its attributes (type, value) in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub msg_type: u16,
    pub transaction_id: [u8; 12],
    pub attributes: Vec<(u16, &'a [u8])>,
    /// True when the message ended in a FINGERPRINT that verified.
    pub fingerprinted: bool,
}

fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// Parses and checks a STUN message (layout and, if present, FINGERPRINT).
pub fn parse(packet: &[u8]) -> Result<Message<'_>, StunError> {
    if packet.len() < HEADER_LEN {
        return Err(StunError::NotStun("shorter than a header"));
    }
    let msg_type = u16::from_be_bytes([packet[0], packet[1]]);
    if msg_type & 0xC000 != 0 {
        return Err(StunError::NotStun("leading bits are not zero"));
    }
    let length = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    if !length.is_multiple_of(4) || HEADER_LEN + length != packet.len() {
        return Err(StunError::NotStun(
            "length field does not match the datagram",
        ));
    }
    if u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) != MAGIC_COOKIE {
        return Err(StunError::NotStun("wrong magic cookie"));
    }
    let mut transaction_id = [0u8; 12];
    transaction_id.copy_from_slice(&packet[8..20]);
    let mut attributes = Vec::new();
    let mut fingerprinted = false;
    let mut at = HEADER_LEN;
    while at < packet.len() {
        if fingerprinted {
            return Err(StunError::NotStun("attributes after FINGERPRINT"));
        }
        if packet.len() - at < 4 {
            return Err(StunError::NotStun("truncated attribute header"));
        }
        let kind = u16::from_be_bytes([packet[at], packet[at + 1]]);
        let len = u16::from_be_bytes([packet[at + 2], packet[at + 3]]) as usize;
        let start = at + 4;
        if packet.len() - start < padded(len) {
            return Err(StunError::NotStun("attribute runs past the end"));
        }
        let value = &packet[start..start + len];
        if kind == ATTR_FINGERPRINT {
            if len != 4 {
                return Err(StunError::NotStun("FINGERPRINT is not 4 bytes"));
            }
            let expected = crc32fast::hash(&packet[..at]) ^ FINGERPRINT_XOR;
            if u32::from_be_bytes([value[0], value[1], value[2], value[3]]) != expected {
                return Err(StunError::BadFingerprint);
            }
            fingerprinted = true;
        } else {
            attributes.push((kind, value));
        }
        at = start + padded(len);
    }
    Ok(Message {
        msg_type,
        transaction_id,
        attributes,
        fingerprinted,
    })
}

/// Builds messages attribute by attribute, fixing the length field as it goes.
struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    fn new(msg_type: u16, transaction_id: &[u8; 12]) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&msg_type.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(transaction_id);
        Builder { buf }
    }

    fn set_length(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    fn attribute(mut self, kind: u16, value: &[u8]) -> Self {
        self.buf.extend_from_slice(&kind.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf
            .resize(HEADER_LEN + padded(self.buf.len() - HEADER_LEN), 0);
        self.set_length();
        self
    }

    fn finish(mut self, fingerprint: bool) -> Vec<u8> {
        if fingerprint {
            // The length field must already count the FINGERPRINT attribute.
            let total = self.buf.len() - HEADER_LEN + 8;
            self.buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            let crc = crc32fast::hash(&self.buf) ^ FINGERPRINT_XOR;
            self.buf.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
            self.buf.extend_from_slice(&4u16.to_be_bytes());
            self.buf.extend_from_slice(&crc.to_be_bytes());
        }
        self.buf
    }
}

fn xor_address(addr: SocketAddr, transaction_id: &[u8; 12]) -> Vec<u8> {
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    key.extend_from_slice(transaction_id);
    let (family, ip): (u8, Vec<u8>) = match addr.ip() {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let mut out = vec![0, family];
    out.extend_from_slice(&port.to_be_bytes());
    out.extend(ip.iter().zip(key.iter()).map(|(a, k)| a ^ k));
    out
}

fn unxor_address(value: &[u8], transaction_id: &[u8; 12]) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    key.extend_from_slice(transaction_id);
    let raw: Vec<u8> = value[4..]
        .iter()
        .zip(key.iter())
        .map(|(a, k)| a ^ k)
        .collect();
    let ip = match (value[1], raw.len()) {
        (1, 4) => IpAddr::from(<[u8; 4]>::try_from(raw.as_slice()).ok()?),
        (2, 16) => IpAddr::from(<[u8; 16]>::try_from(raw.as_slice()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// What to do with one datagram that arrived at the STUN port from `from`.
pub fn handle(packet: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let msg = parse(packet).ok()?;
    if msg.msg_type != BINDING_REQUEST {
        return None;
    }
    let unknown: Vec<u16> = msg
        .attributes
        .iter()
        .map(|(kind, _)| *kind)
        .filter(|kind| *kind < 0x8000)
        .collect();
    if !unknown.is_empty() {
        let mut error = vec![0, 0, 4, 20];
        error.extend_from_slice(b"Unknown Attribute");
        let list: Vec<u8> = unknown.iter().flat_map(|k| k.to_be_bytes()).collect();
        let reply = Builder::new(BINDING_ERROR, &msg.transaction_id)
            .attribute(ATTR_ERROR_CODE, &error)
            .attribute(ATTR_UNKNOWN_ATTRIBUTES, &list)
            .finish(msg.fingerprinted);
        return Some(reply);
    }
    let reply = Builder::new(BINDING_SUCCESS, &msg.transaction_id)
        .attribute(
            ATTR_XOR_MAPPED_ADDRESS,
            &xor_address(from, &msg.transaction_id),
        )
        .finish(msg.fingerprinted);
    Some(reply)
}

/// A Binding request with FINGERPRINT, for a node asking how it is seen, padded with
/// a SOFTWARE attribute to the size of any success answer.
pub fn binding_request(transaction_id: &[u8; 12]) -> Vec<u8> {
    Builder::new(BINDING_REQUEST, transaction_id)
        .attribute(ATTR_SOFTWARE, REQUEST_SOFTWARE)
        .finish(true)
}

/// The reflexive address in a Binding success response to `transaction_id`.
pub fn parse_binding_response(
    packet: &[u8],
    transaction_id: &[u8; 12],
) -> Result<SocketAddr, StunError> {
    let msg = parse(packet)?;
    if msg.transaction_id != *transaction_id {
        return Err(StunError::WrongTransaction);
    }
    if msg.msg_type != BINDING_SUCCESS {
        return Err(StunError::NoAddress);
    }
    msg.attributes
        .iter()
        .find(|(kind, _)| *kind == ATTR_XOR_MAPPED_ADDRESS)
        .and_then(|(_, value)| unxor_address(value, transaction_id))
        .ok_or(StunError::NoAddress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_looks_like_stun_and_carries_its_transaction_id() {
        let id = [7u8; 12];
        let request = binding_request(&id);
        assert!(looks_like_stun(&request));
        assert_eq!(transaction_id(&request), Some(id));
        // A QUIC long header (first bit set), a short packet, a wrong cookie.
        let mut quic = request.clone();
        quic[0] = 0xC0;
        assert!(!looks_like_stun(&quic));
        assert!(!looks_like_stun(&request[..19]));
        let mut cookie = request.clone();
        cookie[5] ^= 1;
        assert!(!looks_like_stun(&cookie));
        assert_eq!(transaction_id(&request[..19]), None);
    }

    const TXID: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn binding_round_trip_reports_the_source_address_v4_and_v6() {
        for from in ["192.0.2.7:4242", "[2001:db8::17]:60000"] {
            let from: SocketAddr = from.parse().unwrap();
            let request = binding_request(&TXID);
            let reply = handle(&request, from).expect("a reply");
            assert_eq!(parse_binding_response(&reply, &TXID).unwrap(), from);
            assert!(parse(&reply).unwrap().fingerprinted);
            // Ferry's own requests are never smaller than their answers.
            assert!(
                reply.len() <= request.len(),
                "{} > {}",
                reply.len(),
                request.len()
            );
        }
    }

    #[test]
    fn a_request_without_fingerprint_gets_a_reply_without_one() {
        let request = Builder::new(BINDING_REQUEST, &TXID).finish(false);
        assert_eq!(request.len(), 20);
        let reply = handle(&request, "198.51.100.1:1".parse().unwrap()).unwrap();
        assert!(!parse(&reply).unwrap().fingerprinted);
    }

    #[test]
    fn rfc5769_sample_ipv4_response_decodes() {
        // RFC 5769 §2.2 sample response (SOFTWARE, XOR-MAPPED-ADDRESS,
        // MESSAGE-INTEGRITY, FINGERPRINT): 192.0.2.1:32853.
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220\
                   002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
                   80280004c07d4c96";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let txid: [u8; 12] = bytes[8..20].try_into().unwrap();
        let addr = parse_binding_response(&bytes, &txid).unwrap();
        assert_eq!(addr, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn garbage_bad_fingerprints_and_non_requests_are_dropped() {
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert!(handle(b"", from).is_none());
        assert!(handle(&[0xff; 20], from).is_none());
        let mut bad_cookie = binding_request(&TXID);
        bad_cookie[4] ^= 1;
        assert_eq!(
            parse(&bad_cookie).unwrap_err(),
            StunError::NotStun("wrong magic cookie")
        );
        assert!(handle(&bad_cookie, from).is_none());
        let mut bad_crc = binding_request(&TXID);
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        assert_eq!(parse(&bad_crc).unwrap_err(), StunError::BadFingerprint);
        assert!(handle(&bad_crc, from).is_none());
        // A response or an indication never gets an answer.
        let response = handle(&binding_request(&TXID), from).unwrap();
        assert!(handle(&response, from).is_none());
        let indication = Builder::new(0x0011, &TXID).finish(true);
        assert!(handle(&indication, from).is_none());
        // Length field lying about the size, and an attribute past the end.
        let mut long = binding_request(&TXID);
        long[3] = 200;
        assert!(handle(&long, from).is_none());
        let mut overflow = Builder::new(BINDING_REQUEST, &TXID)
            .attribute(0x8022, b"abcd")
            .finish(false);
        overflow[22..24].copy_from_slice(&400u16.to_be_bytes());
        assert!(handle(&overflow, from).is_none());
    }

    #[test]
    fn unknown_comprehension_required_attributes_get_420() {
        let request = Builder::new(BINDING_REQUEST, &TXID)
            .attribute(0x0024, &[0, 0, 0, 1]) // PRIORITY (ICE), not understood here
            .attribute(0x8022, b"client") // SOFTWARE: optional, ignored
            .finish(true);
        let reply = handle(&request, "192.0.2.1:1".parse().unwrap()).unwrap();
        let msg = parse(&reply).unwrap();
        assert_eq!(msg.msg_type, BINDING_ERROR);
        let error = msg
            .attributes
            .iter()
            .find(|(k, _)| *k == ATTR_ERROR_CODE)
            .unwrap()
            .1;
        assert_eq!(&error[2..4], &[4, 20]);
        let unknown = msg
            .attributes
            .iter()
            .find(|(k, _)| *k == ATTR_UNKNOWN_ATTRIBUTES)
            .unwrap()
            .1;
        assert_eq!(unknown, &[0x00, 0x24]);
    }
}
