//! The command socket: a ZMTP 3 ROUTER that the router thread drives
//! itself.
//!
//! With libzmq's ROUTER every message crossed libzmq's I/O thread on the way
//! in and again on the way out: two thread wake-ups per hop, four per
//! request and reply. This socket reads and writes its TCP connections on
//! the router thread, so a command is read, routed and answered by one
//! thread, and the answers to one connection leave in one `write`.
//!
//! It keeps what the transmitter relied on in libzmq's ROUTER:
//! - routing ids: five bytes from a counter, never one a closed connection
//!   had (the router may still hold that connection's cell until it
//!   expires), so a peer's own `Identity` is not used;
//! - "mandatory" routing: sending to a connection that is gone fails
//!   ([`SendError::Unreachable`]);
//! - a high-water mark per connection, in messages ([`SendError::Full`]);
//! - a maximum frame size, enforced from the frame header before anything
//!   is read, and a short one during the handshake;
//! - the NULL and PLAIN mechanisms, PLAIN checked by [`Gate`] with its
//!   per-address slow-down; a handshake not done in
//!   [`HANDSHAKE_TIMEOUT`] is cut off;
//! - ZMTP 3.1 PING answered with PONG, for peers that enable heartbeats.
//!
//! Peers are any ZMTP 3 DEALER, REQ or ROUTER: libzmq (and so pyzmq), the
//! `zeromq` crate, and other transmitters' node DEALERs.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use thynapse_protocol::zmtp::{self, Mechanism, ZmtpError, GREETING_LEN};

use crate::auth::Gate;
use crate::router::PeerId;

/// The listener's token; connections use their slot's index.
const LISTENER: Token = Token(usize::MAX);
/// The token of the first descriptor watched for the caller
/// ([`CommandSocket::watch`]); the others count down from it.
const WATCHED: usize = usize::MAX - 1;
/// How many descriptors the caller may have watched.
pub const MAX_WATCHED: usize = 8;
/// Most bytes read from one connection before the others get a turn.
const READ_CHUNK: usize = 64 * 1024;
/// A connection's first read buffer; it doubles, up to [`READ_CHUNK`],
/// while reads fill it, so a quiet cell never holds a large one.
const FIRST_READ: usize = 2048;
/// Longest frame accepted before the handshake is done.
const HANDSHAKE_MAX: usize = 4096;
/// How long a connection may take over its handshake (libzmq's default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket types that may talk to a ROUTER.
const PEER_TYPES: [&[u8]; 3] = [b"DEALER", b"REQ", b"ROUTER"];
/// Capacity of a connection's output buffer above which it is given back
/// once all is written, rather than kept for the next messages.
const KEEP_OUTPUT: usize = 64 * 1024;

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No open connection has that routing id.
    Unreachable,
    /// The connection has its high-water mark of messages unwritten.
    Full,
}

/// How the command socket treats its peers.
pub struct Settings {
    /// Largest frame accepted; a larger one cuts the connection.
    pub max_frame: usize,
    /// Most messages queued unwritten per connection.
    pub hwm: usize,
    /// PLAIN credentials required, when set; NULL otherwise.
    pub gate: Option<Gate>,
}

/// Where a connection is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the peer's greeting.
    Greeting,
    /// PLAIN: waiting for HELLO.
    Hello,
    /// PLAIN: waiting for INITIATE.
    Initiate,
    /// NULL: waiting for READY.
    Ready,
    /// Credentials refused: ERROR goes out at this time, then the
    /// connection closes.
    Denied(Instant),
    /// Messages flow.
    Open,
    /// Closing once its output is written.
    Closing,
}

/// One TCP connection.
struct Conn {
    stream: TcpStream,
    stage: Stage,
    opened: Instant,
    /// The peer's IP address (the cell's `host`).
    address: String,
    /// Its routing id, once open.
    peer: PeerId,
    /// Who PLAIN said it is.
    user: Option<&'static str>,
    /// Bytes read: handled up to `pos`, read up to `filled`.
    input: Vec<u8>,
    pos: usize,
    filled: usize,
    /// Bytes from `pos` the incomplete frame there needs.
    need: usize,
    /// The socket may hold more bytes than were read.
    readable: bool,
    /// The last read filled the buffer.
    full: bool,
    /// The poller said the peer closed its side: read until the end.
    closing: bool,
    /// In the ready queue.
    queued: bool,
    /// The peer closed its side.
    eof: bool,
    /// Encoded frames not yet written, from `written` on.
    output: Vec<u8>,
    written: usize,
    /// Stream offset of `output[0]`.
    base: u64,
    /// Stream offsets where unwritten messages end.
    ends: VecDeque<u64>,
    /// In the dirty list.
    dirty: bool,
}

impl Conn {
    /// Messages queued and not yet written.
    fn backlog(&mut self) -> usize {
        let done = self.base + self.written as u64;
        while self.ends.front().is_some_and(|e| *e <= done) {
            self.ends.pop_front();
        }
        self.ends.len()
    }

    /// Writes what it can; `Err` when the connection is broken.
    fn write_out(&mut self) -> io::Result<()> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.written == self.output.len() {
            self.base += self.written as u64;
            self.written = 0;
            if self.output.capacity() > KEEP_OUTPUT {
                self.output = Vec::new();
            } else {
                self.output.clear();
            }
            self.ends.clear();
        }
        Ok(())
    }

    /// Queues a ZMTP command.
    fn command(&mut self, name: &str, data: &[u8]) {
        zmtp::encode_command(&mut self.output, name, data);
    }
}

/// One message received: the sender and its frames.
pub struct Message<'a> {
    /// The sender's routing id.
    pub peer: &'a [u8],
    /// Who PLAIN said the sender is.
    pub user: Option<&'static str>,
    /// The sender's IP address.
    pub address: &'a str,
    /// How many frames the message had, kept or not.
    pub count: usize,
    buf: &'a [u8],
    frames: &'a [(usize, usize)],
}

impl<'a> Message<'a> {
    /// Frame `i` (empty past the frames kept).
    pub fn frame(&self, i: usize) -> &'a [u8] {
        self.frames
            .get(i)
            .map_or(&[][..], |&(start, end)| &self.buf[start..end])
    }
}

/// What one step of reading a connection's bytes found.
enum Step {
    /// A whole message, from the first offset to the second.
    Message(usize, usize),
    /// A handshake step or a command, up to this offset, was handled.
    Handled(usize),
    /// Not enough bytes yet.
    More,
    /// The connection must close.
    Close(ZmtpError),
}

/// The ROUTER command socket.
pub struct CommandSocket {
    poll: Poll,
    events: Events,
    listener: TcpListener,
    settings: Settings,
    mechanism: Mechanism,
    /// The bytes sent to each new connection: our greeting, and for NULL
    /// our READY.
    hello: Vec<u8>,
    /// Connections by slot; a slot's index is its token.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_peer: HashMap<PeerId, usize>,
    next_id: u32,
    /// Connections that may have bytes to handle or read, served a
    /// message at a time in turn (libzmq's fair queueing).
    ready: VecDeque<usize>,
    /// Connections with output to write.
    dirty: Vec<usize>,
    /// Readiness taken from the poller: slot, readable, closed by the
    /// peer, writable.
    touched: Vec<(usize, bool, bool, bool)>,
    /// Frames of the message being returned.
    frames: Vec<(usize, usize)>,
    /// Most frames of one message kept.
    max_frames: usize,
    /// How many descriptors the caller watches.
    watched: usize,
}

/// `tcp://host:port` as a socket address; `*` means every interface or
/// any free port.
fn parse_endpoint(endpoint: &str) -> io::Result<SocketAddr> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "expected tcp://host:port");
    let (host, port) = zmtp::tcp_host_port(endpoint).ok_or_else(bad)?;
    let host = if host == "*" { "0.0.0.0" } else { host };
    let port = if port == "*" { "0" } else { port };
    let port: u16 = port.parse().map_err(|_| bad())?;
    (host, port).to_socket_addrs()?.next().ok_or_else(bad)
}

impl CommandSocket {
    /// Binds `endpoint` (`tcp://host:port`, port 0 or `*` for any).
    ///
    /// # Errors
    /// When the endpoint is not TCP or cannot be bound.
    pub fn bind(
        endpoint: &str,
        settings: Settings,
        max_frames: usize,
    ) -> io::Result<CommandSocket> {
        let addr = parse_endpoint(endpoint)?;
        let mut listener = TcpListener::bind(addr)?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mechanism = if settings.gate.is_some() {
            Mechanism::Plain
        } else {
            Mechanism::Null
        };
        let mut hello = zmtp::greeting(mechanism, mechanism == Mechanism::Plain).to_vec();
        if mechanism == Mechanism::Null {
            zmtp::encode_command(&mut hello, "READY", &ready_metadata());
        }
        Ok(CommandSocket {
            poll,
            events: Events::with_capacity(1024),
            listener,
            settings,
            mechanism,
            hello,
            conns: Vec::new(),
            free: Vec::new(),
            by_peer: HashMap::new(),
            next_id: rand::random(),
            ready: VecDeque::new(),
            dirty: Vec::new(),
            touched: Vec::new(),
            watched: 0,
            frames: Vec::new(),
            max_frames,
        })
    }

    /// The endpoint actually bound, `tcp://ip:port`.
    ///
    /// # Errors
    /// When the operating system cannot say.
    pub fn endpoint(&self) -> io::Result<String> {
        Ok(format!("tcp://{}", self.listener.local_addr()?))
    }

    /// Watches `fd` (a libzmq socket's `ZMQ_FD`, say) for readability
    /// beside the connections, edge-triggered: [`CommandSocket::poll`]
    /// reports its edges by the bit this returns.
    ///
    /// # Errors
    /// When [`MAX_WATCHED`] are watched already, or the poller refuses.
    pub fn watch(&mut self, fd: RawFd) -> io::Result<u32> {
        if self.watched == MAX_WATCHED {
            return Err(io::Error::other("too many watched descriptors"));
        }
        self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(WATCHED - self.watched),
            Interest::READABLE,
        )?;
        self.watched += 1;
        Ok(1 << (self.watched - 1))
    }

    /// Whether bytes already read wait to be handled (then the caller
    /// must not block in its poll).
    pub fn has_input(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Waits at most `timeout` for the socket's readiness and takes it:
    /// accepts connections, notes which can be read, writes to those that
    /// can take more. Returns which watched descriptors had an edge: the
    /// bits [`CommandSocket::watch`] returned for them.
    pub fn poll(&mut self, timeout: Duration) -> u32 {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "command socket poll failed");
            }
            return 0;
        }
        let mut accept = false;
        let mut signalled = 0;
        let mut touched = std::mem::take(&mut self.touched);
        for event in self.events.iter() {
            if event.token() == LISTENER {
                accept = true;
                continue;
            }
            if let Some(n) = WATCHED.checked_sub(event.token().0) {
                if n < self.watched {
                    signalled |= 1 << n;
                    continue;
                }
            }
            let closed = event.is_read_closed() || event.is_error();
            touched.push((
                event.token().0,
                event.is_readable() || closed,
                closed,
                event.is_writable(),
            ));
        }
        for &(slot, readable, closed, writable) in &touched {
            if readable {
                self.mark_readable(slot, closed);
            }
            if writable {
                self.write_slot(slot);
            }
        }
        touched.clear();
        self.touched = touched;
        if accept {
            self.accept();
        }
        signalled
    }

    fn mark_readable(&mut self, slot: usize, closed: bool) {
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            c.readable = true;
            c.closing |= closed;
            if !c.queued {
                c.queued = true;
                self.ready.push_back(slot);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: try again on the next event.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    return;
                }
            };
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            let _ = stream.set_nodelay(true);
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(error = %e, "cannot watch a new connection");
                self.free.push(slot);
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                stage: Stage::Greeting,
                opened: Instant::now(),
                address: addr.ip().to_string(),
                peer: Arc::from(&[][..]),
                user: None,
                input: Vec::new(),
                pos: 0,
                filled: 0,
                need: 0,
                readable: true,
                full: false,
                closing: false,
                queued: false,
                eof: false,
                output: self.hello.clone(),
                written: 0,
                base: 0,
                ends: VecDeque::new(),
                dirty: false,
            });
            self.mark_readable(slot, false);
            self.mark_dirty(slot);
        }
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Writes one connection's output; closes it when broken, or when it
    /// was closing and all is written.
    fn write_slot(&mut self, slot: usize) {
        let Some(Some(c)) = self.conns.get_mut(slot) else {
            return;
        };
        let broken = c.write_out().is_err();
        if broken || (c.stage == Stage::Closing && c.output.is_empty()) {
            self.close(slot);
        }
    }

    /// Writes every connection's queued output.
    pub fn write_all(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            if let Some(Some(c)) = self.conns.get_mut(slot) {
                c.dirty = false;
            }
            self.write_slot(slot);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn close(&mut self, slot: usize) {
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.stage == Stage::Open && self.by_peer.get(&c.peer) == Some(&slot) {
            self.by_peer.remove(&c.peer);
        }
        self.free.push(slot);
    }

    /// Queues one message to `peer`: `frame`, then each of `binaries` as a
    /// frame, or, `packed`, all their bytes in one frame.
    ///
    /// # Errors
    /// [`SendError`] when the peer is gone or its queue is full.
    pub fn send(
        &mut self,
        peer: &[u8],
        frame: &[u8],
        binaries: &[Arc<[u8]>],
        packed: bool,
    ) -> Result<(), SendError> {
        let slot = *self.by_peer.get(peer).ok_or(SendError::Unreachable)?;
        let Some(Some(c)) = self.conns.get_mut(slot) else {
            return Err(SendError::Unreachable);
        };
        if c.stage != Stage::Open {
            return Err(SendError::Unreachable);
        }
        if c.backlog() >= self.settings.hwm {
            return Err(SendError::Full);
        }
        let out = &mut c.output;
        zmtp::encode_frame(out, frame, !binaries.is_empty());
        if packed {
            let len = binaries.iter().map(|b| b.len()).sum();
            zmtp::encode_header(out, len, false, false);
            for b in binaries {
                out.extend_from_slice(b);
            }
        } else {
            for (i, b) in binaries.iter().enumerate() {
                zmtp::encode_frame(out, b, i + 1 < binaries.len());
            }
        }
        let end = c.base + out.len() as u64;
        c.ends.push_back(end);
        self.mark_dirty(slot);
        Ok(())
    }

    /// The next message from any connection, handling handshakes on the
    /// way; `None` when every byte read so far is handled.
    pub fn recv(&mut self) -> Option<Message<'_>> {
        loop {
            let slot = *self.ready.front()?;
            match self.step(slot) {
                Step::Message(start, end) => {
                    // One message per turn: the next comes from the next
                    // connection.
                    self.ready.rotate_left(1);
                    let c = self.conns[slot].as_mut().expect("a ready connection");
                    c.pos = end;
                    let c = self.conns[slot].as_ref().expect("a ready connection");
                    let count =
                        frame_count(&c.input[start..end], self.frames.len(), self.max_frames);
                    return Some(Message {
                        peer: &c.peer,
                        user: c.user,
                        address: &c.address,
                        count,
                        buf: &c.input,
                        frames: &self.frames,
                    });
                }
                Step::Handled(end) => {
                    self.conns[slot].as_mut().expect("a ready connection").pos = end;
                }
                Step::More => {
                    if !self.read(slot) {
                        self.ready.pop_front();
                        let c = self.conns[slot].as_mut().expect("a ready connection");
                        c.queued = false;
                        if c.eof {
                            self.close(slot);
                        }
                    }
                }
                Step::Close(e) => {
                    self.ready.pop_front();
                    let c = self.conns[slot].as_ref().expect("a ready connection");
                    tracing::debug!(address = %c.address, error = %e, "command connection cut off");
                    self.close(slot);
                }
            }
        }
    }

    /// Reads more bytes of the connection in `slot`; `false` when none
    /// came.
    fn read(&mut self, slot: usize) -> bool {
        let c = self.conns[slot].as_mut().expect("a ready connection");
        if !c.readable || c.eof || matches!(c.stage, Stage::Denied(_) | Stage::Closing) {
            return false;
        }
        c.filled = zmtp::compact(&mut c.input, c.pos, c.filled);
        c.pos = 0;
        let size = if c.full {
            (c.input.len() * 2).min(READ_CHUNK)
        } else {
            c.input.len()
        };
        let want = size.max(c.filled + FIRST_READ).max(c.need);
        if c.input.len() < want {
            c.input.resize(want, 0);
        }
        let space = c.input.len() - c.filled;
        match c.stream.read(&mut c.input[c.filled..]) {
            Ok(0) => c.eof = true,
            Ok(n) => {
                c.filled += n;
                // A short read emptied the socket, unless the peer closed
                // it: the close came with this edge, and brings no other.
                c.full = n == space;
                c.readable = c.full || c.closing;
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(_) => c.eof = true,
        }
        false
    }

    /// Handles what starts at the connection's `pos`: a greeting, a
    /// handshake command, a ZMTP command, or a whole message.
    fn step(&mut self, slot: usize) -> Step {
        let c = self.conns[slot].as_mut().expect("a ready connection");
        let bytes = &c.input[c.pos..c.filled];
        match c.stage {
            Stage::Greeting => {
                if let Err(e) = zmtp::check_greeting_head(bytes) {
                    return Step::Close(e);
                }
                let Some(g) = bytes.get(..GREETING_LEN) else {
                    c.need = GREETING_LEN;
                    return Step::More;
                };
                let g = match zmtp::parse_greeting(g.try_into().expect("64 bytes")) {
                    Ok(g) => g,
                    Err(e) => return Step::Close(e),
                };
                if g.mechanism != self.mechanism.name().as_bytes() {
                    let name = String::from_utf8_lossy(&g.mechanism).into_owned();
                    return Step::Close(ZmtpError::Mechanism(name, self.mechanism.name()));
                }
                c.stage = match self.mechanism {
                    Mechanism::Null => Stage::Ready,
                    Mechanism::Plain => Stage::Hello,
                };
                Step::Handled(c.pos + GREETING_LEN)
            }
            Stage::Open => self.message(slot),
            Stage::Denied(_) | Stage::Closing => Step::More,
            Stage::Hello | Stage::Initiate | Stage::Ready => {
                let header = match zmtp::decode_header(bytes, HANDSHAKE_MAX) {
                    Ok(Some(h)) => h,
                    Ok(None) => return Step::More,
                    Err(e) => return Step::Close(e),
                };
                let Some(body) = bytes.get(header.size..header.size + header.len) else {
                    c.need = header.size + header.len;
                    return Step::More;
                };
                if !header.command {
                    return Step::Close(ZmtpError::Unexpected("a message".to_owned()));
                }
                let end = c.pos + header.size + header.len;
                let body = body.to_vec();
                match self.handshake(slot, &body) {
                    Ok(()) => Step::Handled(end),
                    Err(e) => Step::Close(e),
                }
            }
        }
    }

    /// One handshake command from the connection in `slot`.
    fn handshake(&mut self, slot: usize, body: &[u8]) -> Result<(), ZmtpError> {
        let (name, data) = zmtp::parse_command(body)?;
        let c = self.conns[slot]
            .as_mut()
            .expect("the connection being read");
        match (c.stage, name) {
            (Stage::Hello, b"HELLO") => {
                let credentials = zmtp::parse_plain_hello(data)?;
                let gate = self.settings.gate.as_mut().expect("PLAIN has a gate");
                let now = Instant::now();
                match gate.judge(&c.address, Some(credentials), now) {
                    Ok(user) => {
                        c.user = Some(user);
                        c.command("WELCOME", &[]);
                        c.stage = Stage::Initiate;
                    }
                    Err(delay) if delay.is_zero() => deny(c),
                    Err(delay) => c.stage = Stage::Denied(now + delay),
                }
            }
            (Stage::Initiate, b"INITIATE") | (Stage::Ready, b"READY") => {
                let props = zmtp::parse_properties(data)?;
                let kind = zmtp::property(&props, "Socket-Type").unwrap_or_default();
                if !PEER_TYPES.contains(&kind) {
                    c.command("ERROR", &error_reason(b"invalid socket type"));
                    c.stage = Stage::Closing;
                    self.mark_dirty(slot);
                    return Ok(());
                }
                if c.stage == Stage::Initiate {
                    c.command("READY", &ready_metadata());
                }
                let peer = self.routing_id();
                let c = self.conns[slot]
                    .as_mut()
                    .expect("the connection being read");
                c.peer = peer.clone();
                c.stage = Stage::Open;
                self.by_peer.insert(peer, slot);
            }
            (_, other) => {
                return Err(ZmtpError::Unexpected(
                    String::from_utf8_lossy(other).into_owned(),
                ))
            }
        }
        self.mark_dirty(slot);
        Ok(())
    }

    /// A new routing id. A peer's own `Identity` is not used: a new
    /// connection that took a closed one's id would inherit its session.
    fn routing_id(&mut self) -> PeerId {
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            let mut id = [0u8; 5];
            id[1..].copy_from_slice(&self.next_id.to_be_bytes());
            if !self.by_peer.contains_key(&id[..]) {
                return Arc::from(&id[..]);
            }
        }
    }

    /// Reads one message (or a ZMTP command) of an open connection.
    fn message(&mut self, slot: usize) -> Step {
        let max = self.settings.max_frame;
        let c = self.conns[slot].as_mut().expect("a ready connection");
        self.frames.clear();
        let mut at = c.pos;
        loop {
            let header = match zmtp::decode_header(&c.input[at..c.filled], max) {
                Ok(Some(h)) => h,
                Ok(None) => return Step::More,
                Err(e) => return Step::Close(e),
            };
            let (start, end) = (at + header.size, at + header.size + header.len);
            if end > c.filled {
                c.need = end - c.pos;
                return Step::More;
            }
            if header.command {
                if at != c.pos {
                    return Step::Close(ZmtpError::Unexpected(
                        "a command inside a message".to_owned(),
                    ));
                }
                return match command(c, start, end) {
                    Ok(()) => {
                        self.mark_dirty(slot);
                        Step::Handled(end)
                    }
                    Err(e) => Step::Close(e),
                };
            }
            if self.frames.len() < self.max_frames {
                self.frames.push((start, end));
            }
            at = end;
            if !header.more {
                return Step::Message(c.pos, at);
            }
        }
    }

    /// Housekeeping on the router's tick: idle connections give their
    /// buffers back, denials that are due go out, handshakes (and closings)
    /// that took too long are cut off.
    pub fn tick(&mut self, now: Instant) {
        let mut late = Vec::new();
        for (slot, c) in self.conns.iter_mut().enumerate() {
            let Some(c) = c else { continue };
            if !c.queued && c.pos == c.filled && !c.input.is_empty() {
                // Idle: its buffers go back until it sends or is sent to.
                (c.input, c.pos, c.filled) = (Vec::new(), 0, 0);
            }
            if c.output.is_empty() && c.output.capacity() > 0 {
                c.output = Vec::new();
            }
            match c.stage {
                Stage::Denied(due) if due <= now => {
                    deny(c);
                    late.push((slot, false));
                }
                Stage::Greeting
                | Stage::Hello
                | Stage::Initiate
                | Stage::Ready
                | Stage::Closing
                    if now.duration_since(c.opened) > HANDSHAKE_TIMEOUT =>
                {
                    late.push((slot, true));
                }
                _ => {}
            }
        }
        for (slot, cut) in late {
            if cut {
                self.close(slot);
            } else {
                self.mark_dirty(slot);
            }
        }
        self.write_all();
    }

    /// Whether any connection has output not yet written.
    fn writing_any(&self) -> bool {
        self.conns
            .iter()
            .flatten()
            .any(|c| c.written < c.output.len())
    }

    /// Writes what is queued until all is written or `deadline` passes.
    pub fn linger(&mut self, deadline: Instant) {
        self.write_all();
        while self.writing_any() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.poll(left.min(Duration::from_millis(10)));
            let slots: Vec<usize> = (0..self.conns.len()).collect();
            for slot in slots {
                self.write_slot(slot);
            }
        }
    }
}

/// A ZMTP command on an open connection: PING gets PONG, ERROR ends it,
/// others are ignored.
fn command(c: &mut Conn, start: usize, end: usize) -> Result<(), ZmtpError> {
    let (name, data) = zmtp::parse_command(&c.input[start..end])?;
    match name {
        b"PING" => {
            let context = zmtp::ping_context(data).to_vec();
            c.command("PONG", &context);
            Ok(())
        }
        b"ERROR" => Err(ZmtpError::Unexpected("ERROR".to_owned())),
        _ => Ok(()),
    }
}

/// How many frames `message` holds: `kept`, unless it reached `max` and
/// the rest must be counted.
fn frame_count(mut message: &[u8], kept: usize, max: usize) -> usize {
    if kept < max {
        return kept;
    }
    let mut n = 0;
    while let Ok(Some(h)) = zmtp::decode_header(message, usize::MAX) {
        message = &message[(h.size + h.len).min(message.len())..];
        n += 1;
    }
    n
}

/// The metadata of our READY: we are a ROUTER.
fn ready_metadata() -> Vec<u8> {
    zmtp::encode_properties(&[("Socket-Type", b"ROUTER")])
}

/// Refuses credentials the way libzmq's PLAIN clients understand, then
/// closes.
///
/// libzmq writes its PLAIN error prefix as the C string `"\x05ERROR"`,
/// where the hex escape swallows the `E`: on the wire its PLAIN ERROR is
/// the 5-byte name `^RROR`, and its PLAIN client only recognises that. We
/// send the same bytes, so libzmq (and pyzmq) clients report a refused
/// token as `HANDSHAKE_FAILED_AUTH` with status 400.
fn deny(c: &mut Conn) {
    let mut body = b"\x5eRROR".to_vec();
    body.extend_from_slice(&error_reason(b"400"));
    zmtp::encode_header(&mut c.output, body.len(), false, true);
    c.output.extend_from_slice(&body);
    c.stage = Stage::Closing;
}

/// The data of an ERROR command.
fn error_reason(reason: &[u8]) -> Vec<u8> {
    let mut data = vec![reason.len() as u8];
    data.extend_from_slice(reason);
    data
}
