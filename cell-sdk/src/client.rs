//! [`Client`]: the cheap, cloneable handle to one connection.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use thynapse_protocol::body::Limits;
use thynapse_protocol::pattern::validate_channel;
use thynapse_protocol::thid::EventHasher;
use thynapse_protocol::{Mode, Pattern, Thid};
use tokio::sync::{mpsc, oneshot};

use crate::batch::Publish;
use crate::conn::{self, Start};
use crate::consts::COMMAND_QUEUE_CAPACITY;
use crate::discovery::Discover;
use crate::error::{Error, ErrorKind};
use crate::link::{Answer, Command, Control, Link, Sink};
use crate::membership::MembershipStream;
use crate::options::{ListenOptions, Options};
use crate::request::RequestBuilder;
use crate::serve::{Request, ServeBuilder};
use crate::subscription::Subscription;
use crate::targeted::SendTo;
use crate::wire::{self, ConfirmBody};

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
/// connection task, which owns the ZeroMQ sockets. The connection closes
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
    /// To the connection task.
    link: Arc<Link>,
    /// This cell's THID.
    id: Thid,
    /// The THIDs of the events this cell publishes.
    event_ids: EventHasher,
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
    /// random cell THID, says HELO and waits for WLCM. Only the command
    /// socket is connected; the event socket is connected by the first
    /// [`Client::membership`] stream. The failover endpoints of `options`
    /// are for later, if this transmitter goes away: the first join is to
    /// `endpoint` only.
    ///
    /// # Errors
    /// - [`ErrorKind::TimedOut`]: no WLCM within the connect timeout (no
    ///   transmitter there, or it is unreachable).
    /// - [`ErrorKind::Unauthorized`]: the transmitter refused the token.
    /// - [`ErrorKind::Rejected`]: the transmitter answered ERRR (e.g.
    ///   `bad_service`); see [`Error::code`].
    /// - [`ErrorKind::Zmq`] / [`ErrorKind::Io`]: the endpoint is malformed,
    ///   or the sockets could not be created.
    ///
    /// # Cancel safety
    /// Dropping the future stops the connection attempt; a cell welcomed in
    /// the meantime says GBYE.
    pub async fn connect(endpoint: &str, options: Options) -> Result<Client, Error> {
        let id = Thid::random();
        let service = options.service.clone();
        let request_timeout = options.request_timeout;
        let heartbeat_override = options.heartbeat;
        let (link, rx) = Link::new(COMMAND_QUEUE_CAPACITY);
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
                event_ids: EventHasher::new(&id),
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
    /// Returns once the transmitter has answered the `LSTN` (in either
    /// mode), so no event published after this returns is missed.
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
        self.add_listen(pattern, options, |id, options, link| {
            let (events_tx, events_rx) = mpsc::unbounded_channel();
            let subscription = Subscription {
                id,
                pattern: pattern.to_owned(),
                options,
                events: events_rx,
                ready: Vec::new().into_iter(),
                link,
            };
            (Sink::Events(events_tx), subscription)
        })
        .await
    }

    /// Listens to `pattern` with deliveries going to the sink `make`
    /// returns beside the handle; the handle is built before the `LSTN` so
    /// that its `Drop` undoes the listen if this future is dropped or fails
    /// half-way.
    pub(crate) async fn add_listen<T>(
        &self,
        pattern: &str,
        options: ListenOptions,
        make: impl FnOnce(u64, ListenOptions, Arc<Link>) -> (Sink, T),
    ) -> Result<T, Error> {
        let parsed = Pattern::parse(pattern)
            .map_err(|e| Error::new(ErrorKind::InvalidPattern, format!("{pattern:?}: {e}")))?;
        let options = match options.mode {
            // `ack` means nothing for multicatch: normalize it so that two
            // multicatch listens of one pattern never conflict.
            Mode::Multi => ListenOptions::multi(),
            Mode::Any => options,
        };
        let id = self.next_sub();
        let (sink, handle) = make(id, options, self.inner.link.clone());
        let (reply, answer) = oneshot::channel();
        self.inner
            .link
            .command(Command::Listen {
                sub: id,
                pattern: parsed,
                options,
                sink,
                reply,
            })
            .await?;
        self.wait(answer, "LSTN").await?;
        Ok(handle)
    }

    /// A fresh id for a subscription, responder or membership stream.
    pub(crate) fn next_sub(&self) -> u64 {
        self.inner.subs.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends a request on `channel` with a JSON `payload` (any `Serialize`
    /// value) to one cell that serves it ([`Client::serve`], or any cell
    /// listening anycatch to a matching pattern), and waits for its
    /// reply. The returned builder sets a timeout (default 5 s), a retry
    /// policy, the responders' service and a metadata query; `.await` it.
    ///
    /// ```no_run
    /// # async fn run(client: thynapse_cell::Client) -> Result<(), thynapse_cell::Error> {
    /// use std::time::Duration;
    /// let reply = client
    ///     .request("calc::add", serde_json::json!({"a": 1, "b": 2}))
    ///     .timeout(Duration::from_secs(1))
    ///     .matching("version>=2.0.0")
    ///     .await?;
    /// let sum: serde_json::Value = reply.payload().expect("JSON");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// See [`RequestBuilder::send`].
    pub fn request(&self, channel: &str, payload: impl Serialize) -> RequestBuilder {
        RequestBuilder::new(self.clone(), channel, to_json(&payload).map(Body::Json))
    }

    /// Sends a request whose payload is raw bytes (a binary frame).
    /// As [`Client::request`].
    pub fn request_bytes(&self, channel: &str, bytes: impl Into<Vec<u8>>) -> RequestBuilder {
        RequestBuilder::new(self.clone(), channel, Ok(Body::Binary(bytes.into())))
    }

    /// A typed request: sends `request` as JSON and reads the reply into
    /// `Resp`, with the default timeout.
    ///
    /// # Errors
    /// As [`RequestBuilder::send`], plus [`ErrorKind::Deserialize`] when
    /// the reply does not fit `Resp`.
    pub async fn request_json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        channel: &str,
        request: &Req,
    ) -> Result<Resp, Error> {
        let reply = self.request(channel, request).await?;
        reply
            .payload()
            .map_err(|e| Error::deserialize(&format!("the reply to {channel}"), e))
    }

    /// Answers the requests sent on channels matching `pattern` by calling
    /// `handler` for each, at most [`DEFAULT_SERVE_CONCURRENCY`](crate::consts::DEFAULT_SERVE_CONCURRENCY)
    /// at once (set with [`ServeBuilder::concurrency`]). The handler's
    /// `Ok` value is the reply's payload (serialized as JSON); its `Err`
    /// goes back as the reply's error, which the requester sees as
    /// [`ErrorKind::Rejected`] with that message; so does a handler that
    /// panics ("the handler failed: it panicked: …"), and the responder
    /// goes on. `.await` the builder to
    /// start serving; the [`Responder`](crate::Responder) it returns stops
    /// serving when stopped or dropped.
    ///
    /// The handler's future is first polled on the connection's own task,
    /// as the request is read: one that answers without waiting replies
    /// at once, and the replies to requests read together leave together.
    /// Whatever has to wait goes on as a task of its own. So a handler must
    /// not block the thread (the async rule anyway): long computation goes
    /// to [`tokio::task::spawn_blocking`], or the connection's heartbeats
    /// and other traffic wait for it.
    ///
    /// ```no_run
    /// # async fn run(client: thynapse_cell::Client) -> Result<(), thynapse_cell::Error> {
    /// let responder = client
    ///     .serve("calc::add", |request: thynapse_cell::Request| async move {
    ///         let [a, b]: [i64; 2] = request.payload().map_err(|e| e.to_string())?;
    ///         a.checked_add(b).ok_or_else(|| "overflow".to_owned())
    ///     })
    ///     .concurrency(10)
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn serve<F, Fut, T, E>(&self, pattern: &str, handler: F) -> ServeBuilder<F>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display + 'static,
    {
        ServeBuilder::new(self.clone(), pattern, handler)
    }

    /// Changes this cell's metadata: merges `metadata` into it, or with
    /// `replace` replaces it. Returns the metadata now in effect, with the
    /// keys only the transmitter sets (`host`, `transmitter`). Targeted
    /// sends, requests with a query and discovery see the change at once;
    /// the cell keeps it when it joins again (re-welcome, failover).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidMetadata`] (a reserved key, a null value, a key
    /// too long, ...), [`ErrorKind::TimedOut`], [`ErrorKind::Disconnected`].
    pub async fn update_metadata(
        &self,
        metadata: Map<String, Value>,
        replace: bool,
    ) -> Result<Map<String, Value>, Error> {
        #[derive(serde::Deserialize)]
        struct Effective {
            metadata: Map<String, Value>,
        }
        let reference = self.inner.link.next_ref();
        let frames = vec![wire::metadata(&metadata, replace, reference)];
        let body = self
            .call(reference, frames, Some((metadata, replace)), "META")
            .await?;
        let effective: Effective =
            serde_json::from_slice(&body).map_err(|e| Error::deserialize("the OKAY to META", e))?;
        Ok(effective.metadata)
    }

    /// A send to one cell (or every cell) of `service` whose metadata
    /// matches a query: set it up with the [`SendTo`] builder, then
    /// `.send(payload).await`. The cells receive it as an ordinary
    /// anycatch event, on a pattern matching the channel (default
    /// `send::<service>`).
    ///
    /// ```no_run
    /// # async fn run(client: thynapse_cell::Client) -> Result<(), thynapse_cell::Error> {
    /// let confirm = client
    ///     .send_to("workers")
    ///     .matching("version>=2.0.0,region=eu")
    ///     .send(serde_json::json!({"job": 7}))
    ///     .await?;
    /// assert_eq!(confirm.routed, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn send_to(&self, service: &str) -> SendTo {
        SendTo::new(self.clone(), service)
    }

    /// Asks the transmitter about the mesh: `what` is `services`,
    /// `instances`, `hosts`, `regions`, `versions` or `topology`. Narrow it
    /// with [`Discover::service`] and [`Discover::matching`], then `.await`
    /// the JSON answer.
    pub fn discover(&self, what: &str) -> Discover {
        Discover::new(self.clone(), what)
    }

    /// A stream of membership events (cells joining, leaving, changing
    /// metadata) anywhere in the mesh, for services whose name starts with
    /// `service_prefix` (every service with `None`). Returns once the
    /// subscription is in place: every change after that is seen.
    ///
    /// # Errors
    /// [`ErrorKind::TimedOut`], [`ErrorKind::Disconnected`],
    /// [`ErrorKind::Zmq`].
    pub async fn membership(
        &self,
        service_prefix: Option<&str>,
    ) -> Result<MembershipStream, Error> {
        let id = self.next_sub();
        let (tx, rx) = mpsc::unbounded_channel();
        // Built first so that its Drop unsubscribes if this future is dropped.
        let stream = MembershipStream::new(id, rx, self.inner.link.clone());
        let (reply, answer) = oneshot::channel();
        self.inner
            .link
            .command(Command::Membership {
                sub: id,
                prefix: service_prefix.unwrap_or_default().to_owned(),
                events: tx,
                reply,
            })
            .await?;
        self.wait(answer, "MEMB subscription").await?;
        Ok(stream)
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
        let (id, event) = self.event_frames(channel, Body::Json(to_json(&payload)?), None)?;
        self.send_event(event).await?;
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
        let (id, event) = self.event_frames(channel, Body::Binary(bytes.into()), None)?;
        self.send_event(event).await?;
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
    /// pending acks and GBYE, closes the sockets and stops the connection
    /// task. Every [`Subscription`] ends; further calls fail with
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
            // An error only means the task is already gone.
            let _ = done.await;
        }
    }

    async fn confirmed(&self, channel: &str, body: Body) -> Result<Confirm, Error> {
        let reference = self.inner.link.next_ref();
        let (id, event) = self.event_frames(channel, body, Some(reference))?;
        let body = self
            .call(reference, event.into_frames(), None, "EVNT confirm")
            .await?;
        confirm_of(&body, Some(id))
    }

    /// Sends an event that expects no answer.
    async fn send_event(&self, event: Publish) -> Result<(), Error> {
        self.inner.link.command(Command::Publish(event)).await
    }

    /// Sends a command carrying `reference` and waits, within the request
    /// timeout, for its `OKAY` body (or its `ERRR` as an error). `metadata`
    /// is the update of a `META`.
    pub(crate) async fn call(
        &self,
        reference: u64,
        frames: Vec<Vec<u8>>,
        metadata: Option<(Map<String, Value>, bool)>,
        what: &str,
    ) -> Result<Vec<u8>, Error> {
        self.check_size(&frames)?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .link
            .command(Command::Send {
                frames,
                answer: Some((reference, Answer::Okay { reply, metadata })),
            })
            .await?;
        self.wait(answer, what).await
    }

    /// Sends one attempt of a request; its `RPLY` or `ERRR` goes to `replies`.
    pub(crate) async fn send_request(
        &self,
        reference: u64,
        frames: Vec<Vec<u8>>,
        replies: mpsc::UnboundedSender<Result<crate::Reply, Error>>,
    ) -> Result<(), Error> {
        self.check_size(&frames)?;
        self.inner
            .link
            .command(Command::Send {
                frames,
                answer: Some((reference, Answer::Reply(replies))),
            })
            .await
    }

    /// A fresh `ref` for a command.
    pub(crate) fn next_ref(&self) -> u64 {
        self.inner.link.next_ref()
    }

    /// Refuses a message larger than the transmitter's `max_frame`:
    /// sending it would make the transmitter drop the whole connection.
    pub(crate) fn check_size(&self, frames: &[Vec<u8>]) -> Result<(), Error> {
        self.check_len(frames.iter().map(Vec::len).sum())
    }

    /// As [`Client::check_size`], for a message of `size` bytes.
    fn check_len(&self, size: usize) -> Result<(), Error> {
        let max = self.inner.limits.max_frame;
        if size > max {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("a message of {size} bytes exceeds the transmitter's limit of {max}"),
            ));
        }
        Ok(())
    }

    /// Numbers an event, computes its THID and builds its frames.
    fn event_frames(
        &self,
        channel: &str,
        body: Body,
        confirm: Option<u64>,
    ) -> Result<(Thid, Publish), Error> {
        check_channel(channel)?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (json, binary) = body.parts();
        let hashed = binary.unwrap_or_else(|| json.map_or(&[], |raw| raw.get().as_bytes()));
        let id = self.inner.event_ids.thid(seq, channel, hashed);
        let first = wire::publish(
            channel,
            json.map(|raw| raw.get().as_bytes()),
            &id,
            seq,
            confirm,
        );
        let event = body.event(first);
        self.check_len(event.size())?;
        Ok((id, event))
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

/// The payload of an event, request or targeted send.
#[derive(Debug)]
pub(crate) enum Body {
    /// JSON, serialized once.
    Json(Box<RawValue>),
    /// Bytes for the binary frame.
    Binary(Vec<u8>),
}

impl Body {
    /// The JSON payload for the command frame, and the bytes for the
    /// binary frame.
    pub(crate) fn parts(&self) -> (Option<&RawValue>, Option<&[u8]>) {
        match self {
            Body::Json(raw) => (Some(raw), None),
            Body::Binary(bytes) => (None, Some(bytes)),
        }
    }

    /// The event whose command frame is `command`, and whose binary frame
    /// is the bytes, if any.
    pub(crate) fn event(self, command: Vec<u8>) -> Publish {
        Publish {
            command,
            binary: match self {
                Body::Json(_) => None,
                Body::Binary(bytes) => Some(bytes),
            },
        }
    }
}

thread_local! {
    /// The channel this thread last found valid: publishers mostly publish
    /// on one channel, and validity depends on the name alone.
    static LAST_VALID_CHANNEL: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Checks that `channel` is a valid channel (no wildcards, PROTOCOL.md
/// §10), skipping the check when it is the one this thread last found
/// valid.
fn check_channel(channel: &str) -> Result<(), Error> {
    LAST_VALID_CHANNEL.with_borrow_mut(|last| {
        if last.as_str() == channel && !channel.is_empty() {
            return Ok(());
        }
        validate_channel(channel)
            .map_err(|e| Error::new(ErrorKind::InvalidChannel, format!("{channel:?}: {e}")))?;
        last.clear();
        last.push_str(channel);
        Ok(())
    })
}

/// Serializes a payload once, as JSON text.
pub(crate) fn to_json(payload: &impl Serialize) -> Result<Box<RawValue>, Error> {
    serde_json::value::to_raw_value(payload)
        .map_err(|e| Error::new(ErrorKind::Serialize, e.to_string()).with_source(e))
}

/// The [`Confirm`] in an `OKAY` body; `ours` is the THID to use when it
/// names none.
pub(crate) fn confirm_of(body: &[u8], ours: Option<Thid>) -> Result<Confirm, Error> {
    let c: ConfirmBody =
        serde_json::from_slice(body).map_err(|e| Error::deserialize("the OKAY", e))?;
    let id =
        c.id.or(ours)
            .ok_or_else(|| Error::new(ErrorKind::Deserialize, "the OKAY names no THID"))?;
    Ok(Confirm {
        id,
        routed: c.routed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_check_remembers_only_valid_channels() {
        assert_eq!(
            check_channel("").unwrap_err().kind(),
            ErrorKind::InvalidChannel
        );
        check_channel("a::b").unwrap();
        check_channel("a::b").unwrap();
        for bad in ["a::*", "a::b*", ""] {
            assert_eq!(
                check_channel(bad).unwrap_err().kind(),
                ErrorKind::InvalidChannel
            );
        }
        check_channel("a::c").unwrap();
        assert!(check_channel("a::?").is_err());
    }
}
