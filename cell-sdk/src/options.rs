//! How a client joins ([`Options`]) and how it listens ([`ListenOptions`]).

use std::time::Duration;

use serde_json::{Map, Value};
use thynapse_protocol::Mode;

use crate::consts::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, ENV_ENDPOINT, ENV_SERVICE, ENV_TOKEN,
};

/// How a [`Client`](crate::Client) joins a transmitter.
///
/// ```
/// use thynapse_cell::Options;
///
/// let options = Options::new("billing")
///     .metadata("version", "1.4.0")
///     .metadata("region", "eu")
///     .token("s3cret");
/// assert_eq!(options.service_name(), "billing");
/// ```
#[derive(Clone, PartialEq)]
pub struct Options {
    /// The service this cell is a worker of (`HELO` "service").
    pub(crate) service: String,
    /// Typed metadata sent in `HELO` for routing by metadata.
    pub(crate) metadata: Map<String, Value>,
    /// The shared secret of transmitters that require one: sent as the
    /// PLAIN password on both sockets.
    pub(crate) token: Option<String>,
    /// More command endpoints, to fail over to.
    pub(crate) endpoints: Vec<String>,
    /// Overrides the heartbeat interval the transmitter announces.
    pub(crate) heartbeat: Option<Duration>,
    /// How long to wait for `WLCM`.
    pub(crate) connect_timeout: Duration,
    /// How long to wait for the answer to a request.
    pub(crate) request_timeout: Duration,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never print it.
        f.debug_struct("Options")
            .field("service", &self.service)
            .field("metadata", &self.metadata)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("endpoints", &self.endpoints)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl Options {
    /// Options for a cell of `service`, with no metadata and no token.
    pub fn new(service: impl Into<String>) -> Options {
        Options {
            service: service.into(),
            metadata: Map::new(),
            token: None,
            endpoints: Vec::new(),
            heartbeat: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Options from the environment: `THYNAPSE_SERVICE` (the service;
    /// `"cell"` when unset), `THYNAPSE_TOKEN` (the token, when set and not
    /// empty) and `THYNAPSE_ENDPOINT` (comma-separated command endpoints:
    /// the first is where [`Client::connect_with`](crate::Client::connect_with)
    /// joins, the others are failover endpoints).
    pub fn from_env() -> Options {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut options = Options::new(var(ENV_SERVICE).unwrap_or_else(|| "cell".to_owned()));
        options.token = var(ENV_TOKEN);
        if let Some(list) = var(ENV_ENDPOINT) {
            options.endpoints = list
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect();
        }
        options
    }

    /// Adds one metadata entry (replacing an entry of the same key).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Options {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Replaces all metadata.
    pub fn metadata_map(mut self, metadata: Map<String, Value>) -> Options {
        self.metadata = metadata;
        self
    }

    /// Sets the token of a transmitter that requires one.
    pub fn token(mut self, token: impl Into<String>) -> Options {
        self.token = Some(token.into());
        self
    }

    /// Adds a failover command endpoint. When the transmitter in use says
    /// `GBYE` or answers nothing for 3 heartbeats, the client moves to the
    /// next endpoint (round robin), says `HELO` there with the same THID
    /// and listens again; requests awaiting an answer are sent again.
    /// Without failover endpoints, the client keeps reconnecting to the one
    /// endpoint (every 100 ms), and a `GBYE` closes the client.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Options {
        self.endpoints.push(endpoint.into());
        self
    }

    /// Overrides the heartbeat interval the transmitter announces in
    /// `WLCM`. Pinging more often than the transmitter asks is harmless;
    /// less often gets the cell expired.
    pub fn heartbeat(mut self, interval: Duration) -> Options {
        self.heartbeat = Some(interval);
        self
    }

    /// How long [`Client::connect`](crate::Client::connect) waits for
    /// `WLCM` (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Options {
        self.connect_timeout = timeout;
        self
    }

    /// How long a request waits for its answer (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Options {
        self.request_timeout = timeout;
        self
    }

    /// The service name.
    pub fn service_name(&self) -> &str {
        &self.service
    }

    /// The metadata.
    pub fn metadata_entries(&self) -> &Map<String, Value> {
        &self.metadata
    }

    /// Whether a token is set.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The command endpoints given with [`Options::endpoint`] or
    /// `THYNAPSE_ENDPOINT`.
    pub fn endpoints_list(&self) -> &[String] {
        &self.endpoints
    }
}

/// How to listen to a pattern: see
/// [`Client::listen_with`](crate::Client::listen_with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    /// anycatch ([`Mode::Any`]: one cell per service gets each event) or
    /// multicatch ([`Mode::Multi`]: every listening cell gets it).
    pub mode: Mode,
    /// For anycatch: whether deliveries are acknowledged (at-least-once,
    /// with redelivery) or not (at-most-once, faster). Ignored for
    /// multicatch, which is always at-most-once.
    pub ack: bool,
    /// For anycatch with acks: how many deliveries of this listen the cell
    /// holds unanswered at once (sent as the `LSTN`'s `concurrency`); the
    /// transmitter keeps the others and gives them to whichever cell of
    /// the service is least busy. `None`: the transmitter's default
    /// (1024). The limit is the transmitter's: this SDK hands a
    /// [`Subscription`](crate::Subscription) whatever arrives.
    pub concurrency: Option<u32>,
}

impl ListenOptions {
    /// anycatch with acks.
    pub const fn any() -> ListenOptions {
        ListenOptions {
            mode: Mode::Any,
            ack: true,
            concurrency: None,
        }
    }

    /// anycatch without acks.
    pub const fn any_unacked() -> ListenOptions {
        ListenOptions {
            mode: Mode::Any,
            ack: false,
            concurrency: None,
        }
    }

    /// multicatch.
    pub const fn multi() -> ListenOptions {
        ListenOptions {
            mode: Mode::Multi,
            ack: false,
            concurrency: None,
        }
    }

    /// The same, holding at most `n` deliveries unanswered at once (at
    /// least 1); see [`ListenOptions::concurrency`](ListenOptions#structfield.concurrency).
    pub const fn concurrency(mut self, n: u32) -> ListenOptions {
        self.concurrency = Some(if n == 0 { 1 } else { n });
        self
    }
}

impl From<Mode> for ListenOptions {
    /// `Mode::Any` listens with acks.
    fn from(mode: Mode) -> ListenOptions {
        match mode {
            Mode::Any => ListenOptions::any(),
            Mode::Multi => ListenOptions::multi(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_fill_the_fields() {
        let o = Options::new("svc")
            .metadata("v", 2)
            .token("t")
            .endpoint("tcp://127.0.0.1:1")
            .heartbeat(Duration::from_millis(100));
        assert_eq!(o.service, "svc");
        assert_eq!(o.metadata["v"], 2);
        assert_eq!(o.token.as_deref(), Some("t"));
        assert_eq!(o.endpoints, vec!["tcp://127.0.0.1:1".to_owned()]);
        assert_eq!(o.heartbeat, Some(Duration::from_millis(100)));
    }

    #[test]
    fn options_come_from_the_environment() {
        // The only test of this crate that touches these variables.
        std::env::set_var(ENV_SERVICE, "from-env");
        std::env::set_var(ENV_TOKEN, "tok");
        std::env::set_var(ENV_ENDPOINT, "tcp://127.0.0.1:1, tcp://127.0.0.1:2,");
        let o = Options::from_env();
        assert_eq!(o.service, "from-env");
        assert_eq!(o.token.as_deref(), Some("tok"));
        assert_eq!(o.endpoints, ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]);
        std::env::set_var(ENV_TOKEN, "");
        std::env::remove_var(ENV_SERVICE);
        std::env::remove_var(ENV_ENDPOINT);
        let o = Options::from_env();
        assert_eq!((o.service.as_str(), o.token), ("cell", None));
        assert!(o.endpoints.is_empty());
        std::env::remove_var(ENV_TOKEN);
    }

    #[test]
    fn debug_output_hides_the_token() {
        let o = Options::new("svc").token("hunter2");
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn modes_convert_to_listen_options() {
        assert_eq!(ListenOptions::from(Mode::Any), ListenOptions::any());
        assert!(ListenOptions::from(Mode::Any).ack);
        assert_eq!(ListenOptions::from(Mode::Multi).mode, Mode::Multi);
        assert_eq!(ListenOptions::any().concurrency(3).concurrency, Some(3));
        assert_eq!(ListenOptions::any().concurrency(0).concurrency, Some(1));
    }
}
