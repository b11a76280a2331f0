//! ferry-shim: the daemon beside an ordinary node. It registers the node's services
//! with relays (optionally on stable public ports), accepts connections on every path
//! and hands them to the local service, and carries local connections to other nodes
//! by node ID over end-to-end encrypted QUIC.
//!
//! `options` resolves flags and config; `state` is what the running shim knows and
//! `shim` starts it all; `relay_client` keeps one session per relay by the rules of
//! `relay_session`; `overlay`, `path_socket`, `paths` and `path_manager` carry
//! node-to-node QUIC, direct or relayed, admitted by `allow`, and `visits` reaches
//! a peer that is only on another relay of a fleet; `backoff` paces
//! reconnects; `admin`, `panel` (the web panel) and `metrics` report.

pub mod admin;
pub mod allow;
pub mod backoff;
pub mod hops;
pub mod membership;
pub mod metrics;
pub mod mode;
pub mod options;
pub mod overlay;
pub mod owners;
pub mod panel;
pub mod path_manager;
pub mod path_socket;
pub mod paths;
pub mod portmap;
pub mod proxy;
pub mod relay_client;
pub mod relay_session;
pub mod shim;
pub mod socks_door;
pub mod state;
pub mod status;
pub mod tahoe;
pub mod tahoe_client;
pub mod visits;
