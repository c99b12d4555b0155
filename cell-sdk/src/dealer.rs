//! The command connection: a ZMTP 3 DEALER of our own over a non-blocking
//! `mio` socket, read and written by the connection task itself.
//!
//! With libzmq's DEALER every command crossed libzmq's I/O thread on the
//! way out and every answer on the way in: a thread wake-up per message at
//! each end, on top of the task's own. This socket is registered in the
//! runtime's reactor, which the connection task awaits beside its
//! doorbell, so a message is written by the task that produced it and read
//! by the task that handles it.
//!
//! It keeps what the connection relied on in libzmq's DEALER: connecting
//! in the background and again, every [`RECONNECT_IVL`], after a failure
//! or a lost connection; messages sent before the handshake is done wait
//! for it; a bound on what waits ([`OUT_LIMIT`], then the caller queues);
//! NULL and PLAIN; events in place of a socket monitor ([`Happened`]); ZMTP
//! `PING` answered with `PONG`; a frame size limit checked from the frame
//! header.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use thynapse_protocol::zmtp::{self, Mechanism, ZmtpError, GREETING_LEN};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::consts::PLAIN_USERNAME;

/// Wait between two connection attempts (libzmq's default).
pub(crate) const RECONNECT_IVL: Duration = Duration::from_millis(100);
/// Bytes waiting to be written above which `send` refuses (the caller
/// keeps the message and tries again once some are written).
pub(crate) const OUT_LIMIT: usize = 1024 * 1024;
/// Largest frame taken from a transmitter (its own limit on what it sends
/// is the batch size, far below).
const MAX_FRAME: usize = 256 * 1024 * 1024;
/// First read buffer; it doubles while reads fill it, up to [`READ_MAX`].
const READ_FIRST: usize = 4096;
/// Largest read at once.
const READ_MAX: usize = 256 * 1024;

/// What happened to the connection, in place of libzmq's socket monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Happened {
    /// A handshake succeeded: a new connection, a new peer to the
    /// transmitter.
    Connected,
    /// The transmitter refused our PLAIN credentials, with this status.
    Refused(u32),
    /// The handshake failed otherwise (mechanism mismatch, bad bytes, the
    /// connection closed during it).
    HandshakeFailed(String),
    /// The TCP connection could not be made (nothing listens there).
    Unreachable(String),
    /// An established connection was lost.
    Disconnected,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No socket; the next attempt is due at this time.
    Waiting(Instant),
    /// TCP connecting, or waiting for the transmitter's greeting.
    Greeting,
    /// PLAIN: HELLO sent, waiting for WELCOME.
    Welcome,
    /// READY (NULL) or INITIATE (PLAIN) sent, waiting for READY.
    Ready,
    /// Messages flow.
    Open,
}

/// The DEALER.
pub(crate) struct Dealer {
    endpoint: String,
    token: Option<String>,
    mechanism: Mechanism,
    stage: Stage,
    /// The connection, registered in the runtime's reactor.
    stream: Option<AsyncFd<TcpStream>>,
    /// Bytes read: handled up to `pos`, read up to `filled`.
    input: Vec<u8>,
    pos: usize,
    filled: usize,
    /// The socket may hold bytes not read yet (it was ready, or the last
    /// read filled the buffer).
    more: bool,
    /// The last `recv` returned a message: more may be buffered.
    buffered: bool,
    /// The reactor said the peer closed its side: read until the end.
    closing: bool,
    /// Bytes for the connection, written up to `written`.
    output: Vec<u8>,
    written: usize,
    /// Encoded messages sent before the handshake was done.
    waiting: Vec<u8>,
    /// Frames of the message being returned, as ranges of `input`.
    frames: Vec<(usize, usize)>,
    happened: VecDeque<Happened>,
    /// The status of an ERROR that refused our credentials, until the
    /// connection is closed for it.
    refused: Option<u32>,
}

/// `tcp://host:port` as a socket address.
fn resolve(endpoint: &str) -> io::Result<SocketAddr> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{endpoint}: expected tcp://host:port"),
        )
    };
    let (host, port) = zmtp::tcp_host_port(endpoint).ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    (host, port).to_socket_addrs()?.next().ok_or_else(bad)
}

impl Dealer {
    /// A DEALER for `endpoint` that will connect with `token` (PLAIN) or
    /// none (NULL).
    ///
    /// # Errors
    /// When the endpoint is not `tcp://host:port` or does not resolve.
    pub(crate) fn new(endpoint: &str, token: Option<String>) -> io::Result<Dealer> {
        resolve(endpoint)?;
        let mechanism = if token.is_some() {
            Mechanism::Plain
        } else {
            Mechanism::Null
        };
        Ok(Dealer {
            endpoint: endpoint.to_owned(),
            token,
            mechanism,
            stage: Stage::Waiting(Instant::now()),
            stream: None,
            input: Vec::new(),
            pos: 0,
            filled: 0,
            more: false,
            buffered: false,
            closing: false,
            output: Vec::new(),
            written: 0,
            waiting: Vec::new(),
            frames: Vec::new(),
            happened: VecDeque::new(),
            refused: None,
        })
    }

    /// Whether credentials are set.
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Leaves the current endpoint for `endpoint`: the connection closes,
    /// what it had not written is lost, what waits for a handshake stays.
    ///
    /// # Errors
    /// When the endpoint is not `tcp://host:port` or does not resolve.
    pub(crate) fn reconnect_to(&mut self, endpoint: &str) -> io::Result<()> {
        resolve(endpoint)?;
        self.endpoint = endpoint.to_owned();
        self.drop_stream();
        self.stage = Stage::Waiting(Instant::now());
        self.timers(Instant::now());
        Ok(())
    }

    /// When [`Dealer::timers`] has something to do.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.stage {
            Stage::Waiting(at) => Some(at),
            _ => None,
        }
    }

    /// Starts a connection attempt when one is due.
    pub(crate) fn timers(&mut self, now: Instant) {
        let Stage::Waiting(at) = self.stage else {
            return;
        };
        if now < at {
            return;
        }
        match self.open() {
            Ok(()) => self.stage = Stage::Greeting,
            Err(e) => {
                tracing::debug!(endpoint = %self.endpoint, error = %e, "cannot connect; retrying");
                self.stage = Stage::Waiting(now + RECONNECT_IVL);
            }
        }
    }

    /// Starts connecting, the socket registered in the reactor of the
    /// runtime this thread belongs to.
    fn open(&mut self) -> io::Result<()> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("no tokio runtime to watch the socket"));
        }
        let stream = TcpStream::connect(resolve(&self.endpoint)?)?;
        let _ = stream.set_nodelay(true);
        // tokio deprecates this constructor because it cannot know that
        // the descriptor stays open while registered; here the `AsyncFd`
        // owns the socket, so it does.
        #[allow(deprecated)]
        let stream = AsyncFd::with_interest(stream, Interest::READABLE | Interest::WRITABLE)?;
        self.stream = Some(stream);
        (self.pos, self.filled, self.written) = (0, 0, 0);
        self.output.clear();
        self.output
            .extend_from_slice(&zmtp::greeting(self.mechanism, false));
        Ok(())
    }

    fn drop_stream(&mut self) {
        self.stream = None;
        (self.pos, self.filled, self.written) = (0, 0, 0);
        (self.more, self.buffered, self.closing) = (false, false, false);
        self.output.clear();
        self.input = Vec::new();
    }

    /// The connection failed: tells why, and tries again later.
    fn fail(&mut self, why: Happened) {
        tracing::debug!(endpoint = %self.endpoint, ?why, "command connection closed");
        self.drop_stream();
        self.happened.push_back(why);
        self.stage = Stage::Waiting(Instant::now() + RECONNECT_IVL);
    }

    /// The failure of a connection in its current stage.
    fn failure(&mut self, why: &str) -> Happened {
        if let Some(status) = self.refused.take() {
            return Happened::Refused(status);
        }
        match self.stage {
            Stage::Open => Happened::Disconnected,
            Stage::Greeting if self.filled == 0 => Happened::Unreachable(why.to_owned()),
            _ => Happened::HandshakeFailed(why.to_owned()),
        }
    }

    /// What happened since the last call, oldest first.
    pub(crate) fn happened(&mut self) -> Option<Happened> {
        self.happened.pop_front()
    }

    /// Queues one message. Until the handshake is done it waits for it.
    ///
    /// # Errors
    /// `WouldBlock` when [`OUT_LIMIT`] bytes already wait.
    pub(crate) fn send(&mut self, frames: &[Vec<u8>]) -> io::Result<()> {
        let out = self
            .output()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        for (i, f) in frames.iter().enumerate() {
            zmtp::encode_frame(out, f, i + 1 < frames.len());
        }
        Ok(())
    }

    /// Where the next message's ZMTP frames go (written as soon as the
    /// connection is open); `None` while the output queued is at its
    /// limit.
    pub(crate) fn output(&mut self) -> Option<&mut Vec<u8>> {
        let open = self.stage == Stage::Open;
        let out = if open {
            &mut self.output
        } else {
            &mut self.waiting
        };
        let queued = out.len() - if open { self.written } else { 0 };
        (queued < OUT_LIMIT).then_some(out)
    }

    /// Whether output waits to be written.
    pub(crate) fn has_output(&self) -> bool {
        self.written < self.output.len()
    }

    /// Writes what it can without waiting.
    pub(crate) fn flush(&mut self) {
        let Some(stream) = self.stream.as_ref() else {
            return;
        };
        while self.written < self.output.len() {
            match stream.get_ref().write(&self.output[self.written..]) {
                Ok(0) => break,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    break
                }
                Err(e) => {
                    let why = self.failure(&e.to_string());
                    self.fail(why);
                    return;
                }
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
        }
    }

    /// Takes the word that the socket is readable (`closed`: and that
    /// the peer closed its side): the next `recv` reads it.
    pub(crate) fn ready(&mut self, closed: bool) {
        self.more = true;
        self.closing |= closed;
    }

    /// The connection's socket, to await its readiness.
    pub(crate) fn socket(&self) -> Option<&AsyncFd<TcpStream>> {
        self.stream.as_ref()
    }

    /// The connection's descriptor, to wait on it from a blocking thread.
    pub(crate) fn raw_fd(&self) -> Option<RawFd> {
        self.stream.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether a message may be waiting: a socket not read since it was
    /// ready, or bytes read after the last message returned (bytes of an
    /// incomplete frame do not count: they wait for the socket).
    pub(crate) fn readable(&self) -> bool {
        self.more || self.buffered
    }

    /// Reads once; `false` when nothing came.
    fn read(&mut self) -> bool {
        let Some(stream) = self.stream.as_ref() else {
            self.more = false;
            return false;
        };
        if !self.more {
            return false;
        }
        self.filled = zmtp::compact(&mut self.input, self.pos, self.filled);
        self.pos = 0;
        if self.input.len() - self.filled < READ_FIRST {
            let grown = (self.input.len() * 2).clamp(READ_FIRST, READ_MAX);
            self.input.resize(grown.max(self.filled + READ_FIRST), 0);
        }
        match stream.get_ref().read(&mut self.input[self.filled..]) {
            Ok(0) => {
                let why = self.failure("closed by the transmitter");
                self.fail(why);
                false
            }
            Ok(n) => {
                self.filled += n;
                // A short read emptied the socket, unless the peer closed
                // it: the close came with this edge, and brings no other.
                self.more = self.filled == self.input.len() || self.closing;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.more = false;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                let why = self.failure(&e.to_string());
                self.fail(why);
                false
            }
        }
    }

    /// The next message from the transmitter, without waiting: its first
    /// frame and its other frames. Handshake commands and ZMTP `PING`s are
    /// handled on the way.
    pub(crate) fn recv(&mut self) -> Option<(&[u8], Vec<Vec<u8>>)> {
        self.buffered = false;
        loop {
            match self.step() {
                Ok(Some(end)) => {
                    self.pos = end;
                    self.buffered = true;
                    let (first, rest) = self.frames.split_first()?;
                    let input = &self.input[..end];
                    let binaries = rest.iter().map(|&(a, b)| input[a..b].to_vec()).collect();
                    return Some((&input[first.0..first.1], binaries));
                }
                Ok(None) => {
                    if self.stream.is_none() || !self.read() {
                        return None;
                    }
                }
                Err(e) => {
                    let why = self.failure(&e.to_string());
                    self.fail(why);
                    return None;
                }
            }
            // Handshake answers go out at once.
            if self.has_output() {
                self.flush();
            }
        }
    }

    /// Handles what starts at `pos`: the greeting, a command, or a whole
    /// message, whose end it returns.
    fn step(&mut self) -> Result<Option<usize>, ZmtpError> {
        loop {
            let bytes = &self.input[self.pos..self.filled];
            if self.stage == Stage::Greeting {
                zmtp::check_greeting_head(bytes)?;
                let Some(g) = bytes.get(..GREETING_LEN) else {
                    return Ok(None);
                };
                let g = zmtp::parse_greeting(g.try_into().expect("64 bytes"))?;
                if g.mechanism != self.mechanism.name().as_bytes() {
                    return Err(ZmtpError::Mechanism(
                        String::from_utf8_lossy(&g.mechanism).into_owned(),
                        self.mechanism.name(),
                    ));
                }
                self.pos += GREETING_LEN;
                self.begin_handshake();
                continue;
            }
            self.frames.clear();
            let mut at = self.pos;
            loop {
                let Some(h) = zmtp::decode_header(&self.input[at..self.filled], MAX_FRAME)? else {
                    return Ok(None);
                };
                let (start, end) = (at + h.size, at + h.size + h.len);
                if end > self.filled {
                    // Room for the whole frame once `read` moves it to
                    // the front.
                    if end - self.pos > self.input.len() {
                        self.input.resize(end - self.pos, 0);
                    }
                    return Ok(None);
                }
                if h.command {
                    if at != self.pos {
                        return Err(ZmtpError::Unexpected("a command inside a message".into()));
                    }
                    let body = self.input[start..end].to_vec();
                    self.pos = end;
                    self.command(&body)?;
                    break;
                }
                if self.stage != Stage::Open {
                    return Err(ZmtpError::Unexpected(
                        "a message during the handshake".into(),
                    ));
                }
                self.frames.push((start, end));
                at = end;
                if !h.more {
                    return Ok(Some(at));
                }
            }
        }
    }

    /// The greeting came: HELLO (PLAIN) or READY (NULL).
    fn begin_handshake(&mut self) {
        match (&self.token, self.mechanism) {
            (Some(token), Mechanism::Plain) => {
                let hello = zmtp::encode_plain_hello(PLAIN_USERNAME.as_bytes(), token.as_bytes());
                zmtp::encode_command(&mut self.output, "HELLO", &hello);
                self.stage = Stage::Welcome;
            }
            _ => {
                zmtp::encode_command(&mut self.output, "READY", &metadata());
                self.stage = Stage::Ready;
            }
        }
    }

    /// One ZMTP command.
    fn command(&mut self, body: &[u8]) -> Result<(), ZmtpError> {
        // libzmq's PLAIN ERROR has no name length: `^RROR` (see the
        // transmitter's command socket), then the reason.
        let (name, data) = match body.strip_prefix(b"\x5eRROR") {
            Some(data) => (&b"ERROR"[..], data),
            None => zmtp::parse_command(body)?,
        };
        match (self.stage, name) {
            (Stage::Welcome, b"WELCOME") => {
                zmtp::encode_command(&mut self.output, "INITIATE", &metadata());
                self.stage = Stage::Ready;
            }
            (Stage::Ready, b"READY") => {
                self.stage = Stage::Open;
                let waiting = std::mem::take(&mut self.waiting);
                self.output.extend_from_slice(&waiting);
                self.happened.push_back(Happened::Connected);
            }
            (_, b"ERROR") => {
                let reason = data.get(1..).unwrap_or_default();
                let status = std::str::from_utf8(reason)
                    .ok()
                    .filter(|r| r.len() == 3)
                    .and_then(|r| r.parse::<u32>().ok())
                    .filter(|s| (300..600).contains(s));
                if self.stage != Stage::Open {
                    self.refused = status;
                }
                return Err(ZmtpError::Unexpected(format!(
                    "ERROR {}",
                    String::from_utf8_lossy(reason)
                )));
            }
            (Stage::Open, b"PING") => {
                let context = zmtp::ping_context(data).to_vec();
                zmtp::encode_command(&mut self.output, "PONG", &context);
            }
            (Stage::Open, _) => {}
            (_, other) => {
                return Err(ZmtpError::Unexpected(
                    String::from_utf8_lossy(other).into_owned(),
                ))
            }
        }
        Ok(())
    }

    /// Closes the socket (deregistering it).
    pub(crate) fn close(&mut self) {
        self.drop_stream();
    }
}

/// Our READY / INITIATE metadata: we are a DEALER.
fn metadata() -> Vec<u8> {
    zmtp::encode_properties(&[("Socket-Type", b"DEALER")])
}
