//! Asking relays who holds one of their public ports (`who_owns`): how a member's
//! shim learns that a server a stock client knows by `relay-host:port` is another
//! member's service, which it can then reach over the overlay instead
//! (`ferry-shim tahoe client`).
//!
//! Only relays that sent this node their grid are asked: they answer members, and a
//! relay from before `who_owns` would end the session on it. Answers come back on
//! the relay sessions (`relay_client`) and are matched to questions by host and port.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::frame::{Control, Frame, FrameSender, PortOwner};
use ferry_proto::sync::lock;
use tokio::sync::broadcast;

/// How long a relay has to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One relay's answer to `who_owns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub host: String,
    pub port: u16,
    /// The owner, or the relay's reason for not saying.
    pub owner: Result<PortOwner, String>,
}

/// Why a question got no owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// No relay to ask: nothing was learned.
    #[error(
        "no relay that knows this node as a grid member is connected (`ferry-shim join` a relay run with --policy grid)"
    )]
    NoRelay,
    /// Some relay asked did not answer in time: nothing certain was learned.
    #[error("{0}")]
    Unanswered(String),
    /// Every relay asked answered, and none named an owner: the reasons.
    #[error("{0}")]
    Refused(String),
}

/// A relay this node may ask: its session's queue and the host its URL names.
struct Askable {
    tx: FrameSender,
    host: String,
}

/// The relays this node may ask, and the answers on their way back.
pub struct PortOwners {
    askable: std::sync::Mutex<BTreeMap<usize, Askable>>,
    answers: broadcast::Sender<(usize, Answer)>,
}

impl Default for PortOwners {
    fn default() -> Self {
        PortOwners {
            askable: Default::default(),
            answers: broadcast::channel(64).0,
        }
    }
}

impl PortOwners {
    /// Relay `index` (its URL naming `host`) told this node its grid: it answers
    /// `who_owns` on `tx`.
    pub fn relay_answers(&self, index: usize, tx: FrameSender, host: &str) {
        let host = host.to_string();
        lock(&self.askable).insert(index, Askable { tx, host });
    }

    /// True when some relay would answer.
    pub fn any(&self) -> bool {
        !lock(&self.askable).is_empty()
    }

    /// Relay `index`'s session ended.
    pub fn relay_gone(&self, index: usize) {
        lock(&self.askable).remove(&index);
    }

    /// Relay `index` answered.
    pub fn answered(&self, index: usize, answer: Answer) {
        // Nobody waiting is fine: the question timed out.
        let _ = self.answers.send((index, answer));
    }

    /// The node and service holding `host:port`. Asked of the relays whose URL names
    /// `host` (the relay a public address belongs to; the others need not learn
    /// which servers this node uses), or of every relay this node may ask when none
    /// does (a relay reached by another name than its public one). Only answers from
    /// the relays asked count, one each.
    pub async fn ask(&self, host: &str, port: u16) -> Result<PortOwner, AskError> {
        let mut answers = self.answers.subscribe();
        let relays: Vec<(usize, FrameSender)> = {
            let askable = lock(&self.askable);
            let named: Vec<_> = askable
                .iter()
                .filter(|(_, a)| ferry_proto::net::same_host(&a.host, host))
                .map(|(i, a)| (*i, a.tx.clone()))
                .collect();
            if named.is_empty() {
                askable.iter().map(|(i, a)| (*i, a.tx.clone())).collect()
            } else {
                named
            }
        };
        if relays.is_empty() {
            return Err(AskError::NoRelay);
        }
        let mut waiting = std::collections::BTreeSet::new();
        for (index, tx) in relays {
            let question = Control::WhoOwns {
                host: host.to_string(),
                port,
            };
            // Never wait on a full queue: a relay that cannot take the question
            // now simply did not answer.
            if tx.try_send(Frame::Control(question)).is_ok() {
                waiting.insert(index);
            }
        }
        let mut reasons = Vec::new();
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        while !waiting.is_empty() {
            let (index, answer) = match tokio::time::timeout_at(deadline, answers.recv()).await {
                Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => break,
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Ok(answer)) => answer,
            };
            if answer.host != host || answer.port != port || !waiting.remove(&index) {
                continue;
            }
            match answer.owner {
                Ok(owner) => return Ok(owner),
                Err(reason) => reasons.push(reason),
            }
        }
        reasons.dedup();
        if waiting.is_empty() && !reasons.is_empty() {
            Err(AskError::Refused(reasons.join("; ")))
        } else {
            reasons.push(format!("{} relay(s) did not answer", waiting.len().max(1)));
            Err(AskError::Unanswered(reasons.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    #[tokio::test]
    async fn the_relay_of_the_host_answers_and_only_answers_from_relays_asked_count() {
        let owners = std::sync::Arc::new(PortOwners::default());
        assert_eq!(owners.ask("relay.example", 1).await, Err(AskError::NoRelay));
        let (tx_a, rx_a) = ferry_proto::frame::frame_queue(4);
        let (tx_b, rx_b) = ferry_proto::frame::frame_queue(4);
        owners.relay_answers(0, tx_a, "relay.example");
        owners.relay_answers(1, tx_b, "other.example");
        let node = SecretKey::generate().node_id();
        // Relay 0 holds port 23101; relay 1 claims every port, but is never asked
        // about relay.example's ports. Before each answer comes one from a session
        // that was not asked (a rendezvous, say), which must not count.
        for (relay, rx) in [rx_a, rx_b].into_iter().enumerate() {
            let owners = owners.clone();
            tokio::spawn(async move {
                while let Ok(Frame::Control(Control::WhoOwns { host, port })) =
                    rx.recv_async().await
                {
                    let forged = Answer {
                        host: host.clone(),
                        port,
                        owner: Err("forged".into()),
                    };
                    owners.answered(9, forged);
                    let owner = match (relay, port) {
                        (0, 23101) | (1, _) => Ok(PortOwner {
                            node,
                            service: format!("storage-{relay}"),
                        }),
                        _ => Err(format!("no node holds port {port} on relay {relay}")),
                    };
                    owners.answered(relay, Answer { host, port, owner });
                }
            });
        }
        let owner = owners.ask("relay.example", 23101).await.unwrap();
        assert_eq!((owner.node, owner.service.as_str()), (node, "storage-0"));
        assert_eq!(
            owners.ask("Relay.Example", 23100).await,
            Err(AskError::Refused(
                "no node holds port 23100 on relay 0".into()
            ))
        );
        // A host no relay's URL names: every relay is asked.
        let owner = owners.ask("203.0.113.7", 23100).await.unwrap();
        assert_eq!(owner.service, "storage-1");
        owners.relay_gone(0);
        owners.relay_gone(1);
        assert_eq!(
            owners.ask("relay.example", 23101).await,
            Err(AskError::NoRelay)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_does_not_answer_leaves_the_question_open() {
        let owners = PortOwners::default();
        let (tx, _rx) = ferry_proto::frame::frame_queue(4);
        owners.relay_answers(0, tx, "relay.example");
        let got = owners.ask("relay.example", 23100).await;
        assert!(matches!(got, Err(AskError::Unanswered(_))), "{got:?}");
    }
}
