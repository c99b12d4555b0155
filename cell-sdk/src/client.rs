//! [`Client`]: the cheap, cloneable handle to one connection.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use thynapse_protocol::body::Limits;
use thynapse_protocol::pattern::validate_channel;
use thynapse_protocol::{Mode, Pattern, Thid};
use tokio::sync::{mpsc, oneshot};

use crate::conn::{self, Start};
use crate::consts::COMMAND_QUEUE_CAPACITY;
use crate::error::{Error, ErrorKind};
use crate::link::{Command, Control, Link, PendingConfirm};
use crate::options::{ListenOptions, Options};
use crate::subscription::Subscription;
use crate::wire;

/// The answer to a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    /// The event's THID.
    pub id: Thid,
    /// How many anycatch services it went to, plus 1 if multicatch
    /// listeners matched.
    pub routed: u32,
}

/// A connection to a transmitter, as a cell of one service.
///
/// `Client` is a cheap [`Clone`] handle: every clone talks to the same
/// background thread, which owns the ZeroMQ sockets. The connection closes
/// with [`Client::close`], when the last clone is dropped, or when the
/// transmitter says `GBYE` and there is no failover endpoint
/// ([`Options::endpoint`]); then every [`Subscription`] ends and further
/// calls fail with [`ErrorKind::Disconnected`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What the handles share.
struct Inner {
    /// To the background thread.
    link: Arc<Link>,
    /// This cell's THID.
    id: Thid,
    /// The service.
    service: String,
    /// The transmitter's THID (from WLCM).
    transmitter: Thid,
    /// The transmitter's event endpoint (from WLCM).
    event_endpoint: String,
    /// The heartbeat interval in use.
    heartbeat: Duration,
    /// The transmitter's limits (from WLCM).
    limits: Limits,
    /// The last sequence number given to a published event.
    seq: AtomicU64,
    /// The last subscription id.
    subs: AtomicU64,
    /// How long requests wait.
    request_timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: close the connection.
        self.link.control(Control::Close { reply: None });
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("service", &self.inner.service)
            .field("transmitter", &self.inner.transmitter)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Joins the transmitter whose command socket is at `endpoint`
    /// (`tcp://host:port`) as a new cell of `options`' service: draws a
    /// random cell THID, says HELO, waits for WLCM, then connects to the
    /// transmitter's event socket. The failover endpoints of `options` are
    /// for later, if this transmitter goes away: the first join is to
    /// `endpoint` only.
    ///
    /// # Errors
    /// - [`ErrorKind::TimedOut`]: no WLCM within the connect timeout (no
    ///   transmitter there, or it is unreachable).
    /// - [`ErrorKind::Unauthorized`]: the transmitter refused the token.
    /// - [`ErrorKind::Rejected`]: the transmitter answered ERRR (e.g.
    ///   `bad_service`); see [`Error::code`].
    /// - [`ErrorKind::Zmq`] / [`ErrorKind::Io`]: the endpoint is malformed,
    ///   or sockets or the thread could not be created.
    ///
    /// # Cancel safety
    /// Dropping the future stops the connection attempt; a cell welcomed in
    /// the meantime says GBYE.
    pub async fn connect(endpoint: &str, options: Options) -> Result<Client, Error> {
        let id = Thid::random();
        let service = options.service.clone();
        let request_timeout = options.request_timeout;
        let heartbeat_override = options.heartbeat;
        let (link, rx) = Link::new(COMMAND_QUEUE_CAPACITY)?;
        let welcome = conn::spawn(Start {
            endpoint: endpoint.to_owned(),
            id,
            options,
            link: link.clone(),
            rx,
        })?;
        let welcome = welcome.await.map_err(|_| Error::disconnected())??;
        Ok(Client {
            inner: Arc::new(Inner {
                link,
                id,
                service,
                transmitter: welcome.id,
                event_endpoint: welcome.event_endpoint,
                heartbeat: heartbeat_override
                    .unwrap_or(Duration::from_millis(welcome.heartbeat_ms)),
                limits: welcome.limits,
                seq: AtomicU64::new(0),
                subs: AtomicU64::new(0),
                request_timeout,
            }),
        })
    }

    /// Joins the first endpoint of `options` (from [`Options::endpoint`]
    /// or `THYNAPSE_ENDPOINT`), else the default command endpoint
    /// (`tcp://127.0.0.1:5454`).
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(options: Options) -> Result<Client, Error> {
        let endpoint = options
            .endpoints
            .first()
            .cloned()
            .unwrap_or_else(|| thynapse_protocol::limits::DEFAULT_COMMAND_ENDPOINT.to_owned());
        Client::connect(&endpoint, options).await
    }

    /// This cell's THID.
    pub fn id(&self) -> Thid {
        self.inner.id
    }

    /// The service this cell belongs to.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The THID of the transmitter that welcomed this cell.
    pub fn transmitter_id(&self) -> Thid {
        self.inner.transmitter
    }

    /// The transmitter's event endpoint (WLCM `pub`).
    pub fn event_endpoint(&self) -> &str {
        &self.inner.event_endpoint
    }

    /// The heartbeat interval in use.
    pub fn heartbeat(&self) -> Duration {
        self.inner.heartbeat
    }

    /// The transmitter's limits (largest message, ack timeout).
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.link.is_closed()
    }

    /// Listens to `pattern` in `mode` (anycatch with acks, or multicatch).
    /// Shorthand for [`Client::listen_with`].
    ///
    /// # Errors
    /// As [`Client::listen_with`].
    pub async fn listen(&self, pattern: &str, mode: Mode) -> Result<Subscription, Error> {
        self.listen_with(pattern, ListenOptions::from(mode)).await
    }

    /// Listens to `pattern` (exact `a::b`, prefix `a::*` or glob `*::b`).
    ///
    /// Returns once the listen is in place: for multicatch, once the event
    /// subscription has reached the transmitter too, so no event published
    /// after this returns is missed.
    ///
    /// Several subscriptions of one client may listen to the same pattern
    /// with the same options: a multicatch event goes to each of them, an
    /// anycatch delivery to one of them (round robin).
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidPattern`]: the pattern is malformed.
    /// - [`ErrorKind::Conflict`]: this client already listens to the same
    ///   pattern with another mode or ack.
    /// - [`ErrorKind::Rejected`]: the transmitter refused
    ///   (`too_many_listens`, ...).
    /// - [`ErrorKind::TimedOut`], [`ErrorKind::Disconnected`].
    ///
    /// # Cancel safety
    /// Dropping the future undoes the listen.
    pub async fn listen_with(
        &self,
        pattern: &str,
        options: ListenOptions,
    ) -> Result<Subscription, Error> {
        let parsed = Pattern::parse(pattern)
            .map_err(|e| Error::new(ErrorKind::InvalidPattern, format!("{pattern:?}: {e}")))?;
        let options = match options.mode {
            // `ack` means nothing for multicatch: normalize it so that two
            // multicatch listens of one pattern never conflict.
            Mode::Multi => ListenOptions::multi(),
            Mode::Any => options,
        };
        let id = self.inner.subs.fetch_add(1, Ordering::Relaxed) + 1;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        // Built before the request so that its Drop undoes the listen if
        // this future is dropped or fails half-way.
        let subscription = Subscription {
            id,
            pattern: pattern.to_owned(),
            options,
            events: events_rx,
            link: self.inner.link.clone(),
        };
        let (reply, answer) = oneshot::channel();
        self.inner
            .link
            .command(Command::Listen {
                sub: id,
                pattern: parsed,
                options,
                events: events_tx,
                reply,
            })
            .await?;
        self.wait(answer, "LSTN").await?;
        Ok(subscription)
    }

    /// Publishes `payload` (any `Serialize` value, sent as JSON) on
    /// `channel`, fire-and-forget. Returns the event's THID.
    ///
    /// The SDK numbers its events and sends their THID itself, so a
    /// delivery's THID is known here and would survive a retry.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidChannel`], [`ErrorKind::Serialize`],
    /// [`ErrorKind::TooLarge`], [`ErrorKind::Disconnected`].
    ///
    /// # Cancel safety
    /// If the future is dropped before it completes, the event may or may
    /// not have been sent.
    pub async fn publish(&self, channel: &str, payload: impl Serialize) -> Result<Thid, Error> {
        let (id, frames) = self.event_frames(channel, Body::Json(to_json(&payload)?), None)?;
        self.inner
            .link
            .command(Command::Send {
                frames,
                confirm: None,
            })
            .await?;
        Ok(id)
    }

    /// Publishes raw bytes on `channel` (sent as a binary frame, no
    /// base64), fire-and-forget. Returns the event's THID.
    ///
    /// # Errors
    /// As [`Client::publish`].
    pub async fn publish_bytes(
        &self,
        channel: &str,
        bytes: impl Into<Vec<u8>>,
    ) -> Result<Thid, Error> {
        let (id, frames) = self.event_frames(channel, Body::Binary(bytes.into()), None)?;
        self.inner
            .link
            .command(Command::Send {
                frames,
                confirm: None,
            })
            .await?;
        Ok(id)
    }

    /// Publishes `payload` on `channel` and waits for the transmitter to
    /// say where it went.
    ///
    /// # Errors
    /// [`ErrorKind::NoListeners`] when no cell listens to `channel`; else
    /// as [`Client::publish`], plus [`ErrorKind::TimedOut`].
    pub async fn publish_confirmed(
        &self,
        channel: &str,
        payload: impl Serialize,
    ) -> Result<Confirm, Error> {
        self.confirmed(channel, Body::Json(to_json(&payload)?))
            .await
    }

    /// Publishes raw bytes on `channel` and waits for the transmitter to
    /// say where they went.
    ///
    /// # Errors
    /// As [`Client::publish_confirmed`].
    pub async fn publish_bytes_confirmed(
        &self,
        channel: &str,
        bytes: impl Into<Vec<u8>>,
    ) -> Result<Confirm, Error> {
        self.confirmed(channel, Body::Binary(bytes.into())).await
    }

    /// Sends the acks waiting in the current batch and makes a PING/PONG
    /// round trip: when it returns, the transmitter has processed every
    /// command this client sent before.
    ///
    /// # Errors
    /// [`ErrorKind::TimedOut`], [`ErrorKind::Disconnected`].
    pub async fn flush(&self) -> Result<(), Error> {
        let reference = self.inner.link.next_ref();
        let (reply, answer) = oneshot::channel();
        self.inner
            .link
            .command(Command::Flush { reference, reply })
            .await?;
        self.wait(answer, "PING").await
    }

    /// Closes the connection for every clone of this client: sends the
    /// pending acks and GBYE, closes the sockets and stops the background
    /// thread. Every [`Subscription`] ends; further calls fail with
    /// [`ErrorKind::Disconnected`]. Events still being handled are
    /// redelivered elsewhere by the transmitter. Calling it twice is
    /// harmless.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .inner
            .link
            .control(Control::Close { reply: Some(reply) })
        {
            // An error only means the thread is already gone.
            let _ = done.await;
        }
    }

    async fn confirmed(&self, channel: &str, body: Body) -> Result<Confirm, Error> {
        let reference = self.inner.link.next_ref();
        let (id, frames) = self.event_frames(channel, body, Some(reference))?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .link
            .command(Command::Send {
                frames,
                confirm: Some(PendingConfirm {
                    reference,
                    id,
                    reply,
                }),
            })
            .await?;
        self.wait(answer, "EVNT confirm").await
    }

    /// Numbers an event, computes its THID and builds its frames.
    fn event_frames(
        &self,
        channel: &str,
        body: Body,
        confirm: Option<u64>,
    ) -> Result<(Thid, Vec<Vec<u8>>), Error> {
        validate_channel(channel)
            .map_err(|e| Error::new(ErrorKind::InvalidChannel, format!("{channel:?}: {e}")))?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (hashed, json) = match &body {
            Body::Json(raw) => (raw.as_slice(), Some(raw.as_slice())),
            Body::Binary(bytes) => (bytes.as_slice(), None),
        };
        let id = Thid::for_event(&self.inner.id, seq, channel, hashed);
        let first = wire::publish(channel, json, &id, seq, confirm);
        let mut frames = vec![first];
        if let Body::Binary(bytes) = body {
            frames.push(bytes);
        }
        let size: usize = frames.iter().map(Vec::len).sum();
        let max = self.inner.limits.max_frame;
        if size > max {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("an event of {size} bytes exceeds the transmitter's limit of {max}"),
            ));
        }
        Ok((id, frames))
    }

    /// Waits for a request's answer within the request timeout.
    async fn wait<T>(
        &self,
        answer: oneshot::Receiver<Result<T, Error>>,
        what: &str,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.inner.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::disconnected()),
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "no answer to {what} within {} ms",
                    self.inner.request_timeout.as_millis()
                ),
            )),
        }
    }
}

/// An event's payload.
enum Body {
    /// Raw JSON text.
    Json(Vec<u8>),
    /// Bytes for the binary frame.
    Binary(Vec<u8>),
}

fn to_json(payload: &impl Serialize) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(payload)
        .map_err(|e| Error::new(ErrorKind::Serialize, e.to_string()).with_source(e))
}
