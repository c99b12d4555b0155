//! [`SendTo`]: sends to the cells of a service chosen by their metadata
//! (`SEND`).

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;

use serde::Serialize;
use serde_json::Value;
use thynapse_protocol::pattern::validate_channel;

use crate::client::{confirm_of, to_json, Body, Client, Confirm};
use crate::error::{Error, ErrorKind};
use crate::wire::{self, TargetedBody};

/// A targeted send being set up, from [`Client::send_to`]. Send it with
/// [`SendTo::send`] (a JSON payload), or set the payload with
/// [`SendTo::payload`] / [`SendTo::bytes`] and `.await` it.
///
/// The receiving cells listen anycatch to a pattern matching the channel
/// (default `send::<service>`) and get an ordinary event. With acks, a
/// cell that fails it (NACK, no ack in time, gone) has it redelivered to
/// another matching cell, unless it went to all of them ([`SendTo::all`]).
#[must_use = "nothing is sent until the builder is awaited"]
pub struct SendTo {
    /// Sends it.
    client: Client,
    /// The service whose cells are candidates.
    service: String,
    /// Which of them.
    query: Option<Value>,
    /// Every matching cell rather than one.
    all: bool,
    /// The channel the cells see.
    channel: Option<String>,
    /// No match falls back to any cell of the service.
    optional: bool,
    /// No match drops the send instead of failing it.
    droppable: bool,
    /// The same key goes to the same cell.
    key: Option<Value>,
    /// The payload, or why it could not be serialized.
    body: Option<Result<Body, Error>>,
}

impl fmt::Debug for SendTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendTo")
            .field("service", &self.service)
            .field("query", &self.query)
            .field("all", &self.all)
            .field("channel", &self.channel)
            .field("optional", &self.optional)
            .field("droppable", &self.droppable)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl SendTo {
    pub(crate) fn new(client: Client, service: &str) -> SendTo {
        SendTo {
            client,
            service: service.to_owned(),
            query: None,
            all: false,
            channel: None,
            optional: false,
            droppable: false,
            key: None,
            body: None,
        }
    }

    /// Only cells whose metadata matches `query`: a selector string
    /// (`"version>=2.0.0"`) or a JSON query (which may also pick among the
    /// matches, `"selector": {"$min": "/load"}`). Without it every cell of
    /// the service that listens to the channel matches.
    pub fn matching(mut self, query: impl Into<Value>) -> SendTo {
        self.query = Some(query.into());
        self
    }

    /// To every matching cell, rather than one.
    pub fn all(mut self) -> SendTo {
        self.all = true;
        self
    }

    /// The channel the cells receive it on (default `send::<service>`).
    pub fn channel(mut self, channel: impl Into<String>) -> SendTo {
        self.channel = Some(channel.into());
        self
    }

    /// When no cell matches, send to any cell of the service instead.
    pub fn optional(mut self) -> SendTo {
        self.optional = true;
        self
    }

    /// When no cell matches, drop the send (`routed` 0) instead of failing
    /// with [`ErrorKind::NoRoute`].
    pub fn droppable(mut self) -> SendTo {
        self.droppable = true;
        self
    }

    /// Consistent choice: sends with the same key go to the same cell
    /// while the matching cells stay the same.
    pub fn key(mut self, key: impl Into<Value>) -> SendTo {
        self.key = Some(key.into());
        self
    }

    /// Sets a JSON payload (any `Serialize` value).
    pub fn payload(mut self, payload: impl Serialize) -> SendTo {
        self.body = Some(to_json(&payload).map(Body::Json));
        self
    }

    /// Sets a binary payload (a second frame).
    pub fn bytes(mut self, bytes: impl Into<Vec<u8>>) -> SendTo {
        self.body = Some(Ok(Body::Binary(bytes.into())));
        self
    }

    /// Sends `payload` (any `Serialize` value) and returns where it went.
    ///
    /// # Errors
    /// As [`SendTo::confirmed`].
    pub async fn send(self, payload: impl Serialize) -> Result<Confirm, Error> {
        self.payload(payload).confirmed().await
    }

    /// Sends the payload set so far (none, if none was) and waits for the
    /// transmitter to say where it went: the event's THID and how many
    /// cells it went to.
    ///
    /// # Errors
    /// - [`ErrorKind::NoRoute`]: no cell matches (and neither
    ///   [`SendTo::optional`] nor [`SendTo::droppable`]).
    /// - [`ErrorKind::BadQuery`], [`ErrorKind::InvalidChannel`],
    ///   [`ErrorKind::Serialize`], [`ErrorKind::TooLarge`],
    ///   [`ErrorKind::TimedOut`], [`ErrorKind::Disconnected`].
    pub async fn confirmed(self) -> Result<Confirm, Error> {
        if let Some(channel) = &self.channel {
            validate_channel(channel)
                .map_err(|e| Error::new(ErrorKind::InvalidChannel, format!("{channel:?}: {e}")))?;
        }
        let body = self.body.transpose()?;
        let (payload, binary) = body.as_ref().map_or((None, None), Body::parts);
        let reference = self.client.next_ref();
        let command = wire::targeted(&TargetedBody {
            service: &self.service,
            query: self.query.as_ref(),
            all: self.all,
            channel: self.channel.as_deref(),
            payload,
            optional: self.optional,
            droppable: self.droppable,
            key: self.key.as_ref(),
            reference,
        });
        let mut frames = vec![command];
        frames.extend(binary.map(<[u8]>::to_vec));
        let body = self.client.call(reference, frames, None, "SEND").await?;
        confirm_of(&body, None)
    }
}

impl IntoFuture for SendTo {
    type Output = Result<Confirm, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Confirm, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.confirmed())
    }
}
