//! ferry-rendezvous: tells nodes how the Internet sees them, keeps their signed path
//! records and coordinates hole punching.
//!
//! STUN: `stun` is the sans-IO Binding codec (RFC 8489); `stun_service` drives it on a
//! UDP socket with metrics. Records and punching: `directory` and `coordinator` are
//! sans-IO; `sessions` (`Rendezvous`) answers a node's `Publish`, `Lookup` and `Punch`
//! messages. `ferry-relay` embeds all of it in its node sessions; this crate's
//! `ferry-rendezvous` binary runs it alone (`config`: flags and TOML; `server`: key,
//! STUN, node sessions, admin HTTP; `node_sessions`: QUIC sessions of nodes; `admin`:
//! routes). `fleet`: the link to a fleet's engine (NATS JetStream), which the relay
//! shares, and the fleet's path records.

pub mod admin;
pub mod config;
pub mod coordinator;
pub mod directory;
pub mod fleet;
pub mod node_sessions;
pub mod server;
pub mod sessions;
pub mod stun;
pub mod stun_service;
