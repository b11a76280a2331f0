//! Ferry's shared protocol crate: node identities, relay URLs, wire frames, the
//! TLS-with-raw-keys configuration and the multiplexed relay link used by every program.
//!
//! Everything here that decides something (frame decoding, URL parsing, key checks) is
//! plain code without sockets so it can be unit-tested; the async pieces (`link`,
//! `splice`, `stream_socket`) are thin drivers around quinn and rustls.

pub mod admin;
pub mod channel;
pub mod config;
pub mod frame;
pub mod grid;
pub mod identity;
pub mod limits;
pub mod link;
pub mod liveness;
pub mod net;
pub mod node_session;
pub mod probe;
pub mod rate;
pub mod record;
pub mod registry;
pub mod splice;
pub mod stall;
pub mod stream_socket;
pub mod sync;
pub mod tls;
pub mod udp;
pub mod url;

pub use identity::{NodeId, SecretKey};
pub use url::RelayUrl;
