//! The wire format of a relay session and of stream headers.
//!
//! A relay session is one bidirectional stream, opened by the node right after the
//! handshake, carrying length-prefixed frames: `type (u8) | length (u32, big endian) |
//! payload`. Control frames carry a JSON [`Control`] message; packet frames carry an
//! overlay packet with the other end's node ID (the destination on the way to the relay,
//! the source on the way back). The decoder is a sans-IO `tokio_util` codec: it checks
//! the declared length against the frame type's limit *before* buffering the body, so
//! a peer claiming a 4 GiB frame is refused after five bytes.
//!
//! Streams that carry user bytes (public-port connections, overlay streams) start with
//! one small JSON header (`u16` length prefix) and then carry raw bytes.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::grid::Certificate;
use crate::identity::NodeId;
use crate::limits::{MAX_CONTROL_FRAME, MAX_PACKET, MAX_STREAM_HEADER};
use crate::record::SignedRecord;
use crate::url::RelayUrl;

const TYPE_CONTROL: u8 = 0x01;
const TYPE_PACKET: u8 = 0x02;
const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame type 0x{0:02x}; the peer speaks a different Ferry protocol version")]
    UnknownType(u8),
    #[error("{kind} frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("packet frame of {0} bytes is too short to hold a node ID")]
    ShortPacket(usize),
    #[error("malformed control message: {0}")]
    BadControl(String),
    #[error("malformed stream header: {0}")]
    BadHeader(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// One service a node asks the relay to carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    pub name: String,
    /// Ask for a stable public TCP port on the relay.
    pub public: bool,
}

/// The relay's answer for one requested service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceGrant {
    pub name: String,
    /// `host:port` stock clients use, when a public port was asked for and granted.
    pub public_addr: Option<String>,
    pub public_port: Option<u16>,
    /// Why the service was not granted what it asked for.
    pub error: Option<String>,
}

/// Who holds a relay's public port: a node and the name of its service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortOwner {
    pub node: NodeId,
    pub service: String,
}

/// Control messages of a relay session, in both directions. Records and certificates
/// are boxed so the enum stays small: a session queue (one per node on a relay) keeps
/// the room it grew to, in frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Node → relay: the full set of services this node offers (replaces any earlier).
    /// The first message of a session (or `Join`).
    Register {
        services: Vec<ServiceRequest>,
        /// Grid membership, for relays that admit only members.
        #[serde(default)]
        certificate: Option<Box<Certificate>>,
        /// This link takes over from the node's link to this relay that is already
        /// registered (a link that fell back to TLS/TCP moving to QUIC): the relay
        /// keeps the old one open until the public-port connections on it end, where
        /// a plain `register` would close it at once. Left out when false, so older
        /// relays understand every other registration (they refuse this one).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        upgrade: bool,
    },
    /// Node → relay, as the first message instead of `Register`: redeem an invite
    /// (the secret of an invite code) for a membership certificate.
    Join {
        invite: String,
    },
    /// Relay → node: the certificate the invite bought; the relay then closes.
    Joined {
        certificate: Box<Certificate>,
    },
    /// Relay → node: what the relay granted, and how it sees the node.
    Registered {
        node_id: NodeId,
        observed_addr: SocketAddr,
        services: Vec<ServiceGrant>,
        /// The relay's embedded rendezvous answers `Publish`, `Lookup` and `Punch`.
        #[serde(default)]
        rendezvous: bool,
        /// UDP port of the rendezvous's STUN service, on the relay's host.
        #[serde(default)]
        stun_port: Option<u16>,
        /// This node's relay-channel token (`channel` module): overlay packets may go
        /// as plain UDP to the relay's address. Absent on links over TCP and from
        /// relays without channels; the node then uses link datagrams.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<Box<crate::channel::ChannelToken>>,
        /// The name of the fleet this relay belongs to (`--fleet`): it answers
        /// `locate`. Absent from relays outside a fleet, which end a session on
        /// `locate`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fleet: Option<Box<String>>,
    },
    /// Node → rendezvous: store this node's signed path record (replaces older ones).
    Publish {
        record: Box<SignedRecord>,
    },
    /// Rendezvous → node: the record with this sequence number was stored, or why not.
    Published {
        seq: u64,
        error: Option<String>,
    },
    /// Node → rendezvous: the current path record of `node_id`.
    Lookup {
        node_id: NodeId,
    },
    /// Rendezvous → node: answer to `Lookup`; the receiver verifies the signature.
    Found {
        node_id: NodeId,
        record: Option<Box<SignedRecord>>,
    },
    /// Node → rendezvous: "I want a direct path to `peer`"; the rendezvous answers
    /// both nodes with `PunchStart`, or the asker with `PunchFailed`.
    Punch {
        peer: NodeId,
    },
    /// Rendezvous → node: probe `peer` at its candidates, starting `start_in_ms`
    /// after receipt, so both ends start together (the delays differ by the measured
    /// one-way times). `observed_addr` is where the rendezvous sees the peer.
    PunchStart {
        peer: NodeId,
        record: Box<SignedRecord>,
        observed_addr: Option<SocketAddr>,
        start_in_ms: u32,
        /// Same value at both ends: lets each side match the two halves of an attempt.
        attempt: u64,
    },
    /// Rendezvous → node: why a `Punch` could not be coordinated.
    PunchFailed {
        peer: NodeId,
        reason: String,
    },
    /// Relay → node: the grid's admins and revoked members, after `Registered` and
    /// whenever the relay's policy changes, so members can check each other's
    /// certificates on the overlay and cut off a revoked member at once.
    Grid {
        view: Box<crate::grid::GridView>,
    },
    /// Node → relay: which node and service hold the public port `port` at `host`?
    /// Lets a member's shim carry a stock client's connections to another member's
    /// public service over the overlay instead (`ferry-shim tahoe client`). A relay
    /// answers only members of its grid, so a shim asks only relays that sent it
    /// `grid`; relays from before this message end the session on it.
    WhoOwns {
        host: String,
        port: u16,
    },
    /// Relay → node: the answer to `who_owns`, naming the question it answers;
    /// `owner` is absent when the relay does not say, and `reason` says why.
    Owner {
        host: String,
        port: u16,
        owner: Option<PortOwner>,
        reason: Option<String>,
    },
    /// Node → relay of a fleet: on which of the fleet's relays does `node_id` have
    /// a session now? Asked when dialling a peer, so a node can reach a peer that is
    /// only on another relay of the fleet (through an on-demand link to that relay).
    Locate {
        node_id: NodeId,
    },
    /// Relay → node: the answer to `locate`: the live relays of the fleet that hold a
    /// session of `node_id` (this relay first when it holds one), none when it has
    /// no session anywhere. Each URL pins its relay's key, so a dialler reaches only
    /// the relay named, whatever told it.
    Located {
        node_id: NodeId,
        relays: Vec<RelayUrl>,
    },
    /// Either direction: liveness probe; the other side answers with `Pong`.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Either direction: a fatal problem; the sender closes the session after it.
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Control {
    /// The message's name on the wire (its `type`), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Control::Register { .. } => "register",
            Control::Join { .. } => "join",
            Control::Joined { .. } => "joined",
            Control::Registered { .. } => "registered",
            Control::Grid { .. } => "grid",
            Control::WhoOwns { .. } => "who_owns",
            Control::Owner { .. } => "owner",
            Control::Locate { .. } => "locate",
            Control::Located { .. } => "located",
            Control::Publish { .. } => "publish",
            Control::Published { .. } => "published",
            Control::Lookup { .. } => "lookup",
            Control::Found { .. } => "found",
            Control::Punch { .. } => "punch",
            Control::PunchStart { .. } => "punch_start",
            Control::PunchFailed { .. } => "punch_failed",
            Control::Ping { .. } => "ping",
            Control::Pong { .. } => "pong",
            Control::Error { .. } => "error",
        }
    }

    /// True for the requests a rendezvous answers (embedded in a relay or standalone).
    pub fn is_rendezvous_request(&self) -> bool {
        matches!(
            self,
            Control::Publish { .. } | Control::Lookup { .. } | Control::Punch { .. }
        )
    }
}

/// Machine-readable reason carried by [`Control::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer sent something that is not valid Ferry protocol.
    Protocol,
    /// Another connection authenticated with the same node key replaced this one.
    Replaced,
    /// The node is not allowed to use this relay (the message says why).
    Denied,
    /// The relay is shutting down.
    GoingAway,
}

/// One decoded session frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Control(Control),
    /// An overlay packet and the node ID at the other end.
    Packet {
        peer: NodeId,
        data: Bytes,
    },
}

/// Sans-IO codec for session frames.
#[derive(Debug, Default)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        let (name, max) = match kind {
            TYPE_CONTROL => ("control", MAX_CONTROL_FRAME),
            TYPE_PACKET => ("packet", 32 + MAX_PACKET),
            other => return Err(FrameError::UnknownType(other)),
        };
        if len > max {
            return Err(FrameError::TooLarge {
                kind: name,
                len,
                max,
            });
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len).freeze();
        match kind {
            TYPE_CONTROL => serde_json::from_slice(&body)
                .map(|c| Some(Frame::Control(c)))
                .map_err(|e| FrameError::BadControl(e.to_string())),
            _ => {
                if body.len() < 32 {
                    return Err(FrameError::ShortPacket(body.len()));
                }
                let mut id = [0u8; 32];
                id.copy_from_slice(&body[..32]);
                Ok(Some(Frame::Packet {
                    peer: NodeId::from_bytes(id),
                    data: body.slice(32..),
                }))
            }
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Control(msg) => {
                let body =
                    serde_json::to_vec(&msg).map_err(|e| FrameError::BadControl(e.to_string()))?;
                if body.len() > MAX_CONTROL_FRAME {
                    return Err(FrameError::TooLarge {
                        kind: "control",
                        len: body.len(),
                        max: MAX_CONTROL_FRAME,
                    });
                }
                dst.reserve(HEADER_LEN + body.len());
                dst.put_u8(TYPE_CONTROL);
                dst.put_u32(body.len() as u32);
                dst.put_slice(&body);
            }
            Frame::Packet { peer, data } => {
                if data.len() > MAX_PACKET {
                    return Err(FrameError::TooLarge {
                        kind: "packet",
                        len: data.len(),
                        max: MAX_PACKET,
                    });
                }
                dst.reserve(HEADER_LEN + 32 + data.len());
                dst.put_u8(TYPE_PACKET);
                dst.put_u32((32 + data.len()) as u32);
                dst.put_slice(peer.as_bytes());
                dst.put_slice(&data);
            }
        }
        Ok(())
    }
}

/// First byte of an overlay packet sent as a QUIC DATAGRAM on a relay link.
const DATAGRAM_PACKET: u8 = 0x02;

/// Bytes an overlay packet gains when it rides a relay link as a QUIC DATAGRAM: the
/// type byte and the other end's node ID.
pub const DATAGRAM_OVERHEAD: usize = 1 + 32;

/// An overlay packet as one QUIC DATAGRAM on a relay link: `0x02 | node ID (32) |
/// packet`, the node ID being the destination on the way to the relay and the source
/// on the way back (as in [`Frame::Packet`]).
///
/// Why datagrams as well as packet frames: a packet frame rides the session stream, so
/// one lost link packet holds back every overlay packet behind it and the relay's
/// per-session queue and writer task sit on every packet's way. A datagram is lost
/// alone (the end-to-end QUIC recovers it, as it would over UDP) and the relay can
/// forward it straight from one link to the other. A packet too large for the link's
/// current datagram size still goes as a frame, so nothing depends on the link's MTU.
pub fn encode_datagram(peer: &NodeId, packet: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(DATAGRAM_OVERHEAD + packet.len());
    out.put_u8(DATAGRAM_PACKET);
    out.put_slice(peer.as_bytes());
    out.put_slice(packet);
    out.freeze()
}

/// Reads a relay-link DATAGRAM: the other end's node ID and the overlay packet (no
/// copy: the packet is a slice of `datagram`).
pub fn decode_datagram(datagram: Bytes) -> Result<(NodeId, Bytes), FrameError> {
    match datagram.first() {
        Some(&DATAGRAM_PACKET) => {}
        Some(&other) => return Err(FrameError::UnknownType(other)),
        None => return Err(FrameError::ShortPacket(0)),
    }
    if datagram.len() < DATAGRAM_OVERHEAD {
        return Err(FrameError::ShortPacket(datagram.len() - 1));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&datagram[1..DATAGRAM_OVERHEAD]);
    Ok((NodeId::from_bytes(id), datagram.slice(DATAGRAM_OVERHEAD..)))
}

/// Longest service name. Names appear in URLs-to-be, logs and DNS-like SOCKS names.
pub const MAX_SERVICE_NAME: usize = 63;

/// Checks a service name: 1–63 characters of `a-z 0-9 -`, starting with a letter or
/// digit, so it is a valid host-name label in `<service>.<node-id>.ferry` names.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid service name {name:?}: use 1-{MAX_SERVICE_NAME} characters a-z, 0-9 or '-', starting with a letter or digit"
        ))
    }
}

/// Sending end of a session's outgoing frame queue (see [`frame_queue`]).
pub type FrameSender = flume::Sender<Frame>;
/// Receiving end of a session's outgoing frame queue; [`pump_frames`] drains it.
pub type FrameReceiver = flume::Receiver<Frame>;

/// A bounded queue of frames for one session stream. flume rather than tokio's mpsc:
/// tokio's allocates a block of 32 slots when the channel is made (about 3 KiB per
/// session, and a relay holds one session per idle node), flume only grows with what
/// is actually queued — a few control messages for an idle node.
pub fn frame_queue(capacity: usize) -> (FrameSender, FrameReceiver) {
    flume::bounded(capacity)
}

/// Writes every frame from `rx` to `writer`, batching whatever is queued into one
/// flush, until the queue closes (then finishes the stream so the last frames are
/// delivered) or the stream fails. The one writer of a session stream, on both sides.
pub async fn pump_frames<W>(rx: FrameReceiver, mut writer: W)
where
    W: AsyncWrite + Unpin,
{
    // Not a FramedWrite: that keeps an 8 KiB buffer for the life of the session, and a
    // relay holds one per idle node. This buffer exists only while frames are written.
    loop {
        let Ok(frame) = rx.recv_async().await else {
            break;
        };
        let mut buf = BytesMut::new();
        if FrameCodec.encode(frame, &mut buf).is_err() {
            return;
        }
        while buf.len() < PUMP_BATCH
            && let Ok(frame) = rx.try_recv()
        {
            if FrameCodec.encode(frame, &mut buf).is_err() {
                return;
            }
        }
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// Bytes of frames gathered into one write by [`pump_frames`].
const PUMP_BATCH: usize = 64 * 1024;

/// A session reader whose buffer starts small: it grows for large frames, but an idle
/// session (most of a relay's) holds a few hundred bytes instead of 8 KiB.
pub fn session_reader<R: AsyncRead>(recv: R) -> tokio_util::codec::FramedRead<R, FrameCodec> {
    tokio_util::codec::FramedRead::with_capacity(recv, FrameCodec, 512)
}

/// Header of a stream the relay opens to a node for one public-port connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicOpen {
    pub service: String,
    /// The stock client's address as the relay saw it, for the node's logs.
    pub client: SocketAddr,
}

/// The one byte a node writes on a public stream once its local service has accepted
/// the connection. The relay starts forwarding client bytes at once (no round trip is
/// added); the byte only tells it when the connection was really set up (its
/// stream-setup histogram) and whether the node took it at all. A node that cannot
/// reach its service closes the stream without it.
pub const PUBLIC_ACCEPTED: u8 = 0x01;

/// What became of a public stream's [`PUBLIC_ACCEPTED`] byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicAnswer {
    /// The node accepted this long after the reader's `started` instant.
    Accepted(std::time::Duration),
    /// The stream ended or failed before the byte, or carried another byte.
    NotAccepted,
}

/// Reads the node's side of a public stream: strips the leading [`PUBLIC_ACCEPTED`]
/// byte, reports it once, then passes bytes through untouched.
pub struct PublicAnswerReader<R> {
    inner: R,
    started: std::time::Instant,
    on_answer: Option<Box<dyn FnOnce(PublicAnswer) + Send>>,
}

impl<R> PublicAnswerReader<R> {
    pub fn new(
        inner: R,
        started: std::time::Instant,
        on_answer: impl FnOnce(PublicAnswer) + Send + 'static,
    ) -> Self {
        PublicAnswerReader {
            inner,
            started,
            on_answer: Some(Box::new(on_answer)),
        }
    }

    fn answer(&mut self, answer: PublicAnswer) {
        if let Some(on_answer) = self.on_answer.take() {
            on_answer(answer);
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for PublicAnswerReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.on_answer.is_some() {
            let mut byte = [0u8; 1];
            let mut first = tokio::io::ReadBuf::new(&mut byte);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut first) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.answer(PublicAnswer::NotAccepted);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => match first.filled() {
                    [PUBLIC_ACCEPTED] => {
                        let took = this.started.elapsed();
                        this.answer(PublicAnswer::Accepted(took));
                    }
                    [] => {
                        this.answer(PublicAnswer::NotAccepted);
                        return Poll::Ready(Ok(()));
                    }
                    _ => {
                        this.answer(PublicAnswer::NotAccepted);
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the node answered a public stream with an unknown byte",
                        )));
                    }
                },
            }
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<R> Drop for PublicAnswerReader<R> {
    fn drop(&mut self) {
        self.answer(PublicAnswer::NotAccepted);
    }
}

/// Header of an overlay stream: which of the remote node's services to reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerOpen {
    /// `None` asks for the node's default (first) service.
    pub service: Option<String>,
}

/// Most certificates a [`PeerHello`] may carry (one per grid the node belongs to);
/// with them it stays well under `MAX_STREAM_HEADER`.
pub const MAX_HELLO_CERTIFICATES: usize = 4;

/// The first (and only) unidirectional stream each side of an overlay connection
/// opens: the grid memberships it can prove. A node that admits grid members checks
/// them before it serves the other side's streams.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerHello {
    #[serde(default)]
    pub certificates: Vec<Certificate>,
}

/// Answer to [`PeerOpen`]; on `Some(error)` the stream is closed after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerOpenReply {
    pub error: Option<String>,
    /// The error is that this node may not use the peer's services (not a refusal
    /// of one service).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_allowed: bool,
}

/// Writes a stream header: `u16` big-endian length, then JSON.
pub async fn write_header<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    header: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(header).map_err(|e| FrameError::BadHeader(e.to_string()))?;
    if body.len() > MAX_STREAM_HEADER {
        return Err(FrameError::TooLarge {
            kind: "stream header",
            len: body.len(),
            max: MAX_STREAM_HEADER,
        });
    }
    let mut buf = Vec::with_capacity(2 + body.len());
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads a stream header written by [`write_header`], refusing oversize ones unread.
pub async fn read_header<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, FrameError> {
    let len = r.read_u16().await? as usize;
    if len > MAX_STREAM_HEADER {
        return Err(FrameError::TooLarge {
            kind: "stream header",
            len,
            max: MAX_STREAM_HEADER,
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| FrameError::BadHeader(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_control_message_is_named_by_its_wire_type() {
        for msg in [
            Control::Ping { nonce: 1 },
            Control::Join { invite: "x".into() },
            Control::PunchFailed {
                peer: crate::SecretKey::generate().node_id(),
                reason: "r".into(),
            },
            Control::Error {
                code: ErrorCode::Denied,
                message: "m".into(),
            },
        ] {
            let json = serde_json::to_value(&msg).expect("serializes");
            assert_eq!(json["type"], msg.name());
        }
    }

    use super::*;
    use crate::SecretKey;

    fn encode(frame: Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec.encode(frame, &mut buf).unwrap();
        buf
    }

    #[test]
    fn frames_round_trip_even_when_split_byte_by_byte() {
        let peer = SecretKey::generate().node_id();
        let frames = vec![
            Frame::Control(Control::Register {
                services: vec![ServiceRequest {
                    name: "web".into(),
                    public: true,
                }],
                certificate: None,
                upgrade: false,
            }),
            Frame::Packet {
                peer,
                data: Bytes::from_static(b"quic packet bytes"),
            },
            Frame::Control(Control::Ping { nonce: 7 }),
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&encode(f.clone()));
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(f) = FrameCodec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_frames_are_refused_from_the_header_alone() {
        let mut buf = BytesMut::from(&[TYPE_PACKET, 0xff, 0xff, 0xff, 0xff][..]);
        let err = FrameCodec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { kind: "packet", .. }),
            "{err}"
        );
        let mut buf = BytesMut::from(&[TYPE_CONTROL, 0, 1, 0, 1][..]);
        assert!(matches!(
            FrameCodec.decode(&mut buf).unwrap_err(),
            FrameError::TooLarge {
                kind: "control",
                ..
            }
        ));
    }

    #[test]
    fn unknown_types_short_packets_and_bad_json_are_errors() {
        let mut buf = BytesMut::from(&[0x7f, 0, 0, 0, 0][..]);
        let err = FrameCodec.decode(&mut buf).unwrap_err().to_string();
        assert!(err.contains("unknown frame type 0x7f"), "{err}");

        let mut buf = BytesMut::from(&[TYPE_PACKET, 0, 0, 0, 3, 1, 2, 3][..]);
        assert!(matches!(
            FrameCodec.decode(&mut buf).unwrap_err(),
            FrameError::ShortPacket(3)
        ));

        let body = br#"{"type":"launch_missiles"}"#;
        let mut buf = BytesMut::new();
        buf.put_u8(TYPE_CONTROL);
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        assert!(matches!(
            FrameCodec.decode(&mut buf).unwrap_err(),
            FrameError::BadControl(_)
        ));
    }

    #[test]
    fn oversize_packets_are_not_encoded() {
        let frame = Frame::Packet {
            peer: SecretKey::generate().node_id(),
            data: Bytes::from(vec![0u8; MAX_PACKET + 1]),
        };
        assert!(FrameCodec.encode(frame, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn datagrams_round_trip_and_malformed_ones_are_errors() {
        let peer = crate::SecretKey::generate().node_id();
        let datagram = encode_datagram(&peer, b"quic packet");
        assert_eq!(datagram.len(), DATAGRAM_OVERHEAD + 11);
        let (got_peer, packet) = decode_datagram(datagram.clone()).unwrap();
        assert_eq!((got_peer, &packet[..]), (peer, &b"quic packet"[..]));
        // An empty packet is legal (QUIC never sends one, but the format allows it).
        assert_eq!(
            decode_datagram(encode_datagram(&peer, b""))
                .unwrap()
                .1
                .len(),
            0
        );

        assert!(matches!(
            decode_datagram(Bytes::new()),
            Err(FrameError::ShortPacket(0))
        ));
        assert!(matches!(
            decode_datagram(datagram.slice(..20)),
            Err(FrameError::ShortPacket(19))
        ));
        let mut other = datagram.to_vec();
        other[0] = 0x7f;
        let e = decode_datagram(Bytes::from(other)).unwrap_err();
        assert!(matches!(e, FrameError::UnknownType(0x7f)));
        assert!(e.to_string().contains("different Ferry protocol version"));
    }

    #[test]
    fn service_names_are_checked() {
        for good in ["web", "storage-1", "a", "tahoe-storage"] {
            assert!(validate_service_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "Web", "a b", "x.y", "a_b", &"a".repeat(64)] {
            assert!(
                validate_service_name(bad)
                    .unwrap_err()
                    .contains("invalid service name")
            );
        }
    }

    #[tokio::test]
    async fn stream_headers_round_trip_and_refuse_oversize() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let open = PeerOpen {
            service: Some("storage".into()),
        };
        write_header(&mut a, &open).await.unwrap();
        let got: PeerOpen = read_header(&mut b).await.unwrap();
        assert_eq!(got, open);

        a.write_all(&u16::MAX.to_be_bytes()).await.unwrap();
        let err = read_header::<_, PeerOpen>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    fn answer_probe() -> (
        std::sync::Arc<std::sync::Mutex<Vec<PublicAnswer>>>,
        impl FnOnce(PublicAnswer) + Send + 'static,
    ) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, move |a| s.lock().unwrap().push(a))
    }

    #[tokio::test]
    async fn the_accept_byte_is_reported_once_and_stripped() {
        let (mut node, relay) = tokio::io::duplex(64);
        let (seen, on_answer) = answer_probe();
        let mut reader = PublicAnswerReader::new(relay, std::time::Instant::now(), on_answer);
        node.write_all(&[PUBLIC_ACCEPTED]).await.unwrap();
        node.write_all(b"hello").await.unwrap();
        drop(node);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        drop(reader);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(matches!(seen[0], PublicAnswer::Accepted(_)));
    }

    #[tokio::test]
    async fn a_stream_closed_without_the_byte_or_with_another_is_not_accepted() {
        let (node, relay) = tokio::io::duplex(64);
        let (seen, on_answer) = answer_probe();
        let mut reader = PublicAnswerReader::new(relay, std::time::Instant::now(), on_answer);
        drop(node);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        assert_eq!(*seen.lock().unwrap(), vec![PublicAnswer::NotAccepted]);

        let (mut node, relay) = tokio::io::duplex(64);
        let (seen, on_answer) = answer_probe();
        let mut reader = PublicAnswerReader::new(relay, std::time::Instant::now(), on_answer);
        node.write_all(b"HTTP/1.1 200 OK").await.unwrap();
        let err = reader.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("unknown byte"), "{err}");
        drop(reader);
        assert_eq!(*seen.lock().unwrap(), vec![PublicAnswer::NotAccepted]);
    }
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn frames_stay_small() {
        // A relay holds a session queue per node, and a queue keeps the room it grew
        // to, in frames; at 208 bytes a frame made that room twice as costly.
        let size = std::mem::size_of::<super::Frame>();
        assert!(
            size <= 112,
            "Frame is {size} bytes; box the large Control variant"
        );
    }
}
