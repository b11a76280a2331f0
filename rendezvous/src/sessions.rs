//! The rendezvous side of a node session: answers `Publish`, `Lookup` and `Punch`
//! control messages arriving over a node's authenticated link.
//!
//! The relay embeds one [`Rendezvous`] and hands it every rendezvous message from its
//! session loop; the messages it returns go to the named nodes' sessions. The logic
//! lives in the sans-IO [`Directory`] and [`Coordinator`]; this type adds locking,
//! clocks and metrics.

use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use ferry_proto::NodeId;
use ferry_proto::frame::{self, Control, Frame};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::coordinator::{Coordinator, PunchOutcome, SessionInfo};
use crate::directory::{Directory, PublishError};
use ferry_proto::record::SignedRecord;
use ferry_proto::sync::lock;

/// Told of every record a node published here and the directory stored.
pub type StoredHook = Box<dyn Fn(&SignedRecord) + Send + Sync>;

pub struct Rendezvous {
    directory: Mutex<Directory>,
    /// Where stored records go besides the directory: a relay in a fleet shares them
    /// with the fleet's other relays (`Rendezvous::adopt` there).
    on_stored: std::sync::OnceLock<StoredHook>,
    coordinator: Mutex<Coordinator>,
    records: IntGauge,
    publishes: IntCounterVec,
    lookups: IntCounterVec,
    punches: IntCounterVec,
}

impl Rendezvous {
    /// Creates the service and registers its metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let records = IntGauge::new(
            "ferry_rendezvous_records",
            "Signed path records currently stored",
        )?;
        let publishes = IntCounterVec::new(
            Opts::new(
                "ferry_rendezvous_publishes_total",
                "Path records published, by outcome (stored, refused)",
            ),
            &["outcome"],
        )?;
        let lookups = IntCounterVec::new(
            Opts::new(
                "ferry_rendezvous_lookups_total",
                "Record lookups, by outcome (found, missing)",
            ),
            &["outcome"],
        )?;
        let punches = IntCounterVec::new(
            Opts::new(
                "ferry_rendezvous_punch_requests_total",
                "Hole-punch requests, by outcome (coordinated, duplicate, peer_offline, no_record, self)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(publishes.clone()))?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(punches.clone()))?;
        // Show every outcome from the start, so dashboards see zeros, not gaps.
        for o in ["stored", "refused"] {
            publishes.with_label_values(&[o]);
        }
        for o in ["found", "missing"] {
            lookups.with_label_values(&[o]);
        }
        for o in PunchOutcome::ALL {
            punches.with_label_values(&[o.label()]);
        }
        Ok(Rendezvous {
            directory: Mutex::new(Directory::default()),
            on_stored: std::sync::OnceLock::new(),
            coordinator: Mutex::new(Coordinator::default()),
            records,
            publishes,
            lookups,
            punches,
        })
    }

    /// Answers one message from the authenticated node `from`. Returns the messages
    /// to deliver, each with its destination node.
    pub fn handle(
        &self,
        from: NodeId,
        msg: Control,
        sessions: impl Fn(&NodeId) -> Option<SessionInfo>,
    ) -> Vec<(NodeId, Control)> {
        let wall = SystemTime::now();
        match msg {
            Control::Publish { record } => {
                let seq = record.record.seq;
                let mut dir = lock(&self.directory);
                // A copy only for a hook that shares it (a fleet relay).
                let shared = self.on_stored.get().map(|_| (*record).clone());
                let result = dir.publish(from, *record, wall);
                self.records.set(dir.len() as i64);
                drop(dir);
                let error = match result {
                    Ok(_) => {
                        self.publishes.with_label_values(&["stored"]).inc();
                        if let (Some(hook), Some(record)) = (self.on_stored.get(), &shared) {
                            hook(record);
                        }
                        None
                    }
                    Err(e) => {
                        self.publishes.with_label_values(&["refused"]).inc();
                        tracing::info!("refused a path record from node {from}: {e}");
                        Some(e.to_string())
                    }
                };
                vec![(from, Control::Published { seq, error })]
            }
            Control::Lookup { node_id } => {
                let record = lock(&self.directory).get(&node_id, wall).cloned();
                let outcome = if record.is_some() { "found" } else { "missing" };
                self.lookups.with_label_values(&[outcome]).inc();
                vec![(
                    from,
                    Control::Found {
                        node_id,
                        record: record.map(Box::new),
                    },
                )]
            }
            Control::Punch { peer } => {
                let dir = lock(&self.directory);
                let (outcome, out) = lock(&self.coordinator).request(
                    from,
                    peer,
                    sessions,
                    &dir,
                    Instant::now(),
                    wall,
                );
                self.punches.with_label_values(&[outcome.label()]).inc();
                tracing::debug!("punch request {from} -> {peer}: {}", outcome.label());
                out
            }
            _ => Vec::new(),
        }
    }

    /// Answers one message from `from` and delivers the answers over session queues:
    /// to `from` over `reply` (waiting for room: answers must not be lost), to other
    /// nodes without waiting (a full queue drops a punch notice, which the other
    /// side's retry covers). `sessions` finds a live node's session details and queue.
    /// Returns false when `reply` is closed (the asking session is gone). Shared by
    /// the relay's sessions and the standalone rendezvous's.
    pub async fn answer(
        &self,
        from: NodeId,
        msg: Control,
        reply: &frame::FrameSender,
        sessions: impl Fn(&NodeId) -> Option<(SessionInfo, frame::FrameSender)>,
    ) -> bool {
        let out = self.handle(from, msg, |n| sessions(n).map(|(info, _)| info));
        for (to, message) in out {
            if to == from {
                if reply.send_async(Frame::Control(message)).await.is_err() {
                    return false;
                }
            } else if let Some((_, queue)) = sessions(&to) {
                let _ = queue.try_send(Frame::Control(message));
            }
        }
        true
    }

    /// Calls `hook` with every record a node publishes here from now on, once stored.
    /// Set once; a second hook is ignored.
    pub fn on_stored(&self, hook: StoredHook) {
        let _ = self.on_stored.set(hook);
    }

    /// Stores a record that another rendezvous holds (a fleet's relays share their
    /// records): checked exactly like one published here, by its own node's
    /// signature, so whoever carried it cannot forge or alter it. An older or equal
    /// record than the one held is ignored.
    pub fn adopt(&self, record: SignedRecord) -> Result<(), PublishError> {
        let node = record.record.node_id;
        let mut dir = lock(&self.directory);
        let result = dir.publish(node, record, SystemTime::now());
        self.records.set(dir.len() as i64);
        result.map(|_| ())
    }

    /// Drops expired records every minute, for good (records are soft state).
    pub async fn sweep_now_and_then(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// Drops expired records; call now and then.
    pub fn sweep(&self) {
        let mut dir = lock(&self.directory);
        dir.sweep(SystemTime::now());
        self.records.set(dir.len() as i64);
    }
}
