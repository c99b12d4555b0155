//! Counters the router keeps, readable from any thread without locks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use thynapse_protocol::ErrorCode;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The transmitter's counters. Written by the router thread only,
        /// read by anyone (admin, tests) through [`Metrics::snapshot`].
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// `ERRR` replies sent, by code (indexed like [`ErrorCode::ALL`]).
            pub errors: [AtomicU64; ERROR_CODES],
        }

        impl Metrics {
            /// Every counter by name, errors as `errors.<code>`.
            pub fn snapshot(&self) -> BTreeMap<String, u64> {
                let mut m = BTreeMap::new();
                $(m.insert(stringify!($name).to_owned(), self.$name.load(Ordering::Relaxed));)*
                for (code, n) in ErrorCode::ALL.iter().zip(&self.errors) {
                    m.insert(format!("errors.{}", code.as_str()), n.load(Ordering::Relaxed));
                }
                m
            }
        }
    };
}

const ERROR_CODES: usize = 20;

counters! {
    /// Cells currently welcomed (a gauge).
    cells,
    /// Commands received on the command socket.
    commands,
    /// Events published by cells.
    events_in,
    /// Anycatch deliveries sent (first attempts and redeliveries).
    deliveries,
    /// Redeliveries (attempt > 1).
    redeliveries,
    /// Multicatch copies sent to local cells (one per cell and event).
    multicast,
    /// Deliveries acknowledged.
    acks,
    /// Deliveries refused with NACK.
    nacks,
    /// Events no cell listened to.
    dropped_no_listeners,
    /// Deliveries dropped because the per-service backlog was full.
    dropped_backlog_full,
    /// Messages not sent because a peer's queue was full (a batch counts
    /// once).
    dropped_hwm,
    /// Multicatch copies dropped because the cell's queue was full, each
    /// event of a dropped batch counted (their messages are also in
    /// `dropped_hwm`).
    dropped_multicatch,
    /// Cells expired for missing heartbeats.
    expired_cells,
    /// Subscription handshakes answered on the event socket.
    syncs,
    /// Messages sent to other transmitters.
    mesh_out,
    /// Messages received from other transmitters.
    mesh_in,
    /// Requests received from cells.
    requests,
    /// Replies returned to requesters.
    replies,
    /// Requests that timed out.
    request_timeouts,
    /// Deliveries that waited at the transmitter for a free slot.
    queued,
    /// Cells disconnected as slow consumers.
    slow_consumers,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u32) {
        counter.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Counts an error reply.
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            Metrics::incr(&self.errors[i]);
        }
    }

    /// Sum of all error replies.
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_is_a_slot_for_every_error_code() {
        assert_eq!(ErrorCode::ALL.len(), ERROR_CODES);
        let m = Metrics::default();
        m.error(ErrorCode::ShuttingDown);
        assert_eq!(m.snapshot()["errors.shutting_down"], 1);
        assert_eq!(m.errors_total(), 1);
    }
}
