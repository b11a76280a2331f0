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

/// The relays this node may ask, and the answers on their way back.
pub struct PortOwners {
    askable: std::sync::Mutex<BTreeMap<usize, FrameSender>>,
    answers: broadcast::Sender<Answer>,
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
    /// Relay `index` told this node its grid: it answers `who_owns` on `tx`.
    pub fn relay_answers(&self, index: usize, tx: FrameSender) {
        lock(&self.askable).insert(index, tx);
    }

    /// True when some relay would answer.
    pub fn any(&self) -> bool {
        !lock(&self.askable).is_empty()
    }

    /// Relay `index`'s session ended.
    pub fn relay_gone(&self, index: usize) {
        lock(&self.askable).remove(&index);
    }

    /// A relay answered.
    pub fn answered(&self, answer: Answer) {
        // Nobody waiting is fine: the question timed out.
        let _ = self.answers.send(answer);
    }

    /// The node and service holding `host:port`, from the first relay that knows;
    /// otherwise every relay's reason.
    pub async fn ask(&self, host: &str, port: u16) -> Result<PortOwner, String> {
        let mut answers = self.answers.subscribe();
        let relays: Vec<FrameSender> = lock(&self.askable).values().cloned().collect();
        if relays.is_empty() {
            return Err(
                "no relay that knows this node as a grid member is connected (`ferry-shim join` a relay run with --policy grid)"
                    .into(),
            );
        }
        let mut waiting = 0;
        for tx in &relays {
            let question = Control::WhoOwns {
                host: host.to_string(),
                port,
            };
            if tx.send_async(Frame::Control(question)).await.is_ok() {
                waiting += 1;
            }
        }
        let mut reasons = Vec::new();
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        while waiting > 0 {
            let answer = match tokio::time::timeout_at(deadline, answers.recv()).await {
                Err(_) => {
                    reasons.push(format!("{waiting} relay(s) did not answer"));
                    break;
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => break,
                Ok(Ok(answer)) => answer,
            };
            if answer.host != host || answer.port != port {
                continue;
            }
            waiting -= 1;
            match answer.owner {
                Ok(owner) => return Ok(owner),
                Err(reason) => reasons.push(reason),
            }
        }
        reasons.dedup();
        Err(reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    #[tokio::test]
    async fn the_first_relay_that_knows_answers_and_others_give_reasons() {
        let owners = std::sync::Arc::new(PortOwners::default());
        assert!(
            owners
                .ask("relay.example", 1)
                .await
                .unwrap_err()
                .contains("ferry-shim join")
        );
        let (tx_a, rx_a) = ferry_proto::frame::frame_queue(4);
        let (tx_b, rx_b) = ferry_proto::frame::frame_queue(4);
        owners.relay_answers(0, tx_a);
        owners.relay_answers(1, tx_b);
        let node = SecretKey::generate().node_id();
        // Relay 0 holds nothing; relay 1 holds port 23101. Each first answers a
        // question nobody asked, which must not be taken for this one's answer.
        for (relay, rx) in [rx_a, rx_b].into_iter().enumerate() {
            let owners = owners.clone();
            tokio::spawn(async move {
                while let Ok(Frame::Control(Control::WhoOwns { host, port })) =
                    rx.recv_async().await
                {
                    owners.answered(Answer {
                        host: host.clone(),
                        port: port + 1000,
                        owner: Err("another question".into()),
                    });
                    let owner = match (relay, port) {
                        (1, 23101) => Ok(PortOwner {
                            node,
                            service: "storage".into(),
                        }),
                        _ => Err(format!("no node holds port {port} on relay {relay}")),
                    };
                    owners.answered(Answer { host, port, owner });
                }
            });
        }
        let owner = owners.ask("relay.example", 23101).await.unwrap();
        assert_eq!((owner.node, owner.service.as_str()), (node, "storage"));
        let none = owners.ask("relay.example", 23100).await.unwrap_err();
        assert!(
            none.contains("port 23100 on relay 0") && none.contains("port 23100 on relay 1"),
            "{none}"
        );
        owners.relay_gone(0);
        owners.relay_gone(1);
        assert!(owners.ask("relay.example", 23101).await.is_err());
    }
}
