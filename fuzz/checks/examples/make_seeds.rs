//! Writes the seed inputs of every fuzz target into `fuzz/seeds/<target>/`: one or a
//! few valid examples of what each decoder reads, so the fuzzer starts from the real
//! format instead of discovering JSON or STUN from nothing. Run after a format
//! changes: `cargo run -p ferry-fuzz-checks --example make_seeds`.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use ferry_proto::frame::{self, Control, Frame, FrameCodec, PeerOpen, PublicOpen, ServiceRequest};
use ferry_proto::grid::{InviteCode, Membership};
use ferry_proto::probe::{Probe, ProbeKind};
use ferry_proto::record::{NatMapping, PathRecord};
use ferry_proto::{RelayUrl, SecretKey};
use tokio_util::codec::Encoder;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = root.join("seeds");
    let repo = root.join("..");
    let key = SecretKey::from_seed([7; 32]);
    let peer = SecretKey::from_seed([8; 32]).node_id();
    let relay: RelayUrl = format!("ferry://{peer}@relay.example.org:7842")
        .parse()
        .map_err(std::io::Error::other)?;
    // Inside the checks' validity window (they use a fixed "now").
    let now = 1_800_000_000u64;

    let record = PathRecord {
        node_id: key.node_id(),
        seq: 3,
        expires: now + 600,
        addrs: vec![
            "198.51.100.7:40000"
                .parse()
                .map_err(std::io::Error::other)?,
        ],
        relays: vec![relay.clone()],
        nat: NatMapping::EndpointIndependent,
    }
    .sign(&key);
    let cert = Membership {
        member: peer,
        issuer: key.node_id(),
        issued: now - 60,
        expires: now + 86_400,
        serial: 1,
    }
    .sign(&key);

    let mut w = Writer { seeds, count: 0 };
    let frames = |frames: Vec<Frame>| -> Vec<u8> {
        let mut out = BytesMut::new();
        for f in frames {
            FrameCodec.encode(f, &mut out).expect("seed frames encode");
        }
        let mut with_step = vec![7u8];
        with_step.extend_from_slice(&out);
        with_step
    };
    w.put(
        "session_frames",
        "register",
        &frames(vec![Frame::Control(Control::Register {
            services: vec![ServiceRequest {
                name: "web".into(),
                public: true,
            }],
            certificate: Some(Box::new(cert.clone())),
            upgrade: false,
        })]),
    );
    w.put(
        "session_frames",
        "publish_punch_ping",
        &frames(vec![
            Frame::Control(Control::Publish {
                record: Box::new(record.clone()),
            }),
            Frame::Control(Control::Punch { peer }),
            Frame::Control(Control::Ping { nonce: 9 }),
            Frame::Packet {
                peer,
                data: bytes::Bytes::from_static(b"\xc0overlay packet"),
            },
        ]),
    );
    w.put(
        "link_datagram",
        "packet",
        &frame::encode_datagram(&peer, b"\xc0overlay packet"),
    );
    let header = |value: &dyn erased::Header| value.bytes();
    w.put(
        "stream_headers",
        "public_open",
        &header(&PublicOpen {
            service: "web".into(),
            client: "203.0.113.9:5555".parse().map_err(std::io::Error::other)?,
        }),
    );
    w.put(
        "stream_headers",
        "peer_open",
        &header(&PeerOpen {
            service: Some("web".into()),
        }),
    );
    w.put("stream_headers", "accepted", b"\x01GET / HTTP/1.1\r\n\r\n");
    let token = ferry_proto::channel::ChannelToken::random();
    let mut channel = vec![0u8; ferry_proto::channel::HEADER_LEN + 16];
    ferry_proto::channel::write_header(&mut channel, &token, &peer);
    w.put("udp_channel", "packet", &channel);
    let probe = Probe {
        kind: ProbeKind::Ping,
        sender: key.node_id(),
        receiver: peer,
        tx: 42,
        observed: "198.51.100.7:40000"
            .parse()
            .map_err(std::io::Error::other)?,
    };
    w.put("path_probe", "ping", &probe.encode(&key));

    let txid = [3u8; 12];
    let request = ferry_rendezvous::stun::binding_request(&txid);
    w.put("stun_server", "ferry_request", &request);
    // A stock client's bare request (header only), and an RFC 3489 CHANGE-REQUEST.
    let mut bare = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    bare.extend_from_slice(&txid);
    w.put("stun_server", "bare_request", &bare);
    let mut change = bare.clone();
    change[3] = 8;
    change.extend_from_slice(&[0, 3, 0, 4, 0, 0, 0, 6]);
    w.put("stun_server", "change_request", &change);
    let from = "198.51.100.7:40000"
        .parse()
        .map_err(std::io::Error::other)?;
    let answer = ferry_rendezvous::stun::handle(&request, from).unwrap_or_default();
    w.put("stun_client", "answer", &answer);

    let json = |v: &dyn erased::Json| v.json();
    w.put("signed_record", "record", &json(&record));
    w.put("certificate", "certificate", &json(&cert));
    let invite = InviteCode {
        relay: relay.clone(),
        secret: [5; ferry_proto::grid::INVITE_SECRET_LEN],
    };
    w.put("invite_code", "invite", invite.to_string().as_bytes());

    for (target, file) in [
        ("relay_config", "deploy/relay.toml"),
        ("rendezvous_config", "deploy/rendezvous.toml"),
        ("shim_config", "deploy/shim.toml"),
    ] {
        w.put(target, "deploy", &std::fs::read(repo.join(file))?);
    }
    w.put("relay_config", "range", b"20000-20999");
    w.put(
        "shim_config",
        "full",
        format!(
            "relays = [\"{relay}\"]\nallow = [\"{peer}\"]\nmode = \"strict\"\n\
             addresses = [\"198.51.100.7:40000\"]\n\n[[service]]\nname = \"web\"\n\
             target = \"127.0.0.1:8080\"\npublic = true\n\n[[forward]]\n\
             to = \"web.{peer}\"\nlisten = \"127.0.0.1:9000\"\n"
        )
        .as_bytes(),
    );

    w.put(
        "relay_files",
        "policy",
        format!("allow = [\"{peer}\"]\ndeny = []\nadmins = []\nrevoked = []\n").as_bytes(),
    );
    w.put(
        "relay_files",
        "invites",
        br#"{"invites":{"aaaaaaaaaaaaaaaaaaaaaaaaaa":{"expires":1800000600,"uses_left":1}}}"#,
    );
    w.put(
        "relay_files",
        "ports",
        format!(
            "{{\"version\":1,\"assignments\":[{{\"node_id\":\"{peer}\",\"service\":\"web\",\"port\":20000}}]}}"
        )
        .as_bytes(),
    );
    let key_path = std::env::temp_dir().join(format!("ferry-seed-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&key_path);
    key.save_new(&key_path).map_err(std::io::Error::other)?;
    let key_file = std::fs::read_to_string(&key_path)?;
    std::fs::remove_file(&key_path)?;
    w.put("relay_files", "key", key_file.as_bytes());
    w.put(
        "shim_files",
        "memberships",
        format!(
            "{{\"memberships\":[{{\"relay\":\"{relay}\",\"certificate\":{}}}]}}",
            String::from_utf8_lossy(&json(&cert))
        )
        .as_bytes(),
    );
    w.put("shim_files", "key", key_file.as_bytes());
    w.put(
        "shim_files",
        "route",
        b"Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
          eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    );
    w.put(
        "names_and_answers",
        "relay_url",
        relay.to_string().as_bytes(),
    );
    w.put(
        "names_and_answers",
        "relay_url_v6",
        format!("ferry://{peer}@[2001:db8::1]:7842").as_bytes(),
    );
    w.put(
        "names_and_answers",
        "proxy",
        b"socks5://user:pw@127.0.0.1:9050",
    );
    w.put(
        "names_and_answers",
        "ferry_name",
        format!("web.{peer}.ferry").as_bytes(),
    );
    w.put(
        "names_and_answers",
        "connect_answer",
        b"HTTP/1.1 200 Connection established\r\n\r\n",
    );
    eprintln!("wrote {} seeds", w.count);
    Ok(())
}

struct Writer {
    seeds: PathBuf,
    count: usize,
}

impl Writer {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.seeds.join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        std::fs::write(dir.join(name), bytes).expect("seed file");
        self.count += 1;
    }
}

/// Object-safe shims over serde, so the seed table above can mix types.
mod erased {
    pub trait Header {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Header for T {
        fn bytes(&self) -> Vec<u8> {
            let body = serde_json::to_vec(self).expect("headers serialise");
            let mut out = (body.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        }
    }
    pub trait Json {
        fn json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("values serialise")
        }
    }
}
