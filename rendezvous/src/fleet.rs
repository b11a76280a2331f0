//! The link to a fleet's engine (NATS JetStream, #19), shared by `ferry-relay` and
//! the standalone `ferry-rendezvous`: the `--fleet` settings, connecting with
//! reconnection, opening the fleet's key-value buckets, watching one, and counting
//! and timing every operation. And what the rendezvous itself shares there: the
//! fleet's path records (`NAME-records`, key a node's ID, the signed record as the
//! node published it), so a lookup or a punch at any relay or rendezvous of the
//! fleet finds a node that published at another.
//!
//! The engine is not trusted with records: each one read from it is checked by its
//! own node's signature (`Rendezvous::adopt`) exactly like one a node published
//! here, so whoever holds the engine cannot forge or alter one. The relay builds its
//! shared policy, invites, relays and presence on the same link (`ferry_relay::fleet`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use ferry_proto::NodeId;
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::sessions::Rendezvous;

/// How long one engine operation may take before it counts as failed.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long setting up a watch of a bucket may take before it is tried again (the
/// engine's return also restarts every watch at once: [`next_change`]).
pub const WATCH_SETUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a process waits between tries to reach an engine that went away.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(250);
/// Records waiting to be written to the engine; beyond this they are dropped (each
/// node publishes its record again within minutes).
pub const RECORD_QUEUE: usize = 65_536;

/// `--fleet` and the settings beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetOptions {
    /// NATS server URLs, `nats://host:port`.
    pub servers: Vec<String>,
    /// Prefix of the fleet's buckets: processes with the same name share them.
    pub name: String,
    /// A NATS credentials file (`.creds`), kept 0600 like the key files.
    pub credentials: Option<PathBuf>,
    /// Copies of each bucket the cluster keeps (3 for a 3-node cluster).
    pub replicas: usize,
}

impl FleetOptions {
    /// Checks the `--fleet`, `--fleet-name`, `--fleet-credentials` and
    /// `--fleet-replicas` settings (flag or config file) and makes the options; `None`
    /// without `--fleet`. Every refusal says what to change.
    pub fn from_settings(
        urls: Option<String>,
        name: Option<String>,
        credentials: Option<PathBuf>,
        replicas: Option<usize>,
    ) -> anyhow::Result<Option<FleetOptions>> {
        let Some(urls) = urls else {
            return Ok(None);
        };
        let servers: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if servers.is_empty() {
            anyhow::bail!(
                "--fleet needs NATS server URLs, e.g. nats://nats1:4222,nats://nats2:4222"
            );
        }
        let name = name.unwrap_or_else(|| "ferry".to_string());
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            anyhow::bail!(
                "fleet name {name:?} must be letters, digits, - and _ (it names the fleet's NATS buckets)"
            );
        }
        if let Some(path) = &credentials {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| {
                anyhow::anyhow!("cannot read the fleet credentials {}: {e}", path.display())
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "the fleet credentials {} can be read by others (mode {mode:o}); run chmod 600 on it: they allow what a grid admin may do",
                    path.display()
                );
            }
        }
        Ok(Some(FleetOptions {
            servers,
            name,
            credentials,
            replicas: replicas.unwrap_or(3).max(1),
        }))
    }
}

/// Why an engine operation failed. Each says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "the fleet's engine (NATS at {servers}) cannot be reached: {why}; this process keeps serving with what it has, try again when it is back"
    )]
    Unreachable { servers: String, why: String },
    #[error("the fleet's engine refused {what}: {why}")]
    Refused { what: &'static str, why: String },
    #[error("the fleet's {what} in the engine is not what a relay writes ({why})")]
    Corrupt { what: &'static str, why: String },
    #[error("another relay kept changing the fleet's {what}; try the change again")]
    Contended { what: &'static str },
}

/// One change seen by a watch: the key, its new value (`None`: deleted), and whether
/// the watch has caught up with the bucket (before that, what it has seen is
/// incomplete).
pub type Change = (String, Option<Bytes>, bool);

/// What a process asks of its fleet's engine, counted by operation and outcome and
/// timed (`<prefix>_fleet_operations_total`, `<prefix>_fleet_operation_seconds`),
/// and whether it is in touch (`<prefix>_fleet_up`). A process without `--fleet`
/// registers none of these.
#[derive(Clone)]
pub struct FleetOps {
    total: IntCounterVec,
    seconds: HistogramVec,
    /// 1 while in touch with the engine, else 0.
    pub up: IntGauge,
}

impl FleetOps {
    /// Registers the series in `registry`, named after `prefix` (`ferry_relay`,
    /// `ferry_rendezvous`); `operations` lists the operation labels for the help text.
    pub fn new(
        registry: &Registry,
        prefix: &str,
        operations: &str,
    ) -> Result<FleetOps, prometheus::Error> {
        let ops = FleetOps {
            total: IntCounterVec::new(
                Opts::new(
                    format!("{prefix}_fleet_operations_total"),
                    format!(
                        "Operations on the fleet's engine (--fleet), by operation ({operations}) and outcome (ok, error)"
                    ),
                ),
                &["operation", "outcome"],
            )?,
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    format!("{prefix}_fleet_operation_seconds"),
                    "Time one operation on the fleet's engine took, by operation, retries through a leader election included",
                )
                .buckets(ferry_proto::admin::SETUP_SECONDS_BUCKETS.to_vec()),
                &["operation"],
            )?,
            up: IntGauge::new(
                format!("{prefix}_fleet_up"),
                "1 while this process is in touch with its fleet's engine (--fleet), else 0",
            )?,
        };
        registry.register(Box::new(ops.total.clone()))?;
        registry.register(Box::new(ops.seconds.clone()))?;
        registry.register(Box::new(ops.up.clone()))?;
        Ok(ops)
    }

    /// Counts and times one operation (`ok` or `error`).
    pub fn observe(&self, operation: &str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.total.with_label_values(&[operation, outcome]).inc();
        self.seconds
            .with_label_values(&[operation])
            .observe(took.as_secs_f64());
    }

    /// Runs `operation` and counts and times it.
    pub async fn time<T, E>(
        &self,
        name: &str,
        operation: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = std::time::Instant::now();
        let result = operation.await;
        self.observe(name, result.is_ok(), started.elapsed());
        result
    }
}

/// A connection to the fleet's engine. It reconnects by itself after an outage;
/// operations made meanwhile fail with [`FleetError::Unreachable`].
pub struct Engine {
    opts: FleetOptions,
    ops: FleetOps,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Engine {
    /// Connects to the engine as `client_name` (shown in the engine's monitoring).
    pub async fn connect(
        opts: &FleetOptions,
        client_name: &str,
        ops: FleetOps,
    ) -> Result<Engine, FleetError> {
        let unreachable = |why: String| FleetError::Unreachable {
            servers: opts.servers.join(","),
            why,
        };
        let mut connect = async_nats::ConnectOptions::new()
            .name(client_name)
            .connection_timeout(OPERATION_TIMEOUT)
            .request_timeout(Some(OPERATION_TIMEOUT))
            // Back within a quarter second of the engine's return (the default
            // waits up to seconds between tries).
            .reconnect_delay_callback(|_| RECONNECT_DELAY)
            .retry_on_initial_connect();
        if let Some(creds) = &opts.credentials {
            connect = connect
                .credentials_file(creds)
                .await
                .map_err(|e| unreachable(format!("credentials {}: {e}", creds.display())))?;
        }
        let servers: Vec<async_nats::ServerAddr> = opts
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| unreachable(format!("{e}")))?;
        let client = tokio::time::timeout(OPERATION_TIMEOUT * 2, connect.connect(servers))
            .await
            .map_err(|_| unreachable("no server answered".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Engine {
            js: jetstream::new(client.clone()),
            opts: opts.clone(),
            ops,
            client,
        })
    }

    /// Opens the fleet's bucket `<name>-<suffix>`, creating it if no one has yet.
    /// Entries older than `max_age` expire (`Duration::ZERO`: never).
    pub async fn bucket(&self, suffix: &str, max_age: Duration) -> Result<kv::Store, FleetError> {
        let bucket = format!("{}-{suffix}", self.opts.name);
        // The stream a key-value bucket is (NATS's KV convention, ADR-8), made by
        // hand: async-nats's create_key_value first asks for account details that
        // Debian's nats-server 2.9 does not send, and then fails to parse them.
        let config = jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            discard: jetstream::stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: self.opts.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let refused = |e: String| FleetError::Refused {
            what: "a bucket",
            why: format!("{bucket}: {e}"),
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| refused(e.to_string()))?;
        self.js
            .get_key_value(&bucket)
            .await
            .map_err(|e| refused(e.to_string()))
    }

    /// Every key of `bucket` as it is, then every change.
    pub async fn watch(
        &self,
        bucket: &kv::Store,
    ) -> Result<impl futures::Stream<Item = Result<Change, FleetError>> + use<>, FleetError> {
        self.ops
            .time("watch", async {
                // Short: a watch asked for while the engine elects leaders may never be
                // answered, and the next try soon after is what catches its return.
                let watch =
                    tokio::time::timeout(WATCH_SETUP_TIMEOUT, bucket.watch_with_history(">"))
                        .await
                        .map_err(|_| self.unreachable("no answer to a watch in time"))?
                        .map_err(|e| self.unreachable(e))?;
                Ok(watch.map(|entry| match entry {
                    Ok(e) => Ok((
                        e.key,
                        (e.operation == kv::Operation::Put).then_some(e.value),
                        e.seen_current || e.delta == 0,
                    )),
                    Err(e) => Err(FleetError::Unreachable {
                        servers: String::new(),
                        why: e.to_string(),
                    }),
                }))
            })
            .await
    }

    /// Whether a connection to a server of the engine is held now. A failed
    /// operation with a connection is a passing stall (a leader being elected), not
    /// an unreachable engine.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The error for an operation the engine did not answer.
    pub fn unreachable(&self, e: impl std::fmt::Display) -> FleetError {
        FleetError::Unreachable {
            servers: self.opts.servers.join(","),
            why: e.to_string(),
        }
    }

    pub fn ops(&self) -> &FleetOps {
        &self.ops
    }

    pub fn options(&self) -> &FleetOptions {
        &self.opts
    }
}

/// The next change a watch brings, or `None` when it ended or the engine just came
/// back after an outage (`back`): a watch that lived through the outage may be
/// stalled, and one made anew brings every key as it is now at once.
pub async fn next_change<S>(updates: &mut S, back: &tokio::sync::Notify) -> Option<S::Item>
where
    S: futures::Stream + Unpin,
{
    tokio::select! {
        item = updates.next() => item,
        () = back.notified() => None,
    }
}

/// A logger that says each distinct warning once in a row (an engine that stays
/// away says so once, not every second).
pub fn warner() -> impl FnMut(String) {
    let mut last = String::new();
    move |text: String| {
        if text != last {
            tracing::warn!("{text}");
            last = text;
        }
    }
}

/// The fleet's records bucket.
pub struct FleetRecords {
    bucket: kv::Store,
}

impl FleetRecords {
    /// Opens (or creates) the bucket; a record in it lives as long as a record may.
    pub async fn open(engine: &Engine) -> Result<FleetRecords, FleetError> {
        Ok(FleetRecords {
            bucket: engine
                .bucket("records", ferry_proto::record::MAX_RECORD_LIFETIME)
                .await?,
        })
    }

    /// Writes the record `node` published (its JSON) for the fleet's other members.
    pub async fn put(&self, engine: &Engine, node: NodeId, json: Bytes) -> Result<(), FleetError> {
        self.bucket
            .put(node.to_string(), json)
            .await
            .map(|_| ())
            .map_err(|e| engine.unreachable(e))
    }

    /// Stores every record of the bucket, and every new one, in `rendezvous` once its
    /// node's signature checks out; a record that does not is named in the debug log
    /// and left. Runs for good, watching anew after an outage (`back`).
    pub async fn follow(
        &self,
        engine: &Engine,
        rendezvous: &Rendezvous,
        back: &tokio::sync::Notify,
    ) {
        let mut warn_once = warner();
        loop {
            match engine.watch(&self.bucket).await {
                Ok(updates) => {
                    let mut updates = std::pin::pin!(updates);
                    while let Some(update) = next_change(&mut updates, back).await {
                        match update {
                            Ok((key, Some(json), _)) => {
                                let adopted = serde_json::from_slice(&json)
                                    .map_err(|e| e.to_string())
                                    .and_then(|record| {
                                        rendezvous.adopt(record).map_err(|e| e.to_string())
                                    });
                                if let Err(e) = adopted {
                                    tracing::debug!("fleet record {key:?} not taken: {e}");
                                }
                            }
                            Ok((_, None, _)) => {}
                            Err(e) => {
                                warn_once(e.to_string());
                                break;
                            }
                        }
                    }
                }
                Err(e) => warn_once(e.to_string()),
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    }
}

/// A standalone rendezvous's part in a fleet: connects (retrying until the engine
/// answers), then writes every record published here from `queue` and stores every
/// record of the fleet in `rendezvous`. `up` follows the connection. Runs for good.
pub async fn serve_rendezvous_records(
    opts: FleetOptions,
    ops: FleetOps,
    rendezvous: Arc<Rendezvous>,
    mut queue: tokio::sync::mpsc::Receiver<(NodeId, Bytes)>,
) {
    let mut warn_once = warner();
    let (engine, records) = loop {
        let connected = ops
            .time("connect", async {
                let engine = Engine::connect(&opts, "ferry-rendezvous", ops.clone()).await?;
                let records = FleetRecords::open(&engine).await?;
                Ok::<_, FleetError>((engine, records))
            })
            .await;
        match connected {
            Ok(both) => break both,
            Err(e) => warn_once(e.to_string()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tracing::info!(
        "in fleet {} ({} NATS server(s)), sharing path records",
        opts.name,
        opts.servers.len()
    );
    let (engine, records) = (Arc::new(engine), Arc::new(records));
    let back = Arc::new(tokio::sync::Notify::new());
    let watching = {
        let (engine, records, back) = (engine.clone(), records.clone(), back.clone());
        tokio::spawn(async move { records.follow(&engine, &rendezvous, &back).await })
    };
    let writing = {
        let (engine, records) = (engine.clone(), records.clone());
        tokio::spawn(async move {
            let mut warn_once = warner();
            while let Some((node, json)) = queue.recv().await {
                let result = engine
                    .ops()
                    .time("write_record", records.put(&engine, node, json))
                    .await;
                if let Err(e) = result {
                    // The node publishes again within minutes; nothing waits on it.
                    warn_once(e.to_string());
                }
            }
        })
    };
    // Whether the engine is in touch, and a fresh watch the moment it is back.
    let mut was_up = true;
    loop {
        let up = engine.connected();
        engine.ops().up.set(i64::from(up));
        if up && !was_up {
            back.notify_waiters();
        }
        was_up = up;
        if watching.is_finished() || writing.is_finished() {
            return;
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}
