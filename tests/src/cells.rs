//! SDK cells for scenarios: a cell that records everything it receives,
//! and an async poll with a deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use thynapse_cell::{Client, Mode, Options};

/// What a recording cell received: channel, payload and attempt of each
/// event, in arrival order.
pub type Log = Arc<Mutex<Vec<(String, Value, u32)>>>;

/// How often [`until`] polls.
pub const POLL: Duration = Duration::from_millis(20);

/// Joins `endpoint` (with `failover` endpoints) as a cell of `service`,
/// listens to `pattern` in `mode`, and records every event it gets; each
/// is acked when recorded.
///
/// # Panics
/// When the cell cannot join or listen: this is test code.
pub async fn recording_cell(
    endpoint: &str,
    failover: &[&str],
    service: &str,
    pattern: &str,
    mode: Mode,
) -> (Client, Log) {
    let mut options = Options::new(service);
    for f in failover {
        options = options.endpoint(*f);
    }
    let client = Client::connect(endpoint, options)
        .await
        .expect("cell joins");
    let mut sub = client.listen(pattern, mode).await.expect("cell listens");
    let log = Log::default();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Some(event) = sub.next_event().await {
            let entry = (
                event.channel().to_owned(),
                event.payload_value(),
                event.attempt(),
            );
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
        }
    });
    (client, log)
}

/// Polls `cond` every [`POLL`] until it holds.
///
/// # Panics
/// When `deadline` passes first, naming `what` was awaited.
pub async fn until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}
