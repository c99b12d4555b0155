//! The channels between the async side (every [`Client`](crate::Client)
//! clone, [`Subscription`](crate::Subscription) and
//! [`Event`]) and the connection task that owns the
//! sockets, and the doorbell that wakes that task out of its wait.
//!
//! Two queues: `commands` is bounded and awaited (publish, listen, flush,
//! requests), so a fast publisher waits when the task cannot keep up;
//! `control` is unbounded and synchronous, for what `Drop` impls must send
//! without an executor (acks, nacks, replies, unlisten, close). Replies go
//! there too: there are at most as many as handlers running at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};
use thynapse_protocol::{Pattern, Thid};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::batch::Publish;
use crate::error::Error;
use crate::event::Event;
use crate::membership::MembershipEvent;
use crate::options::ListenOptions;
use crate::request::Reply;
use crate::serve::Request;

/// Synchronous messages to the connection task.
#[derive(Debug)]
pub(crate) enum Control {
    /// The handler is done with an anycatch delivery: queue an `ACKN`.
    Ack(Thid),
    /// The handler refused a delivery, or it was never handed out (an
    /// event, or a request no handler started on): `NACK`.
    Nack(Thid),
    /// A handler answered request `id`: send its `RPLY`.
    Reply {
        /// The request's THID.
        id: Thid,
        /// The `RPLY` frames (1 or 2).
        frames: Vec<Vec<u8>>,
    },
    /// A [`Subscription`](crate::Subscription) or a responder was dropped.
    Unlisten {
        /// The subscription's id.
        sub: u64,
    },
    /// A [`MembershipStream`](crate::MembershipStream) was dropped.
    StopMembership {
        /// The stream's id.
        sub: u64,
    },
    /// Flush acks, say `GBYE` and stop; answer when the sockets are closed.
    Close {
        /// Told when the task has closed its sockets.
        reply: Option<oneshot::Sender<()>>,
    },
}

/// Where the deliveries of a listen go.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Events (`DLVR`, `EVNT`), to a [`Subscription`](crate::Subscription),
    /// in batches: those read from the socket in one go.
    Events(mpsc::UnboundedSender<Vec<Event>>),
    /// Requests (`RQST`), to a responder.
    Requests(Dispatch),
}

/// Where a responder's requests go: straight to a handler of their own
/// when one of the responder's slots is free, else into its loop's queue,
/// where they wait for a slot.
pub(crate) struct Dispatch {
    /// Starts a handler on the request if a slot is free; gives the
    /// request back if not.
    pub(crate) start: Box<dyn Fn(Request) -> Option<Request> + Send + Sync>,
    /// The responder's loop.
    pub(crate) queue: mpsc::UnboundedSender<Request>,
}

impl Dispatch {
    /// Hands `request` over. When the responder is gone, the request is
    /// dropped: its guard NACKs it.
    pub(crate) fn dispatch(&self, request: Request) {
        if let Some(request) = (self.start)(request) {
            let _ = self.queue.send(request);
        }
    }
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch").finish_non_exhaustive()
    }
}

/// Where the answer to a command goes.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The `OKAY` body (raw JSON), or the `ERRR` as an error.
    Okay {
        /// The caller.
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
        /// For `META`: the update, applied on `OKAY` to the metadata the
        /// cell says `HELO` with again after a re-welcome or failover.
        metadata: Option<(Map<String, Value>, bool)>,
    },
    /// The `RPLY` (or `ERRR`) of one attempt of a request; every attempt
    /// of one request shares the sender.
    Reply(mpsc::UnboundedSender<Result<Reply, Error>>),
}

impl Answer {
    /// Whether the caller stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Answer::Okay { reply, .. } => reply.is_closed(),
            Answer::Reply(tx) => tx.is_closed(),
        }
    }

    /// Tells the caller it failed.
    pub(crate) fn fail(self, e: Error) {
        match self {
            Answer::Okay { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Answer::Reply(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Asynchronous requests to the connection task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send a message; with `answer`, the reply carrying `ref` goes there.
    Send {
        /// The message's frames (1 or 2).
        frames: Vec<Vec<u8>>,
        /// The `ref` the message carries, and where its answer goes.
        answer: Option<(u64, Answer)>,
    },
    /// Publish an event that expects no answer: a `J EVNT {...}` frame
    /// and its binary frame, if any. Publishes drained together may share
    /// one batch (PROTOCOL.md §23).
    Publish(Publish),
    /// Listen to a pattern and route matching deliveries to `sink`.
    Listen {
        /// The new subscription's id.
        sub: u64,
        /// The pattern.
        pattern: Pattern,
        /// Mode, ack and concurrency.
        options: ListenOptions,
        /// Where matching deliveries go.
        sink: Sink,
        /// Told once the listen is in place.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Subscribe to membership events of services starting with `prefix`.
    Membership {
        /// The new stream's id.
        sub: u64,
        /// The service prefix ("" for every service).
        prefix: String,
        /// Where the events go.
        events: mpsc::UnboundedSender<MembershipEvent>,
        /// Told once the subscription is in place.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Flush acks and make a PING/PONG round trip.
    Flush {
        /// The PING's ref.
        reference: u64,
        /// Told on PONG.
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// The sending half of the link, shared by every handle.
#[derive(Debug)]
pub(crate) struct Link {
    /// Synchronous messages.
    control: std::sync::mpsc::Sender<Control>,
    /// Asynchronous requests.
    commands: mpsc::Sender<Command>,
    /// Wakes the task.
    bell: Doorbell,
    /// Source of the numeric `ref`s of requests.
    refs: AtomicU64,
}

/// The task's half of the link.
#[derive(Debug)]
pub(crate) struct LinkReceiver {
    /// Synchronous messages.
    pub(crate) control: std::sync::mpsc::Receiver<Control>,
    /// Asynchronous requests.
    pub(crate) commands: mpsc::Receiver<Command>,
    /// The doorbell's receiving end.
    pub(crate) bell: BellReceiver,
}

impl Link {
    /// A new link and its receiving half.
    pub(crate) fn new(capacity: usize) -> (Arc<Link>, LinkReceiver) {
        let (control_tx, control_rx) = std::sync::mpsc::channel();
        let (commands_tx, commands_rx) = mpsc::channel(capacity);
        let (bell, bell_rx) = doorbell();
        let link = Arc::new(Link {
            control: control_tx,
            commands: commands_tx,
            bell,
            refs: AtomicU64::new(1),
        });
        (
            link,
            LinkReceiver {
                control: control_rx,
                commands: commands_rx,
                bell: bell_rx,
            },
        )
    }

    /// Sends a control message; false when the task is gone.
    pub(crate) fn control(&self, message: Control) -> bool {
        let sent = self.control.send(message).is_ok();
        if sent {
            self.bell.ring();
        }
        sent
    }

    /// Sends a command, waiting while the queue is full.
    ///
    /// # Errors
    /// [`ErrorKind::Disconnected`](crate::ErrorKind::Disconnected) when the
    /// thread is gone.
    pub(crate) async fn command(&self, command: Command) -> Result<(), Error> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::disconnected())?;
        self.bell.ring();
        Ok(())
    }

    /// Whether the task has stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// A fresh `ref` for a request.
    pub(crate) fn next_ref(&self) -> u64 {
        self.refs.fetch_add(1, Ordering::Relaxed)
    }
}

/// Wakes the connection task: a [`Notify`] the task awaits beside its
/// sockets' readiness. Rings are coalesced: only the first ring after the
/// task last took the wake-up notifies. A ring from any thread, with or
/// without a runtime (a `Drop` impl), costs no system call: the runtime
/// schedules the task.
#[derive(Debug)]
pub(crate) struct Doorbell {
    /// The task's wake-up.
    notify: Arc<Notify>,
    /// Set by a ring, cleared by the task when it takes the wake-up.
    rung: Arc<AtomicBool>,
}

/// The doorbell's receiving end.
#[derive(Debug)]
pub(crate) struct BellReceiver {
    /// Shared with [`Doorbell`].
    notify: Arc<Notify>,
    /// Shared with [`Doorbell`].
    rung: Arc<AtomicBool>,
}

fn doorbell() -> (Doorbell, BellReceiver) {
    let notify = Arc::new(Notify::new());
    let rung = Arc::new(AtomicBool::new(false));
    (
        Doorbell {
            notify: notify.clone(),
            rung: rung.clone(),
        },
        BellReceiver { notify, rung },
    )
}

impl Doorbell {
    /// Wakes the task, unless a wake-up is already pending. Call after
    /// queueing the message: the task clears the flag before it drains
    /// the queues, so no message is left behind (a ring while the task is
    /// not waiting leaves a permit its next wait takes at once).
    pub(crate) fn ring(&self) {
        if !self.rung.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }
}

impl BellReceiver {
    /// Waits for a ring (at once if one came since the last wait).
    pub(crate) async fn rang(&self) {
        self.notify.notified().await;
    }

    /// Re-arms the bell after it rang. The caller then drains its queues.
    pub(crate) fn drain(&self) {
        self.rung.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[tokio::test]
    async fn rings_are_coalesced_until_the_bell_is_drained() {
        let (bell, rx) = doorbell();
        async fn rang(rx: &BellReceiver) -> bool {
            tokio::time::timeout(Duration::from_millis(20), rx.rang())
                .await
                .is_ok()
        }
        bell.ring();
        bell.ring();
        bell.ring();
        assert!(rang(&rx).await, "rung");
        assert!(!rang(&rx).await, "one wake-up for three rings");
        bell.ring();
        assert!(!rang(&rx).await, "no new wake-up before drain");
        rx.drain();
        bell.ring();
        assert!(rang(&rx).await, "re-armed");
    }

    #[test]
    fn ringing_a_bell_whose_task_is_gone_is_harmless() {
        let (bell, rx) = doorbell();
        drop(rx);
        bell.ring();
        bell.rung.store(false, Ordering::SeqCst);
        bell.ring();
    }
}
