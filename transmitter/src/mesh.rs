//! The mesh: membership and failure detection by gossip, and the view of
//! every other transmitter's cells.
//!
//! Membership uses `chitchat` (scuttlebutt reconciliation with a
//! phi-accrual failure detector) over UDP on the command port's number, so
//! `--join tcp://host:port` names a transmitter by the same endpoint cells
//! use. Each transmitter publishes two keys: its command endpoint and the
//! records of its cells (THID, service, metadata, listens). A thread with a
//! small tokio runtime runs the gossip and exchanges JSON with the router
//! thread over an inproc PAIR socket: the router sends its local cells when
//! they change, the mesh thread sends the view of live transmitters when it
//! changes.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thynapse_protocol::{Mode, Thid};

/// How often gossip rounds run.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
/// How often the mesh thread exchanges state with the router thread.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Phi above which a silent transmitter is declared dead.
pub const PHI_THRESHOLD: f64 = 8.0;
/// Gossip gaps longer than this are not used to learn the usual interval.
pub const MAX_GOSSIP_GAP: Duration = Duration::from_secs(2);
/// Interval assumed before any gossip has been heard from a node.
pub const INITIAL_GOSSIP_GAP: Duration = Duration::from_millis(500);
/// How long a dead transmitter is remembered before it is forgotten.
pub const DEAD_NODE_GRACE: Duration = Duration::from_secs(3600);

/// Gossip key: the transmitter's command endpoint.
const KEY_COMMAND: &str = "command";
/// Gossip key: JSON array of the transmitter's [`CellRecord`]s.
const KEY_CELLS: &str = "cells";
/// Gossip key saying the transmitter takes batches of mesh messages.
const KEY_BATCH: &str = "batch";
/// Gossip key saying the transmitter takes them packed.
const KEY_PACKED: &str = "packed";

/// One listen of a cell, as gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenRecord {
    /// The pattern.
    pub pattern: String,
    /// anycatch or multicatch.
    pub mode: Mode,
    /// Whether deliveries wait for ACKN.
    pub ack: bool,
    /// Deliveries of this listen the cell takes at once (§21); records
    /// from transmitters that do not send it count the default.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

fn default_concurrency() -> u32 {
    thynapse_protocol::limits::DEFAULT_CONCURRENCY
}

/// A cell as the mesh knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellRecord {
    /// The cell's THID.
    pub id: Thid,
    /// Its service.
    pub service: String,
    /// Its metadata.
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// What it listens to.
    pub listens: Vec<ListenRecord>,
}

/// Another live transmitter and its cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The transmitter's THID.
    pub id: Thid,
    /// Its command endpoint.
    pub command: String,
    /// Its cells.
    pub cells: Vec<CellRecord>,
    /// Whether it takes batches of `MDLV` and `MEVT` (PROTOCOL.md §23);
    /// transmitters that do not say so get single messages.
    #[serde(default)]
    pub batch: bool,
    /// Whether it takes those batches packed: their binary payloads in
    /// one frame, each message saying its `bin` length as its last field.
    #[serde(default)]
    pub packed: bool,
}

/// What the mesh thread needs to start.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// This transmitter's THID.
    pub id: Thid,
    /// The command endpoint other transmitters reach us at.
    pub command: String,
    /// The UDP address gossip binds and announces.
    pub gossip: SocketAddr,
    /// Command endpoints of transmitters to join (`tcp://host:port`).
    pub join: Vec<String>,
    /// Separates meshes: transmitters with other secrets ignore each other.
    pub secret: Option<String>,
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A `--join` endpoint is not `tcp://host:port`.
    #[error("cannot join {0:?}: expected tcp://host:port")]
    BadJoin(String),
    /// The gossip socket or runtime could not start.
    #[error("cannot start gossip on {addr}: {message}")]
    Gossip {
        /// The UDP address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
}

/// The `host:port` part of a `tcp://host:port` endpoint.
pub fn host_port(endpoint: &str) -> Option<&str> {
    let rest = endpoint.strip_prefix("tcp://")?;
    rest.rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())?;
    Some(rest)
}

/// The UDP gossip address of a transmitter whose command endpoint is
/// `endpoint`: the same host and port number.
///
/// # Errors
/// [`MeshError::BadJoin`] when it is not `tcp://host:port` or does not resolve.
pub fn gossip_addr(endpoint: &str) -> Result<SocketAddr, MeshError> {
    host_port(endpoint)
        .and_then(|hp| hp.to_socket_addrs().ok()?.next())
        .ok_or_else(|| MeshError::BadJoin(endpoint.to_owned()))
}

/// Starts the mesh thread. It connects a PAIR socket to `pair_endpoint`
/// (bound by the router thread) and runs until `stop` rises.
///
/// # Errors
/// [`MeshError`] when a join endpoint is malformed or gossip cannot bind.
pub fn start(
    ctx: &zmq::Context,
    pair_endpoint: &str,
    settings: MeshSettings,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, MeshError> {
    let seeds = settings
        .join
        .iter()
        .map(|j| {
            host_port(j)
                .map(str::to_owned)
                .ok_or_else(|| MeshError::BadJoin(j.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let gossip_err = |message: String| MeshError::Gossip {
        addr: settings.gossip,
        message,
    };
    let pair = ctx
        .socket(zmq::PAIR)
        .map_err(|e| gossip_err(e.to_string()))?;
    pair.connect(pair_endpoint)
        .map_err(|e| gossip_err(e.to_string()))?;
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(settings.id.to_hex(), generation, settings.gossip),
        cluster_id: cluster_id(settings.secret.as_deref()),
        gossip_interval: GOSSIP_INTERVAL,
        listen_addr: settings.gossip,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: PHI_THRESHOLD,
            sampling_window_size: 1000,
            max_interval: MAX_GOSSIP_GAP,
            initial_interval: INITIAL_GOSSIP_GAP,
            dead_node_grace_period: DEAD_NODE_GRACE,
        },
        marked_for_deletion_grace_period: DEAD_NODE_GRACE,
        catchup_callback: None,
        extra_liveness_predicate: Some(Box::new(|state| state.get(KEY_COMMAND).is_some())),
    };
    let initial = vec![
        (KEY_COMMAND.to_owned(), settings.command.clone()),
        (KEY_CELLS.to_owned(), "[]".to_owned()),
        (KEY_BATCH.to_owned(), "true".to_owned()),
        (KEY_PACKED.to_owned(), "true".to_owned()),
    ];
    // The runtime lives on the mesh thread, so a transmitter can be
    // started from inside another tokio runtime; startup errors come back
    // over a channel.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("thynapse-mesh".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = started_tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                match spawn_chitchat(config, initial, &UdpTransport).await {
                    Ok(handle) => {
                        let _ = started_tx.send(Ok(()));
                        exchange(handle, pair, stop).await;
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(format!("{e:#}")));
                    }
                }
            });
        })
        .expect("spawning a thread at startup");
    match started_rx.recv() {
        Ok(Ok(())) => {
            tracing::info!(gossip = %settings.gossip, join = ?settings.join, "mesh gossip started");
            Ok(thread)
        }
        Ok(Err(message)) => {
            let _ = thread.join();
            Err(gossip_err(message))
        }
        Err(_) => {
            let _ = thread.join();
            Err(gossip_err("the mesh thread ended at startup".to_owned()))
        }
    }
}

/// Meshes with different secrets must not merge: the secret's hash names
/// the gossip cluster.
fn cluster_id(secret: Option<&str>) -> String {
    match secret {
        Some(s) => {
            let digest = Thid::for_event(&Thid::from_bytes([0; 20]), 0, "mesh", s.as_bytes());
            format!("thynapse-{}", &digest.to_hex()[..16])
        }
        None => "thynapse".to_owned(),
    }
}

/// The mesh thread's loop: local cells in, view out.
async fn exchange(handle: chitchat::ChitchatHandle, pair: zmq::Socket, stop: Arc<AtomicBool>) {
    let mut interval = tokio::time::interval(SYNC_INTERVAL);
    let mut last_view = String::new();
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        let mut latest = None;
        while let Ok(Ok(cells)) = pair.recv_string(zmq::DONTWAIT) {
            latest = Some(cells);
        }
        let chitchat = handle.chitchat();
        let mut cc = chitchat.lock().await;
        if let Some(cells) = latest {
            cc.self_node_state().set(KEY_CELLS, cells);
        }
        let me = cc.self_chitchat_id().clone();
        let mut nodes: Vec<String> = cc
            .live_nodes()
            .filter(|n| **n != me)
            .filter_map(|n| {
                let state = cc.node_state(n)?;
                let command = serde_json::to_string(state.get(KEY_COMMAND)?).ok()?;
                let cells = state.get(KEY_CELLS).unwrap_or("[]");
                let batch = state.get(KEY_BATCH) == Some("true");
                let packed = state.get(KEY_PACKED) == Some("true");
                Some(format!(
                    r#"{{"id":"{}","command":{command},"cells":{cells},"batch":{batch},"packed":{packed}}}"#,
                    n.node_id
                ))
            })
            .collect();
        drop(cc);
        nodes.sort();
        let view = format!("[{}]", nodes.join(","));
        if view != last_view && pair.send(view.as_bytes(), zmq::DONTWAIT).is_ok() {
            last_view = view;
        }
    }
    let _ = handle.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_endpoints_name_the_gossip_port() {
        assert_eq!(host_port("tcp://127.0.0.1:5454"), Some("127.0.0.1:5454"));
        assert_eq!(host_port("udp://x:1"), None);
        assert_eq!(host_port("tcp://x"), None);
        assert_eq!(gossip_addr("tcp://127.0.0.1:5454").unwrap().port(), 5454);
    }

    #[test]
    fn secrets_separate_meshes() {
        assert_eq!(cluster_id(None), "thynapse");
        assert_ne!(cluster_id(Some("a")), cluster_id(Some("b")));
        assert_eq!(cluster_id(Some("a")), cluster_id(Some("a")));
    }

    #[test]
    fn node_records_parse_from_the_view_json() {
        let json = r#"[{"id":"0000000000000000000000000000000000000001","command":"tcp://h:1","cells":[{"id":"0000000000000000000000000000000000000002","service":"s","listens":[{"pattern":"a::*","mode":"any","ack":true}]}]}]"#;
        let nodes: Vec<NodeRecord> = serde_json::from_str(json).unwrap();
        assert_eq!(nodes[0].cells[0].listens[0].mode, Mode::Any);
    }
}
