//! ferry-relay: the public relay. Nodes keep an authenticated link to it; it gives each
//! exposed service a stable public TCP port and splices end-to-end encrypted overlay
//! packets between nodes without being able to read them.
//!
//! `ports` (durable port assignments) and `ferry_proto::registry` (live sessions) hold
//! the decisions, `ferry_proto::node_session` the session rules, `registration` what a
//! registering node is granted; `server` drives sockets; `admin`, `panel` (the web panel) and `metrics` show what is
//! going on; `config` turns flags and the TOML file into [`server::RelayOptions`].

pub mod access;
pub mod admin;
pub mod channel_socket;
pub mod config;
pub mod metrics;
pub mod panel;
pub mod policy;
pub mod ports;
pub mod registration;
pub mod server;
