//! A short-lived cell: one blocking libzmq DEALER on a transmitter's command
//! socket, welcomed with `HELO`, asking one command at a time, and saying
//! `GBYE` when dropped.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thynapse_protocol::body::Welcome;
use thynapse_protocol::{frame, limits, Thid, Verb};

use super::exit::Failure;

/// The service every operator command joins as.
pub const SERVICE: &str = "thynapse-cli";

/// The metadata key every operator command's cell carries (`true`), so
/// that discovery can leave the operator's own cells out of its answers.
pub const CLI_KEY: &str = "thynapse.cli";

/// Default of `--timeout-ms`.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// How long closing sockets try to flush queued frames (the `GBYE`).
const LINGER: Duration = Duration::from_millis(500);

/// The PLAIN username of a cell (§13 of PROTOCOL.md; `mesh` is reserved).
const PLAIN_USERNAME: &str = "cell";

/// Where the transmitter is and how to reach it: the flags every operator
/// command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Command endpoint of the transmitter to talk to (any transmitter of
    /// the mesh answers for the whole mesh).
    #[arg(
        long,
        env = "THYNAPSE_COMMAND",
        default_value = limits::DEFAULT_COMMAND_ENDPOINT,
        value_name = "ENDPOINT"
    )]
    pub command: String,
    /// Shared secret of the transmitter (sent as the PLAIN password, with
    /// the username `cell`).
    #[arg(long, env = "THYNAPSE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How long to wait for the connection and for each answer, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_TIMEOUT_MS)]
    pub timeout_ms: u64,
}

impl Connection {
    /// The token, unless it is absent or empty (an empty
    /// `THYNAPSE_TOKEN` means none, as for the transmitter).
    fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }

    /// `--timeout-ms` as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A welcomed cell of the service [`SERVICE`].
pub struct Session {
    /// The DEALER (each socket holds the libzmq context).
    socket: zmq::Socket,
    /// A PAIR receiving the DEALER's connection events, to say why no
    /// connection was made.
    monitor: zmq::Socket,
    /// How to connect, for error messages.
    connection: Connection,
    /// Counter behind the `ref` of each command.
    refs: u64,
}

/// The connection events the monitor reports (see [`Session::diagnose`]).
const WATCHED: [zmq::SocketEvent; 5] = [
    zmq::SocketEvent::CONNECT_RETRIED,
    zmq::SocketEvent::CONNECTED,
    zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL,
    zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL,
    zmq::SocketEvent::HANDSHAKE_FAILED_AUTH,
];

impl Session {
    /// Connects to the transmitter and joins with a random THID; returns
    /// the session and the transmitter's `WLCM`.
    ///
    /// # Errors
    /// [`Failure::Unreachable`] when no connection is made within the
    /// timeout (naming what the socket saw: refused, bad token, ...),
    /// [`Failure::NoAnswer`] when no `WLCM` comes, [`Failure::Refused`]
    /// when the transmitter refuses the `HELO`.
    pub fn open(connection: &Connection) -> Result<(Session, Welcome), Failure> {
        let ctx = zmq::Context::new();
        let socket = new_socket(&ctx, zmq::DEALER, connection)?;
        let setup = |r: zmq::Result<()>| r.map_err(|e| Failure::local("setting up the DEALER", e));
        // Queue only to a connection whose handshake succeeded, so that a
        // send that cannot go anywhere times out instead of waiting forever.
        setup(socket.set_immediate(true))?;
        setup(socket.set_sndtimeo(millis(connection.timeout())))?;
        let events = WATCHED.iter().fold(0, |all, e| all | i32::from(e.to_raw()));
        let endpoint = format!("inproc://thynapse-cli-monitor-{}", std::process::id());
        setup(socket.monitor(&endpoint, events))?;
        let monitor = ctx
            .socket(zmq::PAIR)
            .and_then(|m| m.connect(&endpoint).map(|()| m))
            .map_err(|e| Failure::local("watching the DEALER", e))?;
        socket
            .connect(&connection.command)
            .map_err(|e| Failure::Unreachable {
                endpoint: connection.command.clone(),
                why: format!("not a valid ZeroMQ endpoint ({e})"),
            })?;
        let mut session = Session {
            socket,
            monitor,
            connection: connection.clone(),
            refs: 0,
        };
        let hello = json!({
            "id": Thid::random(),
            "service": SERVICE,
            "metadata": {CLI_KEY: true},
        });
        let welcome = session.request(Verb::HELO, hello)?;
        let welcome = serde_json::from_value(welcome)
            .map_err(|e| Failure::local("reading the transmitter's WLCM", e))?;
        Ok((session, welcome))
    }

    /// The command endpoint this session talks to.
    pub fn endpoint(&self) -> &str {
        &self.connection.command
    }

    /// The timeout for each answer.
    pub fn timeout(&self) -> Duration {
        self.connection.timeout()
    }

    /// Sends `verb` with `body` (a JSON object) plus a fresh `ref`, and
    /// waits for the answer carrying that `ref`; returns its body.
    ///
    /// # Errors
    /// [`Failure::Refused`] on an `ERRR` for it, [`Failure::NoAnswer`]
    /// when nothing comes within the timeout, [`Failure::Left`] when the
    /// transmitter says `GBYE`, [`Failure::Unreachable`] when the command
    /// cannot be sent at all.
    pub fn request(&mut self, verb: Verb, mut body: Value) -> Result<Value, Failure> {
        self.refs += 1;
        let reference = Value::String(format!("cli-{}", self.refs));
        body["ref"] = reference.clone();
        self.send(verb, &body)?;
        let deadline = Instant::now() + self.timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((verb_in, answer)) = self.next_message(left)? else {
                return Err(Failure::NoAnswer {
                    endpoint: self.endpoint().to_owned(),
                    awaited: if verb == Verb::HELO {
                        "WLCM".to_owned()
                    } else {
                        format!("answer to {verb}")
                    },
                    waited: self.timeout(),
                });
            };
            if verb_in == Verb::ERRR && answer["re"] == reference {
                return Err(refusal(&answer));
            }
            if answer.get("ref") == Some(&reference) {
                return Ok(answer);
            }
        }
    }

    /// Sends `verb` with `body` as is.
    ///
    /// # Errors
    /// [`Failure::Unreachable`] when no connection takes it within the
    /// timeout (naming what the socket saw).
    pub fn send(&self, verb: Verb, body: &Value) -> Result<(), Failure> {
        match self.socket.send(frame::encode_json(verb, body), 0) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => Err(Failure::Unreachable {
                endpoint: self.endpoint().to_owned(),
                why: self.diagnose(),
            }),
            Err(e) => Err(Failure::local(&format!("sending {verb}"), e)),
        }
    }

    /// The next message from the transmitter within `timeout`, as verb and
    /// JSON body; frames that do not decode are skipped.
    ///
    /// # Errors
    /// [`Failure::Left`] when it is a `GBYE`; [`Failure::Local`] when
    /// libzmq fails.
    pub fn next_message(&self, timeout: Duration) -> Result<Option<(Verb, Value)>, Failure> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !readable(&self.socket, left)? {
                return Ok(None);
            }
            let parts = self
                .socket
                .recv_multipart(0)
                .map_err(|e| Failure::local("receiving", e))?;
            let Some(decoded) = parts.first().and_then(|f| frame::decode(f).ok()) else {
                continue;
            };
            let Ok(body) = serde_json::from_slice::<Value>(decoded.body) else {
                continue;
            };
            if decoded.verb == Verb::GBYE {
                return Err(Failure::Left {
                    endpoint: self.endpoint().to_owned(),
                    reason: body["reason"].as_str().unwrap_or("no reason").to_owned(),
                });
            }
            return Ok(Some((decoded.verb, body)));
        }
    }

    /// The DEALER, to poll it together with other sockets.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Why no connection took a command, from the monitor's events.
    fn diagnose(&self) -> String {
        let mut seen = Vec::new();
        while let Ok(parts) = self.monitor.recv_multipart(zmq::DONTWAIT) {
            if let Some(raw) = parts.first().and_then(|p| p.first_chunk::<2>()) {
                seen.push(u16::from_ne_bytes(*raw));
            }
        }
        let saw = |e: zmq::SocketEvent| seen.contains(&e.to_raw());
        let waited = self.timeout().as_millis();
        if saw(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH) {
            "the transmitter refused the token (--token / THYNAPSE_TOKEN)".to_owned()
        } else if saw(zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL)
            || saw(zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL)
        {
            if self.connection.token().is_some() {
                "the security handshake failed: does this transmitter use a token?".to_owned()
            } else {
                "the security handshake failed: this transmitter probably wants a token \
                 (--token / THYNAPSE_TOKEN)"
                    .to_owned()
            }
        } else if saw(zmq::SocketEvent::CONNECTED) {
            format!(
                "connected, but the ZeroMQ handshake did not finish within {waited} ms: \
                 is this a transmitter's command endpoint?"
            )
        } else if saw(zmq::SocketEvent::CONNECT_RETRIED) {
            format!(
                "connection refused or host unreachable (retried for {waited} ms): \
                 is a transmitter running there?"
            )
        } else {
            format!("no connection within {waited} ms")
        }
    }
}

impl Drop for Session {
    /// Says `GBYE`, so the transmitter forgets this cell at once; the
    /// socket's linger flushes it.
    fn drop(&mut self) {
        let bye = frame::encode_json(Verb::GBYE, &json!({"reason": "done"}));
        let _ = self.socket.send(bye, zmq::DONTWAIT);
    }
}

/// The `ERRR` body as a [`Failure::Refused`].
fn refusal(errr: &Value) -> Failure {
    let text = |k: &str| errr[k].as_str().unwrap_or("(none)").to_owned();
    Failure::Refused {
        code: text("code"),
        message: text("message"),
    }
}

/// A socket of `kind` with linger and, when there is a token, PLAIN
/// credentials.
fn new_socket(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    connection: &Connection,
) -> Result<zmq::Socket, Failure> {
    let configure = || -> zmq::Result<zmq::Socket> {
        let socket = ctx.socket(kind)?;
        socket.set_linger(millis(LINGER))?;
        if let Some(token) = connection.token() {
            socket.set_plain_username(Some(PLAIN_USERNAME))?;
            socket.set_plain_password(Some(token))?;
        }
        Ok(socket)
    };
    configure().map_err(|e| Failure::local(&format!("creating a {kind:?} socket"), e))
}

/// Whether `socket` has a message within `timeout`. An interrupted wait
/// (a signal) counts as "no message yet".
///
/// # Errors
/// [`Failure::Local`] when libzmq fails otherwise.
pub fn readable(socket: &zmq::Socket, timeout: Duration) -> Result<bool, Failure> {
    match socket.poll(zmq::POLLIN, i64::from(millis(timeout))) {
        Ok(n) => Ok(n > 0),
        Err(zmq::Error::EINTR) => Ok(false),
        Err(e) => Err(Failure::local("waiting for a message", e)),
    }
}

/// A duration in whole milliseconds, as libzmq options want them.
fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}
