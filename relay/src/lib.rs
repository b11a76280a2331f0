//! ferry-relay: the public relay. Nodes keep an authenticated link to it; it gives each
//! exposed service a stable public TCP port and splices end-to-end encrypted overlay
//! packets between nodes without being able to read them.
//!
//! `ports` (durable port assignments) and `ferry_proto::registry` (live sessions) hold
//! the decisions, `ferry_proto::node_session` the session rules, `registration` what a
//! registering node is granted, `policy` who may register; `state` is what the running
//! relay knows; `server` drives sockets and sessions, `forwarding` overlay packets;
//! `admin`, `panel` (the web panel) and `metrics` show what is going on, and `edits`
//! is how an operator changes it; `config` turns flags and the TOML file into
//! [`state::RelayOptions`].

pub mod access;
pub mod admin;
pub mod channel_socket;
pub mod config;
pub mod edits;
pub mod fleet;
pub mod forwarding;
pub mod metrics;
pub mod panel;
pub mod policy;
pub mod ports;
pub mod registration;
pub mod restart;
pub mod server;
pub mod state;
pub mod whereabouts;
