//! ferry-rendezvous: tells nodes how the Internet sees them and (later) keeps signed
//! path records and coordinates hole punching.
//!
//! STUN: `stun` is the sans-IO Binding codec (RFC 8489); `stun_service` drives it on a
//! UDP socket with metrics, for `ferry-relay` (embedded) and this crate's
//! `ferry-rendezvous` binary (`config`: flags and TOML; `server`: key, STUN, admin
//! HTTP; `admin`: routes).

pub mod admin;
pub mod config;
pub mod coordinator;
pub mod directory;
pub mod server;
pub mod sessions;
pub mod stun;
pub mod stun_service;
