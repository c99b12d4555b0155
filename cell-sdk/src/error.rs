//! The SDK's error type: one [`Error`] struct whose [`ErrorKind`] says what
//! went wrong, in the async-nats shape.

use std::fmt;

use thynapse_protocol::ErrorCode;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No answer in time: no `WLCM` after `HELO`, no `OKAY` after `LSTN`
    /// or a confirmed `EVNT`, or no reply to a request before its timeout
    /// (`ERRR timed_out`, or the SDK's own deadline a little later).
    TimedOut,
    /// Refused. Either the transmitter answered `ERRR` ([`Error::code`]
    /// holds its code, the message its explanation), or a responder's
    /// handler answered a request with an error (no code; the message is
    /// the handler's, as it wrote it).
    Rejected,
    /// The PLAIN handshake failed: the token is wrong or missing.
    Unauthorized,
    /// A confirmed publish reached no listener (`ERRR no_listeners`).
    NoListeners,
    /// A request found no cell that answers requests on its channel (of
    /// its service and matching its query, when given): `ERRR
    /// no_responders`, sent at once rather than at the timeout.
    NoResponders,
    /// A targeted send found no cell of the service, listening to the
    /// channel, whose metadata matches the query (`ERRR no_route`).
    NoRoute,
    /// A metadata query (`where`) does not parse (`ERRR bad_query`).
    BadQuery,
    /// Metadata the transmitter refuses: a reserved key (`host`,
    /// `transmitter`), a null value, a key too long, nesting too deep, ...
    /// (`ERRR bad_metadata`).
    InvalidMetadata,
    /// The connection is closed: [`Client::close`](crate::Client::close)
    /// was called, every [`Client`](crate::Client) was dropped, or the
    /// transmitter said `GBYE` and there was no failover endpoint.
    Disconnected,
    /// The pattern is not a valid channel pattern (checked locally, or
    /// `ERRR bad_pattern`).
    InvalidPattern,
    /// The channel is not a valid channel name (empty, too long, spaces,
    /// wildcards).
    InvalidChannel,
    /// The pattern is already listened to by this client with another mode
    /// or ack setting; the protocol keeps one mode per pattern and cell.
    Conflict,
    /// The message is larger than the transmitter's `max_frame`; sending
    /// it would make libzmq drop the whole connection.
    TooLarge,
    /// The payload could not be serialized to JSON.
    Serialize,
    /// A received payload does not deserialize into the type asked for.
    Deserialize,
    /// An operating-system I/O error (starting the connection task or
    /// its doorbell).
    Io,
    /// A libzmq error (creating, configuring or connecting a socket).
    Zmq,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::TimedOut => "timed out",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NoListeners => "no listeners",
            ErrorKind::NoResponders => "no responders",
            ErrorKind::NoRoute => "no route",
            ErrorKind::BadQuery => "bad query",
            ErrorKind::InvalidMetadata => "invalid metadata",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::InvalidPattern => "invalid pattern",
            ErrorKind::InvalidChannel => "invalid channel",
            ErrorKind::Conflict => "conflicting listen",
            ErrorKind::TooLarge => "message too large",
            ErrorKind::Serialize => "payload does not serialize",
            ErrorKind::Deserialize => "payload does not deserialize",
            ErrorKind::Io => "I/O error",
            ErrorKind::Zmq => "ZeroMQ error",
        })
    }
}

/// An SDK error: a [`kind`](Error::kind), a message, and for errors the
/// transmitter reported, its `ERRR` [`code`](Error::code).
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    /// What kind of failure.
    kind: ErrorKind,
    /// The `ERRR` code, when the transmitter reported the error.
    code: Option<String>,
    /// A human-readable explanation.
    message: String,
    /// The underlying error, if any.
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` with an explanation.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            code: None,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// An error from an `ERRR` reply: the codes in the table below get
    /// their own kinds, every other code is [`ErrorKind::Rejected`].
    pub(crate) fn from_reply(code: &str, message: &str) -> Error {
        let kind = match code {
            "no_listeners" => ErrorKind::NoListeners,
            "no_responders" => ErrorKind::NoResponders,
            "no_route" => ErrorKind::NoRoute,
            "timed_out" => ErrorKind::TimedOut,
            "bad_query" => ErrorKind::BadQuery,
            "bad_metadata" => ErrorKind::InvalidMetadata,
            "bad_pattern" => ErrorKind::InvalidPattern,
            "too_large" => ErrorKind::TooLarge,
            _ => ErrorKind::Rejected,
        };
        Error {
            kind,
            code: Some(code.to_owned()),
            message: format!("{code}: {message}"),
            source: None,
        }
    }

    /// A responder's handler answered a request with this error message.
    pub(crate) fn handler(message: String) -> Error {
        Error {
            kind: ErrorKind::Rejected,
            code: None,
            message,
            source: None,
        }
    }

    /// A received payload does not fit the type asked for.
    pub(crate) fn deserialize(what: &str, e: serde_json::Error) -> Error {
        Error::new(ErrorKind::Deserialize, format!("{what}: {e}")).with_source(e)
    }

    /// The connection is gone.
    pub(crate) fn disconnected() -> Error {
        Error::new(ErrorKind::Disconnected, "the connection is closed")
    }

    /// A libzmq call failed while doing `what`.
    pub(crate) fn zmq(what: &str, e: zmq::Error) -> Error {
        Error::new(ErrorKind::Zmq, format!("{what}: {e}")).with_source(e)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The transmitter's `ERRR` code (`"no_listeners"`, `"bad_service"`,
    /// ...), when the transmitter reported this error.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The `ERRR` code as the protocol's typed [`ErrorCode`], when it is one
    /// that protocol v1 defines.
    pub fn error_code(&self) -> Option<ErrorCode> {
        let code = self.code.as_deref()?;
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == code)
    }

    /// The human-readable explanation.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<zmq::Error> for Error {
    fn from(e: zmq::Error) -> Error {
        Error::new(ErrorKind::Zmq, e.to_string()).with_source(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, e.to_string()).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_map_their_codes_to_kinds() {
        let e = Error::from_reply("no_listeners", "nobody listens to a::b");
        assert_eq!(e.kind(), ErrorKind::NoListeners);
        assert_eq!(e.code(), Some("no_listeners"));
        assert_eq!(e.error_code(), Some(ErrorCode::NoListeners));
        assert_eq!(
            Error::from_reply("bad_pattern", "x").kind(),
            ErrorKind::InvalidPattern
        );
        let e = Error::from_reply("bad_service", "has a space");
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.to_string(), "rejected: bad_service: has a space");
        for (code, kind) in [
            ("no_responders", ErrorKind::NoResponders),
            ("no_route", ErrorKind::NoRoute),
            ("timed_out", ErrorKind::TimedOut),
            ("bad_query", ErrorKind::BadQuery),
            ("bad_metadata", ErrorKind::InvalidMetadata),
        ] {
            assert_eq!(Error::from_reply(code, "x").kind(), kind, "{code}");
        }
    }

    #[test]
    fn handler_errors_keep_the_handlers_message_and_have_no_code() {
        let e = Error::handler("division by zero".into());
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.code(), None);
        assert_eq!(e.message(), "division by zero");
        assert_eq!(e.to_string(), "rejected: division by zero");
    }

    #[test]
    fn unknown_codes_are_kept_as_text() {
        let e = Error::from_reply("from_the_future", "x");
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.code(), Some("from_the_future"));
        assert_eq!(e.error_code(), None);
    }
}
