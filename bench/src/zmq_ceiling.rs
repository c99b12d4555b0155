//! Raw libzmq DEALER→ROUTER throughput over loopback TCP: the transport's
//! ceiling. No broker, no framing of ours: one DEALER thread sends
//! `payload`-byte messages as fast as libzmq takes them, one ROUTER thread
//! receives them. Each side has its own context (its own I/O thread), as two
//! processes would.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::payload;
use crate::report::{Report, Tally};

/// Runs the ceiling measurement.
///
/// # Errors
/// When a socket cannot be created, bound or connected.
pub fn run(payload_size: usize, msgs: u64, deadline: Duration) -> anyhow::Result<Report> {
    let rctx = zmq::Context::new();
    let router = rctx.socket(zmq::ROUTER)?;
    router.set_rcvhwm(100_000)?;
    router.bind("tcp://127.0.0.1:*")?;
    let endpoint = router
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))?;

    let sender = std::thread::spawn(move || -> anyhow::Result<Duration> {
        let sctx = zmq::Context::new();
        let dealer = sctx.socket(zmq::DEALER)?;
        dealer.set_linger(1000)?;
        dealer.connect(&endpoint)?;
        // A hello first, so the connection is up before the clock starts.
        dealer.send("hello", 0)?;
        let mut p = payload::template(payload_size);
        let begin = Instant::now();
        for seq in 0..msgs {
            if begin.elapsed() > deadline {
                break;
            }
            payload::stamp(&mut p, seq);
            dealer.send(&p[..], 0)?;
        }
        let took = begin.elapsed();
        // Dropping the socket lingers up to 1 s to flush what is queued.
        drop(dealer);
        Ok(took)
    });

    let mut tally = Tally::new(msgs);
    let mut id = zmq::Message::new();
    let mut body = zmq::Message::new();
    router.set_rcvtimeo(5000)?;
    router.recv(&mut id, 0).context("waiting for the hello")?;
    router.recv(&mut body, 0)?;
    let begin = Instant::now();
    router.set_rcvtimeo(1000)?;
    let mut received = 0;
    let mut last = begin;
    while received < msgs && begin.elapsed() < deadline {
        if router.recv(&mut id, 0).is_err() {
            break;
        }
        router.recv(&mut body, 0)?;
        tally.record(payload::seq_of(&body));
        received += 1;
        last = Instant::now();
    }
    let publish = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;

    let mut r = Report::new("zmq", "dealer_router");
    r.payload = payload_size;
    r.cells = 1;
    r.msgs = msgs;
    r.delivered = received;
    r.secs = (last - begin).as_secs_f64();
    r.msgs_per_sec = if r.secs > 0.0 {
        received as f64 / r.secs
    } else {
        0.0
    };
    r.publish_secs = publish.as_secs_f64();
    (r.lost, r.dup) = tally.lost_dup(1);
    Ok(r)
}
