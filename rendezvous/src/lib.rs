//! ferry-rendezvous: tells nodes how the Internet sees them and (later) keeps signed
//! path records and coordinates hole punching.
//!
//! So far it holds the sans-IO STUN Binding codec (`stun`); the service around it, the
//! record directory and punch coordination are issue #3's remaining work.

pub mod stun;
