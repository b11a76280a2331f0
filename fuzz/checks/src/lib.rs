//! What each fuzz target checks. Every decoder that reads bytes from the network or a
//! file gets one function here, `fn(&[u8])`, that feeds it the input and asserts the
//! properties that must hold for *any* input: no panic, bounded work and memory, and
//! where a decoder has an encoder, that what decodes re-encodes to the same value.
//! Signature checks are also tested the other way round: a value re-signed by its
//! rightful key must verify, and a forged or transplanted signature must not.
//!
//! The fuzz targets in `fuzz/fuzz_targets/` are one line each around these functions
//! (built by `cargo fuzz`, see docs/fuzzing.md). Living in the main workspace, the
//! functions are also run by `cargo test`: `tests/replay.rs` feeds them every seed
//! (`fuzz/seeds/`) and every input that ever crashed a target
//! (`fuzz/regressions/`), so a fixed crash stays fixed without a fuzzer.
//!
//! Under `cargo fuzz` (`cfg(fuzzing)`) the allocator refuses any single allocation
//! above [`alloc_guard::MAX_ALLOCATION`], which turns "a length field made the decoder
//! reserve gigabytes" into a crash the fuzzer reports, like libFuzzer's
//! `-malloc_limit_mb` does with a sanitizer (these targets build without one, on the
//! stable toolchain: Ferry has no `unsafe` in its decoders).

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use ferry_proto::frame::{self, Frame, FrameCodec, PeerOpen, PeerOpenReply, PublicOpen};
use ferry_proto::grid::{Certificate, InviteCode};
use ferry_proto::record::SignedRecord;
use ferry_proto::{NodeId, RelayUrl, SecretKey};
use tokio_util::codec::{Decoder, Encoder};

pub mod alloc_guard;

/// One target's checks.
pub type Check = fn(&[u8]);

/// Every target, by name: what `cargo fuzz run NAME` runs and `fuzz/seeds/NAME/` feeds.
pub const TARGETS: &[(&str, Check)] = &[
    ("session_frames", session_frames),
    ("link_datagram", link_datagram),
    ("stream_headers", stream_headers),
    ("udp_channel", udp_channel),
    ("path_probe", path_probe),
    ("stun_server", stun_server),
    ("stun_client", stun_client),
    ("signed_record", signed_record),
    ("certificate", certificate),
    ("invite_code", invite_code),
    ("relay_config", relay_config),
    ("rendezvous_config", rendezvous_config),
    ("shim_config", shim_config),
    ("relay_files", relay_files),
    ("shim_files", shim_files),
    ("names_and_answers", names_and_answers),
];

/// "Now" for expiry checks: fixed, so a run is repeatable.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Two fixed keys: the rightful signer and a forger.
fn keys() -> (SecretKey, SecretKey) {
    (SecretKey::from_seed([7; 32]), SecretKey::from_seed([9; 32]))
}

/// Whether to also check the forgery properties for this input. They cost two or three
/// more signature operations, which instrumented are most of a target's time; checked
/// on a quarter of the inputs (fixed by the input, so a run replays the same), the
/// signature targets stay fast enough for tens of millions of executions.
fn check_forgeries(data: &[u8]) -> bool {
    data.len().is_multiple_of(4)
}

/// Text inputs: decoders of text see whatever UTF-8 the fuzzer makes.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Relay session frames, fed in pieces as a socket would deliver them (the first byte
/// picks the piece size). Whatever decodes must re-encode to the same bytes' meaning.
pub fn session_frames(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let mut codec = FrameCodec;
    let mut buf = BytesMut::new();
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => re_encodes(frame),
                Ok(None) => break,
                // A decoding error closes the session: nothing more is read.
                Err(_) => return,
            }
            // The decoder may reserve room for one announced frame, never more.
            assert!(buf.capacity() <= 5 + 32 + ferry_proto::limits::MAX_PACKET + 64 * 1024);
        }
    }
}

fn re_encodes(frame: Frame) {
    let mut out = BytesMut::new();
    if FrameCodec.encode(frame.clone(), &mut out).is_err() {
        // Only a control message that grew past the limit when re-serialised (JSON
        // escapes) may fail to encode.
        assert!(matches!(frame, Frame::Control(_)));
        return;
    }
    let again = FrameCodec
        .decode(&mut out)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is complete");
    assert_eq!(again, frame);
}

/// Overlay packets in QUIC DATAGRAMs on a relay link.
pub fn link_datagram(data: &[u8]) {
    if let Ok((peer, packet)) = frame::decode_datagram(bytes::Bytes::copy_from_slice(data)) {
        let again = frame::encode_datagram(&peer, &packet);
        assert_eq!(&again[..], data);
    }
}

/// Polls a future that can only be ready (its reader is a byte slice) to completion.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a read from memory never waits"),
    }
}

/// Stream headers (public-port and overlay streams) and the public stream's answer
/// byte: every header type a peer's stream can start with.
pub fn stream_headers(data: &[u8]) {
    fn header<T>(data: &[u8])
    where
        T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
    {
        let mut reader = Cursor::new(data);
        if let Ok(value) = ready(frame::read_header::<_, T>(&mut reader)) {
            let mut out = Vec::new();
            ready(frame::write_header(&mut out, &value)).expect("a decoded header encodes");
            let back: T = ready(frame::read_header(&mut Cursor::new(&out[..])))
                .expect("an encoded header decodes");
            assert_eq!(back, value);
        }
    }
    header::<PublicOpen>(data);
    header::<PeerOpen>(data);
    header::<PeerOpenReply>(data);

    use tokio::io::AsyncReadExt;
    let answer = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = answer.clone();
    let mut reader = frame::PublicAnswerReader::new(data, std::time::Instant::now(), move |a| {
        if let Ok(mut slot) = seen.lock() {
            *slot = Some(a);
        }
    });
    let mut rest = Vec::new();
    let result = ready(reader.read_to_end(&mut rest));
    drop(reader);
    let answer = answer.lock().map(|a| *a).unwrap_or(None);
    match data.first() {
        Some(&frame::PUBLIC_ACCEPTED) => {
            assert!(matches!(answer, Some(frame::PublicAnswer::Accepted(_))));
            assert_eq!(rest, &data[1..], "bytes after the answer pass untouched");
        }
        _ => {
            assert_eq!(answer, Some(frame::PublicAnswer::NotAccepted));
            assert!(rest.is_empty() && (data.is_empty() || result.is_err()));
        }
    }
}

/// Relay channel packets (plain UDP between a shim and its relay).
pub fn udp_channel(data: &[u8]) {
    use ferry_proto::channel;
    let parsed = channel::parse(data);
    assert_eq!(
        parsed.is_some(),
        channel::is_channel(data) && data.len() > channel::HEADER_LEN
    );
    // A token opens only packets of its own channel.
    let token = channel::ChannelToken::random();
    assert!(token.open(data).is_none() || parsed.map(|(id, _, _)| id) == Some(token.id));
    if let Some((_, masked, packet)) = parsed {
        // Rewriting the header in place (what the relay does) keeps the packet.
        let mut copy = data.to_vec();
        let node = token.node(&masked);
        channel::write_header(&mut copy, &token, &node);
        assert_eq!(token.open(&copy), Some((node, packet)));
    }
}

/// Path probes (signed pings between nodes on a candidate path).
pub fn path_probe(data: &[u8]) {
    use ferry_proto::probe::Probe;
    let (signer, forger) = keys();
    let Ok(probe) = Probe::decode(data) else {
        return;
    };
    // Whatever the input, only the sender's own signature verifies...
    let mut probe = probe;
    probe.sender = signer.node_id();
    let signed = probe.encode(&signer);
    assert_eq!(Probe::decode(&signed).ok(), Some(probe));
    assert!(probe.verify(&signed).is_ok());
    if !check_forgeries(data) {
        return;
    }
    // ...not another key's, and not a signature over other bytes.
    assert!(probe.verify(&probe.encode(&forger)).is_err());
    let mut tampered = signed;
    tampered[90] ^= 1;
    if let Ok(p) = Probe::decode(&tampered) {
        assert!(p.verify(&tampered).is_err());
    }
}

/// The STUN server's answer to any datagram, from an IPv4 and an IPv6 source.
pub fn stun_server(data: &[u8]) {
    use ferry_rendezvous::stun;
    let sources: [SocketAddr; 2] = [
        "198.51.100.7:40000".parse().expect("literal"),
        "[2001:db8::7]:40000".parse().expect("literal"),
    ];
    for from in sources {
        let Some(reply) = stun::handle(data, from) else {
            continue;
        };
        let request = stun::parse(data).expect("only STUN requests are answered");
        let answer = stun::parse(&reply).expect("answers are well-formed STUN");
        assert_eq!(answer.transaction_id, request.transaction_id);
        assert_eq!(answer.fingerprinted, request.fingerprinted);
        match stun::parse_binding_response(&reply, &request.transaction_id) {
            // A success answer: the source, and at most 52 bytes (IPv6, FINGERPRINT).
            Ok(addr) => {
                assert_eq!(addr, from);
                assert!(reply.len() <= 52);
            }
            // An error answer (420) lists the request's attributes, so it grows with
            // them; never by more than its fixed part.
            Err(_) => assert!(
                reply.len() <= data.len() + 32,
                "{} > {}",
                reply.len(),
                data.len()
            ),
        }
    }
}

/// A node reading its relay's STUN answer.
pub fn stun_client(data: &[u8]) {
    use ferry_rendezvous::stun;
    let txid = data.get(8..20).and_then(|t| <[u8; 12]>::try_from(t).ok());
    let _ = stun::parse_binding_response(data, &txid.unwrap_or_default());
}

/// Signed path records, as a rendezvous or peer receives them (JSON).
pub fn signed_record(data: &[u8]) {
    let (signer, forger) = keys();
    let Ok(signed) = serde_json::from_slice::<SignedRecord>(data) else {
        return;
    };
    let _ = signed.verify(now());
    // The same content signed by its node: verifies exactly when the content is
    // acceptable (sizes, validity window).
    let mut record = signed.record.clone();
    record.node_id = signer.node_id();
    let valid = record.check(now()).is_ok();
    let genuine = record.clone().sign(&signer);
    assert_eq!(genuine.verify(now()).is_ok(), valid);
    // It survives the wire unchanged.
    let wire = serde_json::to_vec(&genuine).expect("records serialise");
    let back: SignedRecord = serde_json::from_slice(&wire).expect("records parse back");
    assert_eq!(back, genuine);
    if !check_forgeries(data) {
        return;
    }
    // A record for node X signed by node Y never verifies.
    assert!(record.clone().sign(&forger).verify(now()).is_err());
    // Nor does a genuine signature over other content.
    let mut altered = genuine;
    altered.record.seq = altered.record.seq.wrapping_add(1);
    assert!(altered.verify(now()).is_err());
}

/// Membership certificates (JSON), as a relay receives them in `Register`.
pub fn certificate(data: &[u8]) {
    let (issuer, forger) = keys();
    let Ok(cert) = serde_json::from_slice::<Certificate>(data) else {
        return;
    };
    let member = cert.membership.member;
    let _ = cert.verify(&member, now());
    let mut membership = cert.membership.clone();
    membership.issuer = issuer.node_id();
    let unexpired = membership.expires > 1_800_000_000;
    let genuine = membership.clone().sign(&issuer);
    assert_eq!(genuine.verify(&member, now()).is_ok(), unexpired);
    if !check_forgeries(data) {
        return;
    }
    // Presented by another node, or signed by a key that is not the issuer's: refused.
    let other = NodeId::from_bytes([0xee; 32]);
    if other != member {
        assert!(genuine.verify(&other, now()).is_err());
    }
    assert!(membership.sign(&forger).verify(&member, now()).is_err());
}

/// Invite codes (typed or pasted by a user) and the secret a node presents.
pub fn invite_code(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(code) = text.parse::<InviteCode>() {
        let again: InviteCode = code.to_string().parse().expect("a printed invite parses");
        assert_eq!(again, code);
    }
    if let Some(secret) = InviteCode::parse_secret(text) {
        assert_eq!(
            InviteCode::parse_secret(&InviteCode::secret_text_of(&secret)),
            Some(secret)
        );
    }
}

/// A scratch directory per process for targets that need paths (nothing is read
/// from it: it only has to exist, or not).
fn scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("token"), "secret-token\n");
        dir
    })
}

/// `ferry-relay --config`: parsing, then the same checks as at start. Paths named in
/// the input are overridden, so the target never reads files the input names.
pub fn relay_config(data: &[u8]) {
    use ferry_relay::config::{FileConfig, Flags};
    let Some(text) = text(data) else { return };
    let _ = ferry_relay::ports::parse_range(text);
    let _ = ferry_relay::policy::parse_duration(text);
    let Ok(file) = ferry_proto::config::parse_toml::<FileConfig>(text, Path::new("relay.toml"))
    else {
        return;
    };
    let flags = Flags {
        data_dir: Some(scratch().to_path_buf()),
        admin_token_file: Some(scratch().join("token")),
        ..Flags::default()
    };
    let _ = flags.resolve_file(file);
}

/// `ferry-rendezvous --config`.
pub fn rendezvous_config(data: &[u8]) {
    use ferry_rendezvous::config::{FileConfig, Flags};
    let Some(text) = text(data) else { return };
    let Ok(file) =
        ferry_proto::config::parse_toml::<FileConfig>(text, Path::new("rendezvous.toml"))
    else {
        return;
    };
    let flags = Flags {
        data_dir: Some(scratch().to_path_buf()),
        admin_token_file: Some(scratch().join("token")),
        ..Flags::default()
    };
    let _ = flags.resolve_file(file);
}

/// `ferry-shim run --config`, and the command-line values that have their own syntax.
pub fn shim_config(data: &[u8]) {
    use ferry_shim::options::{self, CommonFlags, FileConfig, ShimOptions};
    let Some(text) = text(data) else { return };
    let _ = options::parse_service(text, false);
    let _ = options::parse_destination(text);
    let Ok(file) = ferry_proto::config::parse_toml::<FileConfig>(text, Path::new("shim.toml"))
    else {
        return;
    };
    let common = CommonFlags {
        data_dir: Some(scratch().join("no-such-dir")),
        admin_token_file: Some(scratch().join("token")),
        ..CommonFlags::default()
    };
    let _ = ShimOptions::resolve(file, common, vec![], vec![], vec![], false, vec![]);
}

/// Files the relay keeps: access lists, invites, the public-port store, its key.
pub fn relay_files(data: &[u8]) {
    use ferry_relay::{policy, ports};
    let Some(text) = text(data) else { return };
    let _ = policy::parse_lists(text);
    let _ = policy::parse_invites(text);
    if let Ok(entries) = ports::parse_store(text) {
        // Whatever the store says, the table keeps one port per service and one
        // owner per port, inside the range, and releases leave nothing behind.
        let mut table = ports::PortTable::new(20000..=20999, 8);
        let dropped = table.restore(entries.clone());
        let kept = table.entries();
        assert_eq!(kept.len() + dropped.len(), entries.len());
        for e in &kept {
            assert!((20000..=20999).contains(&e.port));
            assert_eq!(table.lookup(&e.node_id, &e.service), Some(e.port));
        }
        for e in &kept {
            table.release(&e.node_id, &e.service);
        }
        assert!(table.entries().is_empty());
    }
    if let Ok(key) = SecretKey::parse_key_file(text) {
        let _ = key.node_id();
    }
}

/// Files and system tables the shim reads: memberships, its key, the routing table.
pub fn shim_files(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(memberships) = ferry_shim::membership::Memberships::parse(text) {
        let _ = memberships.relays();
    }
    let _ = SecretKey::parse_key_file(text);
    let _ = ferry_shim::portmap::parse_default_gateway(text);
}

/// Names and answers from peers and users: relay URLs, proxy URLs, `.ferry` names
/// (from SOCKS clients), HTTP CONNECT answers (from proxies).
pub fn names_and_answers(data: &[u8]) {
    let _ = ferry_shim::proxy::check_connect_response(data);
    let Some(text) = text(data) else { return };
    if let Ok(url) = text.parse::<RelayUrl>() {
        // Records sign a relay URL's printed form, so printing and parsing must agree.
        let again: RelayUrl = url.to_string().parse().expect("a printed relay URL parses");
        assert_eq!(again, url);
    }
    if let Ok(proxy) = text.parse::<ferry_shim::proxy::ProxyUrl>()
        && proxy.credentials.is_none()
    {
        let again: ferry_shim::proxy::ProxyUrl = proxy
            .to_string()
            .parse()
            .expect("a printed proxy URL parses");
        assert_eq!(again.to_string(), proxy.to_string());
    }
    let _ = ferry_shim::socks_door::parse_ferry_name(text);
    let _ = text.parse::<NodeId>();
}
