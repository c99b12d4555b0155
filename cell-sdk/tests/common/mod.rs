//! Helpers shared by the tests that run against an in-process
//! transmitter: start one, connect clients, watchdogs, polling with a
//! deadline.

// Each test file uses a different subset.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use thynapse_cell::{Client, Event, Options, Subscription};
use thynapse_transmitter::{Config, Transmitter};

/// Upper bound for any one test.
pub const WATCHDOG: Duration = Duration::from_secs(20);
/// How long to wait for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(5);

pub fn config() -> Config {
    let mut c = Config::for_tests();
    c.mesh = false;
    c
}

pub fn start(config: Config) -> Transmitter {
    Transmitter::start(config).expect("transmitter starts")
}

pub async fn client(t: &Transmitter, service: &str) -> Client {
    Client::connect(t.command_endpoint(), Options::new(service))
        .await
        .expect("client connects")
}

/// Runs a test body under a watchdog. The watchdog is a thread, not a
/// tokio timer, so it fires even if something blocks the runtime (a
/// synchronous call that hangs): it then ends the process with a message.
pub async fn watchdog<F: Future<Output = ()>>(body: F) {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let name = std::thread::current().name().unwrap_or("test").to_owned();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(WATCHDOG) {
            eprintln!("watchdog: {name} still running after {WATCHDOG:?}; aborting");
            std::process::exit(101);
        }
    });
    body.await;
    let _ = done.send(());
}

/// The next event, or a panic after `PATIENCE`.
pub async fn next(sub: &mut Subscription) -> Event {
    tokio::time::timeout(PATIENCE, sub.next_event())
        .await
        .expect("an event within the deadline")
        .expect("the subscription is open")
}

/// Whether an event arrives within `wait` (for checking that none does).
pub async fn arrives_within(sub: &mut Subscription, wait: Duration) -> Option<Event> {
    tokio::time::timeout(wait, sub.next_event())
        .await
        .ok()
        .flatten()
}

/// Polls `cond` until it holds or `PATIENCE` runs out.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn metric(t: &Transmitter, name: &str) -> u64 {
    t.metrics().snapshot().get(name).copied().unwrap_or(0)
}

/// The port of a `tcp://host:port` endpoint.
pub fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a tcp endpoint with a port")
}

/// Established IPv4 TCP connections from this host to `port`, read from
/// `/proc/net/tcp`: how many sockets are connected to a transmitter's
/// event socket, without asking the SDK.
pub fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `rem_address` is `HEXADDR:HEXPORT`; state 01 is ESTABLISHED.
            fields.get(2).and_then(|remote| remote.split(':').nth(1)) == Some(port.as_str())
                && fields.get(3) == Some(&"01")
        })
        .count()
}
