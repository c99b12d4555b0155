//! The requester's side of request/reply: [`RequestBuilder`] and
//! [`Reply`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::Value;
use thynapse_protocol::pattern::validate_channel;
use thynapse_protocol::Thid;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{Body, Client};
use crate::consts::{DEFAULT_REPLY_TIMEOUT, REPLY_TIMEOUT_GRACE};
use crate::error::{Error, ErrorKind};
use crate::event::{payload_accessors, Frame};
use crate::wire::{self, RequestBody};

/// A successful reply to a request: the responder's result.
///
/// A responder that answered with an error is not a `Reply`: the request
/// fails with [`ErrorKind::Rejected`] and the handler's message.
pub struct Reply {
    /// The request's THID.
    pub(crate) id: Thid,
    /// The JSON result, as the responder wrote it.
    pub(crate) payload: Option<Box<RawValue>>,
    /// The binary result frame, if the responder sent one.
    pub(crate) binary: Option<Frame>,
}

impl Reply {
    /// The THID the transmitter gave the request (the attempt that was
    /// answered, when the request was retried).
    pub fn id(&self) -> Thid {
        self.id
    }

    payload_accessors!("reply", payload; binary);
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("id", &self.id)
            .field("payload", &self.payload_raw())
            .field("binary", &self.binary.as_deref().map(<[u8]>::len))
            .finish()
    }
}

/// When to send a request again: see [`RequestBuilder::retry`].
#[derive(Debug, Clone, Copy)]
struct Retry {
    /// Send again after this long without a reply.
    interval: Duration,
    /// Give up this long after the first attempt.
    give_up: Duration,
}

/// A request being set up, from [`Client::request`]: `.await` it (or call
/// [`RequestBuilder::send`]) to send it and wait for the [`Reply`].
#[must_use = "a request is sent only when awaited"]
pub struct RequestBuilder {
    /// Sends it.
    client: Client,
    /// The channel responders listen to.
    channel: String,
    /// The payload.
    body: Body,
    /// Why the payload could not be serialized, if it could not.
    invalid: Option<Error>,
    /// Only cells of this service answer.
    service: Option<String>,
    /// Only cells whose metadata matches answer.
    query: Option<Value>,
    /// How long to wait for the reply, without a retry policy.
    timeout: Duration,
    /// The retry policy, if any.
    retry: Option<Retry>,
}

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("channel", &self.channel)
            .field("service", &self.service)
            .field("query", &self.query)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl RequestBuilder {
    pub(crate) fn new(client: Client, channel: &str, body: Result<Body, Error>) -> RequestBuilder {
        let (body, invalid) = match body {
            Ok(body) => (body, None),
            Err(e) => (Body::Binary(Vec::new()), Some(e)),
        };
        RequestBuilder {
            client,
            channel: channel.to_owned(),
            body,
            invalid,
            service: None,
            query: None,
            timeout: DEFAULT_REPLY_TIMEOUT,
            retry: None,
        }
    }

    /// How long to wait for the reply (default 5 s). It is sent as the
    /// request's `timeout_ms`: the transmitter answers `timed_out` then,
    /// and frees the responder's slot. The SDK gives up on its own a
    /// little later ([`REPLY_TIMEOUT_GRACE`]) if nothing comes.
    pub fn timeout(mut self, timeout: Duration) -> RequestBuilder {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Only cells of `service` answer (by default any service whose cells
    /// serve the channel).
    pub fn service(mut self, service: impl Into<String>) -> RequestBuilder {
        self.service = Some(service.into());
        self
    }

    /// Only cells whose metadata matches `query` answer: a selector string
    /// (`"version>=2.0.0,region=eu"`) or a JSON query
    /// (`json!({"ops": [...]})`); see the protocol crate's `query` module.
    pub fn matching(mut self, query: impl Into<Value>) -> RequestBuilder {
        self.query = Some(query.into());
        self
    }

    /// The same as [`RequestBuilder::matching`] (the wire name is `where`).
    pub fn where_(self, query: impl Into<Value>) -> RequestBuilder {
        self.matching(query)
    }

    /// Sends the request again (a new `RQST` with the same payload, which
    /// may reach another responder) whenever `interval` passes without a
    /// reply, until `give_up` after the first attempt; the first reply of
    /// any attempt wins. Every attempt stays open until `give_up` (its
    /// `timeout_ms`), which replaces [`RequestBuilder::timeout`].
    /// `no_responders` and `timed_out` answers to single attempts are then
    /// not final: the request fails with the last of them at `give_up`.
    ///
    /// Handlers may therefore run more than once for one request: retry
    /// only requests that are safe to repeat.
    pub fn retry(mut self, interval: Duration, give_up: Duration) -> RequestBuilder {
        self.retry = Some(Retry {
            interval: interval.max(Duration::from_millis(1)),
            give_up: give_up.max(Duration::from_millis(1)),
        });
        self
    }

    /// Sends the request and waits for the first reply.
    ///
    /// # Errors
    /// - [`ErrorKind::NoResponders`]: no cell serves the channel (of the
    ///   service, matching the query); reported at once.
    /// - [`ErrorKind::TimedOut`]: no reply before the timeout.
    /// - [`ErrorKind::Rejected`]: the handler answered with an error
    ///   ([`Error::message`] is its message), or the transmitter refused
    ///   the request ([`Error::code`] says why).
    /// - [`ErrorKind::BadQuery`], [`ErrorKind::InvalidChannel`],
    ///   [`ErrorKind::Serialize`], [`ErrorKind::TooLarge`],
    ///   [`ErrorKind::Disconnected`].
    ///
    /// # Cancel safety
    /// Dropping the future abandons the request: a reply that comes later
    /// is dropped, and a handler may still run.
    pub async fn send(mut self) -> Result<Reply, Error> {
        if let Some(e) = self.invalid.take() {
            return Err(e);
        }
        validate_channel(&self.channel).map_err(|e| {
            Error::new(
                ErrorKind::InvalidChannel,
                format!("{:?}: {e}", self.channel),
            )
        })?;
        let started = Instant::now();
        let deadline = started + self.retry.map_or(self.timeout, |r| r.give_up);
        let give_up_locally = deadline + REPLY_TIMEOUT_GRACE;
        let (replies, mut answers) = mpsc::unbounded_channel();
        self.attempt(deadline, &replies).await?;
        let mut outstanding = 1u32;
        let mut next_retry = self.retry.map(|r| started + r.interval);
        let mut last_error = None;
        loop {
            let retry_at = next_retry.filter(|t| *t < deadline);
            tokio::select! {
                answer = answers.recv() => {
                    // `replies` lives here, so the channel never closes.
                    let Some(answer) = answer else { return Err(Error::disconnected()) };
                    match answer {
                        Ok(reply) => return Ok(reply),
                        Err(e) if self.retry.is_some()
                            && matches!(e.kind(), ErrorKind::NoResponders | ErrorKind::TimedOut) =>
                        {
                            outstanding = outstanding.saturating_sub(1);
                            if outstanding == 0 && retry_at.is_none() {
                                return Err(e);
                            }
                            last_error = Some(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or(give_up_locally)), if retry_at.is_some() => {
                    self.attempt(deadline, &replies).await?;
                    outstanding += 1;
                    next_retry = self.retry.map(|r| Instant::now() + r.interval);
                }
                () = tokio::time::sleep_until(give_up_locally) => {
                    return Err(last_error.unwrap_or_else(|| Error::new(
                        ErrorKind::TimedOut,
                        format!(
                            "no reply to the request on {} within {} ms (nor a timed_out from the transmitter)",
                            self.channel,
                            (deadline - started).as_millis()
                        ),
                    )));
                }
            }
        }
    }

    /// Sends one `RQST`, open until `deadline`.
    async fn attempt(
        &self,
        deadline: Instant,
        replies: &mpsc::UnboundedSender<Result<Reply, Error>>,
    ) -> Result<(), Error> {
        let reference = self.client.next_ref();
        let left = deadline.saturating_duration_since(Instant::now());
        let (payload, binary) = self.body.parts();
        let command = wire::request(&RequestBody {
            channel: &self.channel,
            service: self.service.as_deref(),
            query: self.query.as_ref(),
            payload,
            timeout_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1),
            reference,
        });
        let mut frames = vec![command];
        frames.extend(binary.map(<[u8]>::to_vec));
        self.client
            .send_request(reference, frames, replies.clone())
            .await
    }
}

impl IntoFuture for RequestBuilder {
    type Output = Result<Reply, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
