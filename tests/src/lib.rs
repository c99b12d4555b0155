//! # thynapse-tests
//!
//! The testkit of Thynapse's end-to-end tests: it starts real transmitters
//! (in-process or as the `thynapse` binary, always on free loopback ports)
//! and talks to them the way a cell in any language would, frame by frame.
//! The scenarios themselves live in `tests/tests/*.rs`, one file per
//! concern, each test starting its own transmitter.
//!
//! ## Layout
//! - [`eventually`] and [`wait_until`]: poll a condition until a deadline;
//!   tests never sleep a fixed time, they wait on a reply or poll.
//! - [`watchdog`]: runs a test body on its own thread and fails the test if
//!   it is still running after a deadline, so a test fails and never hangs;
//!   [`binary_watchdog`] builds the binary first, outside the deadline.
//! - [`TransmitterProcess`]: the real `thynapse transmitter` as a child
//!   process, built once per test binary, killed on drop.
//! - [`RawCell`]: a cell written by hand over a libzmq DEALER, with helpers
//!   for each verb; [`Msg`] is one message it received.
//! - [`RawSub`]: a libzmq SUB on the event socket (membership events),
//!   with the `SYNC` handshake. Multicatch events come to a [`RawCell`] as
//!   `J EVNT` on its DEALER.
//! - [`Monitor`]: libzmq socket events of a [`RawCell`] or [`RawSub`]
//!   (connection dropped, handshake refused).
//! - [`FlowProbe`]: a publisher and an anycatch listener that prove events
//!   still flow, in the foreground or on a background thread
//!   ([`BackgroundProbe`]).
//! - [`run_with_deadline`]: runs an external program (the Python cell) and
//!   kills it if it overstays.
//!
//! ## Example
//! ```no_run
//! use std::time::Duration;
//! use thynapse_tests::{RawCell, TransmitterProcess};
//!
//! # fn main() -> anyhow::Result<()> {
//! let t = TransmitterProcess::spawn(&[])?;
//! let mut cell = RawCell::open(t.command_endpoint())?;
//! let welcome = cell.hello("demo")?;
//! assert!(welcome["pub"].as_str().is_some());
//! cell.send(r#"J PING {"ref":1}"#)?;
//! let pong = cell.expect("PONG", Duration::from_secs(5))?;
//! assert_eq!(pong["ref"], 1);
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use thynapse_protocol::{frame, Thid};

pub mod cells;
pub mod zmtp;

pub use nix::sys::signal::Signal;

/// How long a test waits for a reply that should come at once. Generous,
/// because debug builds on a loaded 2-core machine are slow; a healthy run
/// never waits this long.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`RawCell::items`] read.
#[derive(Debug, Default)]
pub struct Items {
    /// Each item's body and binary payload, in order.
    pub items: Vec<(Value, Option<Vec<u8>>)>,
    /// How many messages carried them.
    pub messages: usize,
    /// How many of those were packed batches.
    pub packed: usize,
}

/// How long a test watches for something that must *not* arrive.
pub const SILENCE: Duration = Duration::from_millis(750);

/// How often [`eventually`] callers usually poll.
pub const POLL: Duration = Duration::from_millis(10);

/// How long a test may run before [`watchdog`] fails it.
pub const TEST_DEADLINE: Duration = Duration::from_secs(25);

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Calls `cond` every `poll` until it returns true (then returns true) or
/// `deadline` has passed (then returns false). The condition is always
/// checked at least once, and once more at the deadline.
pub fn eventually(deadline: Duration, poll: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        std::thread::sleep(poll.min(end - now));
    }
}

/// [`eventually`] as a `Result`: fails with "timed out after ... waiting
/// for `what`".
///
/// # Errors
/// When `cond` is still false at the deadline.
pub fn wait_until(
    what: &str,
    deadline: Duration,
    poll: Duration,
    cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    if eventually(deadline, poll, cond) {
        Ok(())
    } else {
        bail!("timed out after {deadline:?} waiting for {what}")
    }
}

/// Runs `body` on its own thread and returns its result, or fails if it is
/// still running after `deadline` (the stuck thread is abandoned; the test
/// process ends when the harness does). A panic in `body` is re-raised.
///
/// # Errors
/// `body`'s error, or a watchdog error naming `name` and the deadline.
pub fn watchdog<F>(name: &str, deadline: Duration, body: F) -> anyhow::Result<()>
where
    F: FnOnce() -> anyhow::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = tx.send(());
            body()
        })
        .context("spawning the test thread")?;
    // The first message says the thread started; the channel closes when
    // the body returns or panics.
    let started = Instant::now();
    let _ = rx.recv_timeout(deadline);
    let left = deadline.saturating_sub(started.elapsed());
    match rx.recv_timeout(left) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            bail!("watchdog: test {name} still running after {deadline:?}; it hangs")
        }
        _ => match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// [`watchdog`] with [`TEST_DEADLINE`] for a test of the `thynapse`
/// binary: builds the binary first, outside the deadline, since the build
/// may wait for other builds of the same target folder; only the test
/// itself must finish in time.
///
/// # Errors
/// When the binary cannot be built, or as [`watchdog`].
pub fn binary_watchdog<F>(name: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce() -> anyhow::Result<()> + Send + 'static,
{
    thynapse_binary()?;
    watchdog(name, TEST_DEADLINE, body)
}

// ---------------------------------------------------------------------------
// The thynapse binary
// ---------------------------------------------------------------------------

/// The workspace root (the folder holding `transmitter/`, `tests/`, ...).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent folder")
        .to_path_buf()
}

/// The path of the `thynapse` binary, built once per test process.
///
/// `THYNAPSE_BIN`, when set, names a binary to use as is. Otherwise the
/// binary in the target folder and profile this test binary was built in
/// (so `CARGO_TARGET_DIR` is honoured) is used when it is newer than its
/// sources, as after `cargo test --workspace`; else this runs `cargo build
/// -p thynapse-transmitter --bin thynapse` there, once, whatever the
/// number of tests asking.
///
/// # Errors
/// When cargo cannot be run or the build fails (with cargo's output).
pub fn thynapse_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| build_thynapse().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

/// Whether `bin` exists and was written after every file of the crates it
/// is built from (transmitter, protocol) and after `Cargo.lock`.
fn is_newer_than_sources(bin: &Path) -> bool {
    fn newest(path: &Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| newest(&e.ok()?.path()))
            .max()
    }
    let Some(built) = std::fs::metadata(bin).and_then(|m| m.modified()).ok() else {
        return false;
    };
    let root = workspace_root();
    ["transmitter", "protocol", "Cargo.lock", "Cargo.toml"]
        .iter()
        .all(|p| newest(&root.join(p)).is_some_and(|t| t < built))
}

fn build_thynapse() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("THYNAPSE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // This test binary is <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in <target>/<profile>/deps")?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .context("the profile folder has no parent")?;
    // `cargo test --workspace` has just built the binary with the whole
    // workspace's features; building it alone would rebuild many crates
    // with other features. Use it when it is newer than every source it
    // is made of.
    let built = profile_dir.join("thynapse");
    if is_newer_than_sources(&built) {
        return Ok(built);
    }
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "thynapse-transmitter", "--bin"])
        .arg("thynapse")
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let output = run_with_deadline(&mut cmd, Duration::from_secs(600))
        .with_context(|| format!("running {} build", cargo.display()))?;
    if !output.status.success() {
        bail!(
            "cargo build -p thynapse-transmitter failed ({}):\n{}",
            output.status,
            output.stderr
        );
    }
    let bin = profile_dir.join(format!("thynapse{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!("cargo build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// What [`run_with_deadline`] collected from a finished program.
#[derive(Debug)]
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output, lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

/// Runs `cmd` with its output captured and kills it if it is still running
/// after `deadline`.
///
/// # Errors
/// When it cannot be started, or overstays (the error holds its output so
/// far).
pub fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut status = None;
    let finished = eventually(deadline, POLL, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
    }
    let collect = |h: JoinHandle<String>| h.join().unwrap_or_default();
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{cmd:?} still running after {deadline:?}, killed\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}

/// Reads a pipe to its end on a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A `thynapse transmitter` child process on free loopback ports.
///
/// Its stderr (the log) is kept for error messages; the child is killed
/// when this is dropped.
#[derive(Debug)]
pub struct TransmitterProcess {
    /// The child; `None` once it was reaped.
    child: Child,
    /// Its exit status, once seen.
    exited: Option<ExitStatus>,
    /// The transmitter THID from its startup line.
    id: String,
    /// Its command endpoint, port resolved.
    command: String,
    /// Its event endpoint, port resolved.
    event: String,
    /// Everything it wrote to stderr so far.
    log: Arc<Mutex<String>>,
}

impl TransmitterProcess {
    /// Starts `thynapse transmitter` with `args`, adding `--command` and
    /// `--event` on `tcp://127.0.0.1:0` unless `args` name them, and waits
    /// for its startup line `thynapse transmitter id=.. command=..
    /// event=..`.
    ///
    /// # Errors
    /// When the binary cannot be built or started, or does not print its
    /// startup line within 20 s (the error holds its log).
    pub fn spawn(args: &[&str]) -> anyhow::Result<TransmitterProcess> {
        let bin = thynapse_binary()?;
        let mut cmd = Command::new(&bin);
        cmd.arg("transmitter");
        for (flag, default) in [
            ("--command", "tcp://127.0.0.1:0"),
            ("--event", "tcp://127.0.0.1:0"),
        ] {
            if !args.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        cmd.args(args)
            .env_remove("THYNAPSE_TOKEN")
            .env_remove("THYNAPSE_COMMAND")
            .env_remove("THYNAPSE_EVENT")
            .env(
                "THYNAPSE_LOG",
                std::env::var("THYNAPSE_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                // Keep reading to the end so the child never blocks on a
                // full pipe; only the first line matters.
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        let mut process = TransmitterProcess {
            child,
            exited: None,
            id: String::new(),
            command: String::new(),
            event: String::new(),
            log,
        };
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => bail!(
                "thynapse printed no startup line within 20 s; log:\n{}",
                process.log()
            ),
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        match (
            line.starts_with("thynapse transmitter "),
            field("id="),
            field("command="),
            field("event="),
        ) {
            (true, Some(id), Some(command), Some(event)) => {
                process.id = id;
                process.command = command;
                process.event = event;
                Ok(process)
            }
            _ => bail!("unexpected startup line {line:?}"),
        }
    }

    /// The transmitter's THID, as printed at startup.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The command endpoint (`tcp://127.0.0.1:<port>`).
    pub fn command_endpoint(&self) -> &str {
        &self.command
    }

    /// The event endpoint (`tcp://127.0.0.1:<port>`).
    pub fn event_endpoint(&self) -> &str {
        &self.event
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the transmitter logged to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends `signal` to the child.
    ///
    /// # Errors
    /// When the signal cannot be delivered (the child is gone).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {pid}"))
    }

    /// Kills the child (SIGKILL) and reaps it.
    ///
    /// # Errors
    /// When it cannot be killed or reaped.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.exited.is_some() {
            return Ok(());
        }
        let _ = self.child.kill();
        self.exited = Some(self.child.wait().context("reaping the transmitter")?);
        Ok(())
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited.is_none()
    }

    /// Waits up to `timeout` for the child to exit and returns its status.
    ///
    /// # Errors
    /// When it is still running at the deadline (the error holds its log).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if !eventually(timeout, POLL, || !self.is_running()) {
            bail!(
                "the transmitter is still running {timeout:?} later; log:\n{}",
                self.log()
            );
        }
        self.exited.context("exited without a status")
    }
}

impl Drop for TransmitterProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

// ---------------------------------------------------------------------------
// Raw cells
// ---------------------------------------------------------------------------

/// Counter behind unique `ref`s, SYNC tokens and inproc names.
static UNIQUE: AtomicU64 = AtomicU64::new(1);

fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

/// One message a [`RawCell`] received: `J VERB {json}` [+ binary frame].
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    /// The 4-letter verb.
    pub verb: String,
    /// The JSON body (`{}` when the frame had none).
    pub body: Value,
    /// The JSON body as received, byte for byte.
    pub raw: String,
    /// The optional binary frame.
    pub binary: Option<Vec<u8>>,
}

impl Msg {
    /// Decodes a command-socket message.
    ///
    /// # Errors
    /// When it is not `[J ]VERB {json}` with at most one extra frame.
    pub fn decode(mut parts: Vec<Vec<u8>>) -> anyhow::Result<Msg> {
        if parts.is_empty() || parts.len() > 2 {
            bail!("a message of {} frames", parts.len());
        }
        let binary = (parts.len() == 2).then(|| parts.remove(1));
        let first = &parts[0];
        let f = frame::decode(first).map_err(|e| {
            anyhow!(
                "not a command frame ({e}): {:?}",
                String::from_utf8_lossy(first)
            )
        })?;
        let body = serde_json::from_slice(f.body).with_context(|| {
            format!(
                "{} body is not JSON: {:?}",
                f.verb,
                String::from_utf8_lossy(f.body)
            )
        })?;
        Ok(Msg {
            verb: f.verb.as_str().to_owned(),
            body,
            raw: String::from_utf8_lossy(f.body).into_owned(),
            binary,
        })
    }
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = self.raw.clone();
        if raw.len() > 200 {
            let mut cut = 200;
            while !raw.is_char_boundary(cut) {
                cut -= 1;
            }
            raw.truncate(cut);
            raw.push_str("...");
        }
        write!(f, "{} {}", self.verb, raw)
    }
}

/// Sets PLAIN credentials on a client socket when there is a token.
fn set_token(socket: &zmq::Socket, token: Option<&str>) -> anyhow::Result<()> {
    if let Some(t) = token {
        socket.set_plain_username(Some("cell"))?;
        socket.set_plain_password(Some(t))?;
    }
    Ok(())
}

/// A cell speaking the wire protocol by hand over a libzmq DEALER.
///
/// Messages received while waiting for something else are kept, in order,
/// and returned by later calls, so replies and deliveries may interleave.
pub struct RawCell {
    /// The DEALER (declared before the context so it closes first).
    socket: zmq::Socket,
    /// The THID this cell says HELO with.
    id: Thid,
    /// Received but not yet consumed.
    pending: VecDeque<Msg>,
    /// The context the socket (and any [`Monitor`]) lives in.
    ctx: zmq::Context,
}

impl std::fmt::Debug for RawCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCell")
            .field("id", &self.id)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl RawCell {
    /// A DEALER with a fresh random THID, not yet connected, presenting
    /// `token` as its PLAIN password when given.
    ///
    /// # Errors
    /// When libzmq refuses to create or configure the socket.
    pub fn unconnected(token: Option<&str>) -> anyhow::Result<RawCell> {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        set_token(&socket, token)?;
        Ok(RawCell {
            socket,
            id: Thid::random(),
            pending: VecDeque::new(),
            ctx,
        })
    }

    /// A DEALER connected to `endpoint`, without credentials.
    ///
    /// # Errors
    /// When the socket cannot be created or connected.
    pub fn open(endpoint: &str) -> anyhow::Result<RawCell> {
        RawCell::open_with_token(endpoint, None)
    }

    /// A DEALER connected to `endpoint`, with PLAIN credentials when
    /// `token` is given.
    ///
    /// # Errors
    /// When the socket cannot be created or connected.
    pub fn open_with_token(endpoint: &str, token: Option<&str>) -> anyhow::Result<RawCell> {
        let cell = RawCell::unconnected(token)?;
        cell.connect(endpoint)?;
        Ok(cell)
    }

    /// Connects the DEALER to `endpoint`.
    ///
    /// # Errors
    /// When the endpoint is malformed.
    pub fn connect(&self, endpoint: &str) -> anyhow::Result<()> {
        self.socket
            .connect(endpoint)
            .with_context(|| format!("connecting to {endpoint}"))
    }

    /// Watches this cell's socket events; attach before [`connect`] to see
    /// the first handshake.
    ///
    /// [`connect`]: RawCell::connect
    ///
    /// # Errors
    /// When libzmq cannot set the monitor up.
    pub fn monitor(&self) -> anyhow::Result<Monitor> {
        Monitor::attach(&self.ctx, &self.socket)
    }

    /// This cell's THID.
    pub fn id(&self) -> Thid {
        self.id
    }

    /// Uses `id` as this cell's THID from now on (to impersonate a cell).
    pub fn set_id(&mut self, id: Thid) {
        self.id = id;
    }

    /// The libzmq socket, for what the helpers do not cover.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Sends one text frame as is.
    ///
    /// # Errors
    /// When the message cannot be queued within [`REPLY_TIMEOUT`].
    pub fn send(&self, frame: &str) -> anyhow::Result<()> {
        self.send_parts(&[frame.as_bytes()])
    }

    /// Sends a multipart message as is (any number of frames, even none of
    /// them text).
    ///
    /// # Errors
    /// When the message cannot be queued within [`REPLY_TIMEOUT`].
    pub fn send_parts(&self, parts: &[&[u8]]) -> anyhow::Result<()> {
        if !eventually(REPLY_TIMEOUT, POLL, || {
            self.socket.poll(zmq::POLLOUT, 0).is_ok_and(|n| n > 0)
        }) {
            bail!("cannot send: the DEALER has no connection to queue to");
        }
        self.socket
            .send_multipart(parts, zmq::DONTWAIT)
            .context("sending")
    }

    /// Sends `J VERB body`.
    ///
    /// # Errors
    /// As [`RawCell::send`].
    pub fn send_json(&self, verb: &str, body: &Value) -> anyhow::Result<()> {
        self.send(&format!("J {verb} {body}"))
    }

    /// The next raw multipart message from the socket (ignoring what is
    /// pending), or `None` after `timeout`.
    ///
    /// # Errors
    /// When libzmq fails.
    pub fn recv_parts(&self, timeout: Duration) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        if self.socket.poll(zmq::POLLIN, ms)? == 0 {
            return Ok(None);
        }
        Ok(Some(self.socket.recv_multipart(0)?))
    }

    /// Reads `verb` messages (ignoring what is pending, and messages of
    /// other verbs) until `want` items came, single or in batches
    /// (PROTOCOL.md §23), packed or not.
    ///
    /// # Errors
    /// When fewer came within [`REPLY_TIMEOUT`], or a batch is malformed.
    pub fn items(&self, verb: &str, want: usize) -> anyhow::Result<Items> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut got = Items::default();
        let prefix = format!("J {verb} ");
        while got.items.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(parts) = self.recv_parts(left)? else {
                bail!(
                    "{} of {want} {verb} items after {REPLY_TIMEOUT:?}",
                    got.items.len()
                );
            };
            let text = String::from_utf8(parts[0].clone())?;
            let Some(body) = text.strip_prefix(&prefix) else {
                continue;
            };
            let items = match serde_json::from_str(body)? {
                Value::Array(items) => items,
                single => vec![single],
            };
            let binaries = &parts[1..];
            got.messages += 1;
            if items.len() > 1 && items[0].get("bin").is_some() {
                anyhow::ensure!(binaries.len() == 1, "packed: one binary frame: {text}");
                let mut rest = &binaries[0][..];
                for item in items {
                    let n = item["bin"].as_u64().context("every item says its bin")?;
                    let (payload, after) = rest
                        .split_at_checked(usize::try_from(n)?)
                        .context("bins past the frame")?;
                    got.items.push((item, Some(payload.to_vec())));
                    rest = after;
                }
                anyhow::ensure!(rest.is_empty(), "the bins add up to the frame: {text}");
                got.packed += 1;
                continue;
            }
            anyhow::ensure!(
                binaries.is_empty() || binaries.len() == items.len(),
                "one binary frame each, or none: {text}"
            );
            let mut binaries = binaries.iter().cloned();
            got.items
                .extend(items.into_iter().map(|i| (i, binaries.next())));
        }
        Ok(got)
    }

    /// The first frame of the next message, as text, or `None` after
    /// `timeout`. Pending messages come first.
    ///
    /// # Errors
    /// When libzmq fails.
    pub fn recv_frame(&mut self, timeout: Duration) -> anyhow::Result<Option<String>> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(format!("J {} {}", m.verb, m.raw)));
        }
        Ok(self
            .recv_parts(timeout)?
            .and_then(|p| p.into_iter().next())
            .map(|f| String::from_utf8_lossy(&f).into_owned()))
    }

    /// The next message, pending ones first, or `None` after `timeout`.
    ///
    /// # Errors
    /// When the transmitter sends something that is not a command.
    pub fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Msg>> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        match self.recv_parts(timeout)? {
            Some(parts) => Msg::decode(parts).map(Some),
            None => Ok(None),
        }
    }

    /// The first message satisfying `pred` within `timeout`; the others
    /// stay pending, in order.
    ///
    /// # Errors
    /// When none arrives in time (naming `what` and the last messages
    /// skipped), or a bad frame arrives.
    pub fn expect_where(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Msg) -> bool,
    ) -> anyhow::Result<Msg> {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return Ok(self.pending.remove(i).expect("index from position"));
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let parts = self.recv_parts(left)?;
            match parts {
                Some(parts) => {
                    let m = Msg::decode(parts)?;
                    if pred(&m) {
                        return Ok(m);
                    }
                    self.pending.push_back(m);
                }
                None => {
                    let seen: Vec<String> = self
                        .pending
                        .iter()
                        .rev()
                        .take(3)
                        .map(ToString::to_string)
                        .collect();
                    bail!(
                        "cell {}: timed out after {timeout:?} waiting for {what}; pending: [{}]",
                        self.id,
                        seen.join("; ")
                    );
                }
            }
        }
    }

    /// The body of the first `verb` message within `timeout`.
    ///
    /// # Errors
    /// As [`RawCell::expect_where`].
    pub fn expect(&mut self, verb: &str, timeout: Duration) -> anyhow::Result<Value> {
        Ok(self.expect_where(verb, timeout, |m| m.verb == verb)?.body)
    }

    /// The reply `verb` carrying `"ref": reference`; an ERRR with `"re":
    /// reference` fails at once.
    ///
    /// # Errors
    /// On that ERRR, or as [`RawCell::expect_where`].
    pub fn expect_reply(&mut self, verb: &str, reference: &Value) -> anyhow::Result<Value> {
        let m = self.expect_where(
            &format!("{verb} with ref {reference}"),
            REPLY_TIMEOUT,
            |m| {
                (m.verb == verb && m.body.get("ref") == Some(reference))
                    || (m.verb == "ERRR" && m.body.get("re") == Some(reference))
            },
        )?;
        if m.verb == "ERRR" {
            bail!("expected {verb} for ref {reference}, got {m}");
        }
        Ok(m.body)
    }

    /// The next ERRR, checked to have `code`, a message and an `re` field;
    /// returns its body.
    ///
    /// # Errors
    /// When no ERRR comes, or it has another code or misses a field.
    pub fn expect_error(&mut self, code: &str) -> anyhow::Result<Value> {
        let m = self.expect_where(&format!("ERRR {code}"), REPLY_TIMEOUT, |m| m.verb == "ERRR")?;
        let body = m.body;
        if body["code"] != code {
            bail!("expected ERRR {code}, got ERRR {body}");
        }
        if !body["message"].is_string() {
            bail!("ERRR {code} without a message: {body}");
        }
        if body.get("re").is_none() {
            bail!("ERRR {code} without an \"re\" field: {body}");
        }
        Ok(body)
    }

    /// Takes every message received so far (pending ones and what the
    /// socket holds now), without waiting.
    ///
    /// # Errors
    /// When a bad frame arrives.
    pub fn drain(&mut self) -> anyhow::Result<Vec<Msg>> {
        while let Some(parts) = self.recv_parts(Duration::ZERO)? {
            self.pending.push_back(Msg::decode(parts)?);
        }
        Ok(self.pending.drain(..).collect())
    }

    /// A fresh `ref` value, unique in this process.
    pub fn next_ref(&self) -> Value {
        json!(format!("r{}", unique()))
    }

    /// Says HELO as `service` with this cell's THID and returns the WLCM
    /// body.
    ///
    /// # Errors
    /// When no WLCM comes (an ERRR for it fails at once).
    pub fn hello(&mut self, service: &str) -> anyhow::Result<Value> {
        self.hello_with(service, json!({}))
    }

    /// Says HELO as a cell of `service`, with the fields of `extra` added
    /// (e.g. `{"batch": true, "packed": true}`), and returns the WLCM body.
    ///
    /// # Errors
    /// When no WLCM comes, or `extra` is not an object.
    pub fn hello_with(&mut self, service: &str, extra: Value) -> anyhow::Result<Value> {
        let reference = self.next_ref();
        let mut body = json!({"id": self.id, "service": service, "ref": reference});
        let Value::Object(extra) = extra else {
            bail!("HELO fields must be an object: {extra}");
        };
        body.as_object_mut().expect("a JSON object").extend(extra);
        self.send_json("HELO", &body)?;
        self.expect_reply("WLCM", &reference)
    }

    /// Listens to `pattern` in `mode` (`"any"` or `"multi"`), with or
    /// without acks, and waits for the OKAY.
    ///
    /// # Errors
    /// When no OKAY comes.
    pub fn listen(&mut self, pattern: &str, mode: &str, ack: bool) -> anyhow::Result<()> {
        let reference = self.next_ref();
        self.send_json(
            "LSTN",
            &json!({"pattern": pattern, "mode": mode, "ack": ack, "ref": reference}),
        )?;
        self.expect_reply("OKAY", &reference).map(drop)
    }

    /// Publishes without asking for a confirmation.
    ///
    /// # Errors
    /// As [`RawCell::send`].
    pub fn publish(&self, channel: &str, payload: &Value) -> anyhow::Result<()> {
        self.send_json("EVNT", &json!({"channel": channel, "payload": payload}))
    }

    /// Publishes with `confirm` and returns the OKAY body (`id`,
    /// `routed`).
    ///
    /// # Errors
    /// When no OKAY comes (an ERRR such as `no_listeners` fails at once).
    pub fn publish_confirmed(&mut self, channel: &str, payload: &Value) -> anyhow::Result<Value> {
        let reference = self.next_ref();
        self.send_json(
            "EVNT",
            &json!({"channel": channel, "payload": payload, "confirm": true, "ref": reference}),
        )?;
        self.expect_reply("OKAY", &reference)
    }

    /// Acknowledges one delivery.
    ///
    /// # Errors
    /// As [`RawCell::send`].
    pub fn ack(&self, id: &str) -> anyhow::Result<()> {
        self.send_json("ACKN", &json!({ "id": id }))
    }

    /// PING and wait for the PONG: proves the connection works and that
    /// everything sent before was handled.
    ///
    /// # Errors
    /// When no PONG comes.
    pub fn ping(&mut self) -> anyhow::Result<()> {
        let reference = self.next_ref();
        self.send_json("PING", &json!({ "ref": reference }))?;
        self.expect_reply("PONG", &reference).map(drop)
    }

    /// Says GBYE.
    ///
    /// # Errors
    /// As [`RawCell::send`].
    pub fn bye(&self) -> anyhow::Result<()> {
        self.send(r#"J GBYE {"reason":"test done"}"#)
    }
}

/// A libzmq SUB on a transmitter's event socket, which carries membership
/// events (`MEMB`) and `SYNC` markers.
pub struct RawSub {
    /// The SUB (declared before the context so it closes first).
    socket: zmq::Socket,
    /// Frames received while waiting for a SYNC.
    pending: VecDeque<Vec<Vec<u8>>>,
    /// The context the socket lives in.
    ctx: zmq::Context,
}

impl std::fmt::Debug for RawSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSub")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl RawSub {
    /// A SUB, not yet connected, presenting `token` when given.
    ///
    /// # Errors
    /// When libzmq refuses to create or configure the socket.
    pub fn unconnected(token: Option<&str>) -> anyhow::Result<RawSub> {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::SUB)?;
        socket.set_linger(0)?;
        set_token(&socket, token)?;
        Ok(RawSub {
            socket,
            pending: VecDeque::new(),
            ctx,
        })
    }

    /// A SUB connected to `endpoint` (a WLCM's `pub`).
    ///
    /// # Errors
    /// When the socket cannot be created or connected.
    pub fn open(endpoint: &str, token: Option<&str>) -> anyhow::Result<RawSub> {
        let sub = RawSub::unconnected(token)?;
        sub.connect(endpoint)?;
        Ok(sub)
    }

    /// Connects to `endpoint`.
    ///
    /// # Errors
    /// When the endpoint is malformed.
    pub fn connect(&self, endpoint: &str) -> anyhow::Result<()> {
        self.socket
            .connect(endpoint)
            .with_context(|| format!("connecting to {endpoint}"))
    }

    /// Watches this socket's events.
    ///
    /// # Errors
    /// When libzmq cannot set the monitor up.
    pub fn monitor(&self) -> anyhow::Result<Monitor> {
        Monitor::attach(&self.ctx, &self.socket)
    }

    /// Subscribes to a topic prefix, e.g. `MEMB billing `.
    ///
    /// # Errors
    /// When libzmq fails.
    pub fn subscribe(&self, prefix: &str) -> anyhow::Result<()> {
        Ok(self.socket.set_subscribe(prefix.as_bytes())?)
    }

    /// The SYNC handshake: subscribes to a unique `SYNC <token>`, waits for
    /// the transmitter to publish it (proving earlier subscriptions are in
    /// place), then unsubscribes. Event frames that arrive meanwhile are
    /// kept for [`RawSub::recv`].
    ///
    /// # Errors
    /// When the SYNC frame does not come within `timeout`.
    pub fn sync(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let marker = format!("SYNC test-{}-{}", std::process::id(), unique());
        self.socket.set_subscribe(marker.as_bytes())?;
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv_raw(left)? {
                Some(parts) if parts[0] == marker.as_bytes() => break,
                Some(parts) => self.pending.push_back(parts),
                None => bail!("no {marker:?} on the event socket within {timeout:?}"),
            }
        }
        self.socket.set_unsubscribe(marker.as_bytes())?;
        Ok(())
    }

    fn recv_raw(&self, timeout: Duration) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        if self.socket.poll(zmq::POLLIN, ms)? == 0 {
            return Ok(None);
        }
        Ok(Some(self.socket.recv_multipart(0)?))
    }

    /// The next multipart message (kept ones first), or `None` after
    /// `timeout`.
    ///
    /// # Errors
    /// When libzmq fails.
    pub fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        match self.pending.pop_front() {
            Some(p) => Ok(Some(p)),
            None => self.recv_raw(timeout),
        }
    }
}

/// libzmq's event stream of one socket (`zmq_socket_monitor`).
pub struct Monitor {
    /// The PAIR receiving the events.
    socket: zmq::Socket,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Monitor")
    }
}

impl Monitor {
    /// Monitors every event of `socket`, which lives in `ctx`.
    ///
    /// # Errors
    /// When libzmq cannot set the monitor up.
    pub fn attach(ctx: &zmq::Context, socket: &zmq::Socket) -> anyhow::Result<Monitor> {
        let endpoint = format!("inproc://thynapse-tests-monitor-{}", unique());
        socket.monitor(&endpoint, zmq::SocketEvent::ALL as i32)?;
        let pair = ctx.socket(zmq::PAIR)?;
        pair.set_linger(0)?;
        pair.connect(&endpoint)?;
        Ok(Monitor { socket: pair })
    }

    /// The next event within `timeout`, or `None`.
    ///
    /// # Errors
    /// When libzmq fails or the event message is malformed.
    pub fn next(&self, timeout: Duration) -> anyhow::Result<Option<zmq::SocketEvent>> {
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        if self.socket.poll(zmq::POLLIN, ms)? == 0 {
            return Ok(None);
        }
        let parts = self.socket.recv_multipart(0)?;
        let head = parts.first().context("empty monitor message")?;
        let raw = head
            .get(..2)
            .context("short monitor message")?
            .try_into()
            .map(u16::from_ne_bytes)?;
        Ok(Some(zmq::SocketEvent::from_raw(raw)))
    }

    /// Waits up to `timeout` for `event`, skipping others; returns the
    /// events skipped.
    ///
    /// # Errors
    /// When `event` does not come in time (naming the events seen).
    pub fn expect(
        &self,
        event: zmq::SocketEvent,
        timeout: Duration,
    ) -> anyhow::Result<Vec<zmq::SocketEvent>> {
        self.expect_one_of(&[event], timeout).map(|(_, seen)| seen)
    }

    /// Waits up to `timeout` for any of `events`, skipping others; returns
    /// the one that came and the events skipped before it.
    ///
    /// # Errors
    /// When none comes in time (naming the events seen).
    pub fn expect_one_of(
        &self,
        events: &[zmq::SocketEvent],
        timeout: Duration,
    ) -> anyhow::Result<(zmq::SocketEvent, Vec<zmq::SocketEvent>)> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next(left)? {
                Some(e) if events.contains(&e) => return Ok((e, seen)),
                Some(e) => seen.push(e),
                None => bail!("none of {events:?} within {timeout:?}; saw {seen:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Proving that events flow
// ---------------------------------------------------------------------------

/// A publisher and an anycatch listener (with acks) on their own channel:
/// each [`FlowProbe::check`] publishes one event and requires the listener
/// to get it, intact, and ack it.
#[derive(Debug)]
pub struct FlowProbe {
    /// Publishes `probe-<n>::tick` events with confirmation.
    pub publisher: RawCell,
    /// Listens anycatch (with acks) to `probe-<n>::*`.
    pub listener: RawCell,
    /// The channel events are published on.
    channel: String,
    /// Events published so far.
    sent: u64,
}

impl FlowProbe {
    /// Joins a publisher and a listener to the transmitter at `endpoint`.
    ///
    /// # Errors
    /// When either cannot join or listen.
    pub fn join(endpoint: &str, token: Option<&str>) -> anyhow::Result<FlowProbe> {
        let n = unique();
        let mut listener = RawCell::open_with_token(endpoint, token)?;
        listener
            .hello(&format!("probe-listener-{n}"))
            .context("probe listener HELO")?;
        listener.listen(&format!("probe-{n}::*"), "any", true)?;
        let mut publisher = RawCell::open_with_token(endpoint, token)?;
        publisher
            .hello(&format!("probe-publisher-{n}"))
            .context("probe publisher HELO")?;
        Ok(FlowProbe {
            publisher,
            listener,
            channel: format!("probe-{n}::tick"),
            sent: 0,
        })
    }

    /// How many events went through.
    pub fn count(&self) -> u64 {
        self.sent
    }

    /// Publishes one event and requires: an OKAY routed to 1 service, a
    /// DLVR to the listener with the same id, channel, publisher and
    /// payload, attempt 1; then acks it.
    ///
    /// # Errors
    /// When any of that does not happen within [`REPLY_TIMEOUT`].
    pub fn check(&mut self) -> anyhow::Result<()> {
        let n = self.sent + 1;
        let payload = json!({ "n": n });
        let okay = self
            .publisher
            .publish_confirmed(&self.channel, &payload)
            .with_context(|| format!("probe event #{n}: publishing"))?;
        if okay["routed"] != 1 {
            bail!("probe event #{n}: routed {}, expected 1", okay["routed"]);
        }
        let id = okay["id"]
            .as_str()
            .with_context(|| format!("probe event #{n}: OKAY without an id: {okay}"))?
            .to_owned();
        let d = self
            .listener
            .expect_where(&format!("DLVR of probe event #{n}"), REPLY_TIMEOUT, |m| {
                m.verb == "DLVR" && m.body["id"] == id.as_str()
            })?
            .body;
        let from = self.publisher.id().to_hex();
        if d["channel"] != self.channel.as_str()
            || d["payload"] != payload
            || d["from"] != from.as_str()
            || d["attempt"] != 1
        {
            bail!("probe event #{n}: DLVR {d} does not match what was published");
        }
        self.listener.ack(&id)?;
        self.sent = n;
        Ok(())
    }

    /// Runs [`FlowProbe::check`] over and over on a thread, pausing `every`
    /// between checks, until [`BackgroundProbe::stop`].
    pub fn run_in_background(self, every: Duration) -> BackgroundProbe {
        let count = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut probe = self;
                loop {
                    probe.check()?;
                    count.store(probe.count(), Ordering::Relaxed);
                    match stopped.recv_timeout(every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return Ok(probe),
                    }
                }
            })
        };
        BackgroundProbe {
            count,
            stop,
            handle,
        }
    }
}

/// A [`FlowProbe`] checking on its own thread.
#[derive(Debug)]
pub struct BackgroundProbe {
    /// Events that went through so far.
    count: Arc<AtomicU64>,
    /// Sending (or dropping) stops the thread.
    stop: mpsc::Sender<()>,
    /// The thread; gives the probe back, or the first failure.
    handle: JoinHandle<anyhow::Result<FlowProbe>>,
}

impl BackgroundProbe {
    /// Events that went through so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `more` further events went through.
    ///
    /// # Errors
    /// When they do not within `deadline` (the probe thread stopped on a
    /// failure, or the transmitter is too slow).
    pub fn wait_for_more(&self, more: u64, deadline: Duration) -> anyhow::Result<()> {
        let target = self.count() + more;
        wait_until(
            &format!("{more} more probe events (at {})", self.count()),
            deadline,
            POLL,
            || self.count() >= target || self.handle.is_finished(),
        )?;
        if self.count() < target {
            bail!("the probe thread stopped at {} events", self.count());
        }
        Ok(())
    }

    /// Stops the thread and gives the probe back.
    ///
    /// # Errors
    /// The first check that failed.
    pub fn stop(self) -> anyhow::Result<FlowProbe> {
        let _ = self.stop.send(());
        match self.handle.join() {
            Ok(r) => r.context("the background flow probe failed"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
