//! Flow control end to end: a cell that stops taking deliveries must cost
//! the others nothing and the transmitter bounded memory. Each test floods
//! a real `thynapse` process from a raw publisher and reads the process's
//! resident memory from `/proc/<pid>/status` while it runs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use thynapse_tests::{
    thynapse_binary, wait_until, watchdog, FlowProbe, RawCell, RawSub, TransmitterProcess, POLL,
    REPLY_TIMEOUT,
};

/// Whole-test deadline: 100,000 and 200,000 events through a debug build
/// on a shared 2-core machine take a while; a test fails, it never hangs.
const DEADLINE: Duration = Duration::from_secs(60);

/// How often a kept-alive cell pings (the default heartbeat is 1 s, a cell
/// is expired after 3 s of silence).
const KEEPALIVE: Duration = Duration::from_millis(250);

/// The resident memory of process `pid`, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .context("no VmRSS line")
}

/// Samples a process's resident memory every 20 ms on a thread, keeping
/// the peak and one sample per second (for the record).
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut per_second = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                        if started.elapsed().as_secs() >= per_second.len() as u64 {
                            per_second.push(kib / 1024);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                per_second
            })
        };
        RssSampler { peak, stop, handle }
    }

    /// The peak so far, in MiB.
    fn peak_mib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) / 1024
    }

    /// Stops sampling; returns the peak and the samples, in MiB.
    fn stop(self) -> (u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let RssSampler { peak, handle, .. } = self;
        let per_second = handle.join().unwrap_or_default();
        (peak.load(Ordering::Relaxed) / 1024, per_second)
    }
}

/// A cell kept alive by a thread that pings it every [`KEEPALIVE`] and
/// never reads its socket: a consumer that is stuck but not dead.
struct Stalled {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<RawCell>,
}

impl Stalled {
    fn start(cell: RawCell) -> Stalled {
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(KEEPALIVE) {
                // Best effort: a full pipe must not end the keepalive.
                let _ = cell.socket().send("J PING {}", zmq::DONTWAIT);
            }
            cell
        });
        Stalled { stop, handle }
    }

    /// Stops pinging and gives the cell back.
    fn stop(self) -> RawCell {
        let _ = self.stop.send(());
        match self.handle.join() {
            Ok(cell) => cell,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// A cell of `service` listening anycatch to `pattern` with `extra` LSTN
/// fields (`ack`, `concurrency`).
fn listener(
    t: &TransmitterProcess,
    service: &str,
    pattern: &str,
    extra: Value,
) -> anyhow::Result<RawCell> {
    let mut c = RawCell::open(t.command_endpoint())?;
    c.hello(service)?;
    let reference = c.next_ref();
    let mut body = json!({"pattern": pattern, "mode": "any", "ref": reference});
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    c.send_json("LSTN", &body)?;
    c.expect_reply("OKAY", &reference)?;
    Ok(c)
}

/// PING and wait up to `timeout` for the PONG: everything `cell` sent
/// before was handled. Returns how long it took.
fn ping_within(cell: &mut RawCell, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let reference = cell.next_ref();
    cell.send_json("PING", &json!({ "ref": reference }))?;
    cell.expect_where("PONG", timeout, |m| {
        m.verb == "PONG" && m.body["ref"] == reference
    })?;
    Ok(started.elapsed())
}

/// `J EVNT` frames of exactly `size` bytes of payload JSON, numbered `n`.
fn event_frame(channel: &str, n: u64, size: usize) -> String {
    let head = format!(r#"{{"n":{n},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let payload = format!("{head}{}\"}}", "x".repeat(pad));
    debug_assert_eq!(payload.len(), size);
    format!(r#"J EVNT {{"channel":"{channel}","payload":{payload}}}"#)
}

/// How a flood went.
struct Flood {
    /// Until the last event was queued by the publisher.
    published: Duration,
    /// Until the transmitter had handled them all (the publisher's PONG).
    handled: Duration,
    /// The longest time the publisher could queue nothing: the
    /// transmitter took nothing from it meanwhile.
    longest_stall: Duration,
}

/// Publishes `events` events of `payload` bytes on `channel` as fast as
/// `publisher` can (waiting whenever its queue is full: that is the
/// transmitter pushing back), then waits for its PONG.
fn flood(
    publisher: &mut RawCell,
    channel: &str,
    events: u64,
    payload: usize,
) -> anyhow::Result<Flood> {
    /// The longest the publisher waits to queue one event.
    const STALL: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let mut longest_stall = Duration::ZERO;
    for n in 0..events {
        let frame = event_frame(channel, n, payload);
        let waiting = Instant::now();
        if publisher
            .socket()
            .poll(zmq::POLLOUT, STALL.as_millis() as i64)?
            == 0
        {
            bail!(
                "publishing event #{n}, {:?} into the flood: the transmitter took nothing \
                 from the publisher for {STALL:?}",
                started.elapsed()
            );
        }
        longest_stall = longest_stall.max(waiting.elapsed());
        publisher.socket().send(frame.as_bytes(), zmq::DONTWAIT)?;
    }
    let published = started.elapsed();
    ping_within(publisher, Duration::from_secs(40))
        .context("the transmitter had not handled the flood 40 s after the last event")?;
    Ok(Flood {
        published,
        handled: started.elapsed(),
        longest_stall,
    })
}

impl std::fmt::Display for Flood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published in {:.1?}, handled after {:.1?}, the publisher waited up to {:.1?} at once",
            self.published, self.handled, self.longest_stall
        )
    }
}

/// What the healthy cell saw, per event number.
struct Tally {
    /// Deliveries of each event (0, 1, or more for a duplicate).
    seen: Vec<AtomicU8>,
    /// Distinct events delivered.
    distinct: AtomicU64,
    /// Deliveries with attempt > 1.
    redelivered: AtomicU64,
    /// Deliveries of an event that had arrived already.
    duplicates: AtomicU64,
}

impl Tally {
    fn new(events: u64) -> Arc<Tally> {
        Arc::new(Tally {
            seen: (0..events).map(|_| AtomicU8::new(0)).collect(),
            distinct: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        })
    }

    fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }
}

/// A healthy cell on its own thread: takes every delivery, acks in
/// batches, pings when idle, and counts into a [`Tally`].
fn healthy(
    mut cell: RawCell,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let mut batch: Vec<Value> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some(first) = cell.recv(Duration::from_millis(100))? else {
                cell.send("J PING {}")?;
                continue;
            };
            let mut next = Some(first);
            while let Some(m) = next {
                match m.verb.as_str() {
                    "DLVR" => {
                        let n = m.body["payload"]["n"].as_u64().context("payload n")?;
                        let slot = tally.seen.get(n as usize).context("n out of range")?;
                        if slot.fetch_add(1, Ordering::Relaxed) == 0 {
                            tally.distinct.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        if m.body["attempt"] != 1 {
                            tally.redelivered.fetch_add(1, Ordering::Relaxed);
                        }
                        batch.push(m.body["id"].clone());
                    }
                    "PONG" => {}
                    _ => bail!("the healthy cell got {m}"),
                }
                next = if batch.len() < 512 {
                    cell.recv(Duration::ZERO)?
                } else {
                    None
                };
            }
            if !batch.is_empty() {
                cell.send_json("ACKN", &json!({ "ids": batch }))?;
                batch.clear();
            }
        }
        Ok(())
    })
}

#[test]
fn a_stalled_cell_does_not_slow_the_healthy_cell_of_its_service_and_memory_stays_bounded(
) -> anyhow::Result<()> {
    thynapse_binary()?;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog("flow_stalled_cell", DEADLINE, || {
        const EVENTS: u64 = 100_000;
        const PAYLOAD: usize = 128;
        /// Deliveries the stalled cell takes at once.
        const STALLED_CONCURRENCY: u64 = 5;
        /// The transmitter's resident memory must stay under this: the
        /// whole stream is 100,000 × 128 B = 12 MiB of payload.
        const RSS_BOUND_MIB: u64 = 150;

        // An ack timeout longer than the test: what the stalled cell is
        // given must not come back by redelivery after a timeout, it must
        // not be given to it in the first place.
        let t = TransmitterProcess::spawn(&["--ack-timeout-ms", "120000"])?;
        let baseline = rss_kib(t.pid())? / 1024;
        let rss = RssSampler::start(t.pid());

        let tally = Tally::new(EVENTS);
        let stop = Arc::new(AtomicBool::new(false));
        let good = listener(&t, "alpha", "alpha::*", json!({"ack": true}))?;
        let stalled = listener(
            &t,
            "alpha",
            "alpha::*",
            json!({"ack": true, "concurrency": STALLED_CONCURRENCY}),
        )?;
        let stalled = Stalled::start(stalled);
        let good = healthy(good, tally.clone(), stop.clone());
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("publisher")?;

        let started = Instant::now();
        let flooded = flood(&mut publisher, "alpha::e", EVENTS, PAYLOAD)?;

        // The stalled cell holds at most its concurrency; the healthy one
        // gets everything else, while the stalled one is still there.
        let healthy_share = EVENTS - STALLED_CONCURRENCY;
        let waited = wait_until(
            &format!("the healthy cell to get {healthy_share} of {EVENTS} events"),
            Duration::from_secs(20),
            POLL,
            || {
                let _ = publisher.send("J PING {}");
                tally.distinct() >= healthy_share || good.is_finished()
            },
        );
        let before_drop = tally.distinct();
        let all_but_stalled = started.elapsed();
        eprintln!(
            "flow_control: {EVENTS} events of {PAYLOAD} B {flooded}; the healthy cell had \
             {before_drop} after {all_but_stalled:?}; \
             transmitter RSS baseline {baseline} MiB, peak so far {} MiB",
            rss.peak_mib()
        );
        if good.is_finished() {
            stop.store(true, Ordering::Relaxed);
            good.join().expect("healthy thread")?;
            bail!("the healthy cell stopped");
        }
        // The stalled cell goes away (it is expired 3 s after its last
        // PING): what it held comes to the healthy one.
        drop(stalled.stop());
        let dropped = Instant::now();
        wait_until(
            "every event to reach the healthy cell after the stalled one left",
            Duration::from_secs(20),
            POLL,
            || {
                let _ = publisher.send("J PING {}");
                tally.distinct() == EVENTS
            },
        )
        .with_context(|| format!("the healthy cell has {}", tally.distinct()))?;
        let moved = dropped.elapsed();
        stop.store(true, Ordering::Relaxed);
        good.join().expect("healthy thread")?;
        let (peak, per_second) = rss.stop();
        let redelivered = tally.redelivered.load(Ordering::Relaxed);
        eprintln!(
            "flow_control: all {EVENTS} at the healthy cell {moved:?} after the stalled one \
             left ({redelivered} redelivered); transmitter RSS peak {peak} MiB \
             (bound {RSS_BOUND_MIB} MiB), per second {per_second:?}"
        );
        if let Err(e) = waited {
            bail!(
                "{e}: it got {before_drop}, so the stalled cell (concurrency \
                 {STALLED_CONCURRENCY}) was given {} events that waited for it until it left \
                 ({redelivered} were redelivered then)",
                EVENTS - before_drop,
            );
        }
        assert_eq!(tally.duplicates.load(Ordering::Relaxed), 0, "duplicates");
        assert!(
            redelivered <= STALLED_CONCURRENCY,
            "{redelivered} events were redelivered; the stalled cell held at most \
             {STALLED_CONCURRENCY}"
        );
        assert!(
            peak < RSS_BOUND_MIB,
            "the transmitter's RSS peaked at {peak} MiB, over the {RSS_BOUND_MIB} MiB bound"
        );
        Ok(())
    })
}

/// What a flood of big events may cost the transmitter. It queues at most
/// `DEFAULT_HWM` messages per connection in each direction (10,000 at this
/// writing): with 1 KiB events, at most about 3 KiB each as libzmq holds
/// them (its receive buffers are shared by several messages), one stuck
/// receiver plus one publisher that outruns the router pin some 60 MiB.
/// With the baseline and room to spare: 150 MiB. Holding the whole flood
/// (200,000 events, over 200 MiB of payload) would exceed it.
const FLOOD_RSS_BOUND_MIB: u64 = 150;
/// Events in a flood.
const FLOOD_EVENTS: u64 = 200_000;
/// Payload of each flood event, in bytes.
const FLOOD_PAYLOAD: usize = 1024;

/// Reads `recv` until it yields nothing for 1 s (nothing more is on its
/// way: the publisher is done and the transmitter handled everything),
/// counting messages by their first bytes. No PING barrier: a PONG into a
/// full queue would be dropped like the events.
fn read_until_quiet(
    mut recv: impl FnMut(Duration) -> anyhow::Result<Option<Vec<Vec<u8>>>>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut heads = Vec::new();
    while let Some(parts) = recv(Duration::from_secs(1))? {
        heads.push(parts[0].get(..12).unwrap_or(&parts[0]).to_vec());
        if Instant::now() > end {
            bail!("still reading after 30 s ({} messages)", heads.len());
        }
    }
    Ok(heads)
}

/// Serializes the floods of this file: two at once on 2 cores would
/// measure each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_consumer_that_never_reads_its_unacked_deliveries_costs_bounded_memory() -> anyhow::Result<()> {
    thynapse_binary()?;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog("flow_stuck_consumer", DEADLINE, || {
        let t = TransmitterProcess::spawn(&[])?;
        let baseline = rss_kib(t.pid())? / 1024;
        let rss = RssSampler::start(t.pid());
        let mut members = RawSub::open(t.event_endpoint(), None)?;
        members.subscribe("MEMB stuck ")?;
        members.sync(REPLY_TIMEOUT)?;

        let stuck = listener(&t, "stuck", "bulk::*", json!({"ack": false}))?;
        let stuck_id = stuck.id().to_hex();
        let stuck = Stalled::start(stuck);
        let mut probe = FlowProbe::join(t.command_endpoint(), None)?;
        probe.check()?;
        // Others are served all along: a probe event every 100 ms must
        // go through within 5 s, flood or not.
        let probe = probe.run_in_background(Duration::from_millis(100));
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("publisher")?;

        let started = Instant::now();
        let flooded = flood(&mut publisher, "bulk::e", FLOOD_EVENTS, FLOOD_PAYLOAD)?;

        // Did the transmitter let the stuck cell go? Its membership ends
        // with "left" if it did.
        let mut left = None;
        let end = Instant::now() + Duration::from_secs(10);
        while left.is_none() && Instant::now() < end {
            let _ = publisher.send("J PING {}");
            if let Some(parts) = members.recv(Duration::from_millis(200))? {
                let text = String::from_utf8_lossy(&parts[0]).into_owned();
                let body: Value = serde_json::from_str(
                    text.strip_prefix("MEMB stuck ")
                        .context("a MEMB frame of another service")?,
                )?;
                if body["event"] == "left" && body["cell"]["id"] == stuck_id.as_str() {
                    left = Some(started.elapsed());
                }
            }
        }
        let peak = rss.peak_mib();
        let probe = probe
            .stop()
            .context("a healthy cell stopped getting its events")?;

        // Now the stuck cell reads what reached it, then asks whether it
        // is still welcomed.
        let mut stuck = stuck.stop();
        let heads = read_until_quiet(|d| stuck.recv_parts(d))?;
        let delivered = heads.iter().filter(|h| h.starts_with(b"J DLVR")).count() as u64;
        let gbye = heads.iter().any(|h| h.starts_with(b"J GBYE"));
        let reference = stuck.next_ref();
        stuck.send_json("PING", &json!({ "ref": reference }))?;
        let pong = stuck.expect_where("PONG", REPLY_TIMEOUT, |m| {
            m.verb == "PONG" && m.body["ref"] == reference
        })?;
        let (_, per_second) = rss.stop();
        eprintln!(
            "flow_control (ack-less anycatch, never read): {FLOOD_EVENTS} events of \
             {FLOOD_PAYLOAD} B {flooded}; \
             transmitter RSS baseline {baseline} MiB, peak {peak} MiB (bound \
             {FLOOD_RSS_BOUND_MIB} MiB), per second {per_second:?}, {} MiB at the end; \
             the stuck cell left the view after {left:?}, then read {delivered} DLVRs ({} \
             missed), a GBYE: {gbye}, and its PONG says welcomed {}; {} probe events went \
             through meanwhile",
            rss_kib(t.pid())? / 1024,
            FLOOD_EVENTS - delivered,
            pong.body["welcomed"],
            probe.count()
        );
        assert!(
            peak < FLOOD_RSS_BOUND_MIB,
            "the transmitter's RSS peaked at {peak} MiB, over the {FLOOD_RSS_BOUND_MIB} MiB bound"
        );
        assert!(
            left.is_some() || delivered < FLOOD_EVENTS,
            "the stuck cell was neither disconnected nor did it miss any event"
        );
        Ok(())
    })
}

#[test]
fn a_subscriber_that_never_reads_multicatch_events_costs_bounded_memory_and_loses_events(
) -> anyhow::Result<()> {
    thynapse_binary()?;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog("flow_stuck_subscriber", DEADLINE, || {
        let t = TransmitterProcess::spawn(&[])?;
        let baseline = rss_kib(t.pid())? / 1024;
        let rss = RssSampler::start(t.pid());

        // A multicatch cell: its LSTN makes the transmitter publish the
        // channel; its SUB never reads.
        let mut watcher = RawCell::open(t.command_endpoint())?;
        watcher.hello("watcher")?;
        let mut sub = RawSub::open(t.event_endpoint(), None)?;
        sub.subscribe("EVNT bulk::")?;
        sub.sync(REPLY_TIMEOUT)?;
        watcher.listen("bulk::*", "multi", true)?;
        let watcher = Stalled::start(watcher);
        let mut probe = FlowProbe::join(t.command_endpoint(), None)?;
        probe.check()?;
        let probe = probe.run_in_background(Duration::from_millis(100));
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("publisher")?;

        let flooded = flood(&mut publisher, "bulk::e", FLOOD_EVENTS, FLOOD_PAYLOAD)?;
        let peak = rss.peak_mib();
        let probe = probe
            .stop()
            .context("a healthy cell stopped getting its events")?;

        let heads = read_until_quiet(|d| sub.recv(d))?;
        let received = heads
            .iter()
            .filter(|h| h.starts_with(b"EVNT bulk::"))
            .count() as u64;
        // The subscriber still works: the next event reaches it.
        let okay = publisher.publish_confirmed("bulk::after", &json!({"after": true}))?;
        assert_eq!(okay["routed"], 1, "{okay}");
        let (channel, body) = sub.expect_event(REPLY_TIMEOUT)?;
        assert_eq!(
            (channel.as_str(), &body["payload"]),
            ("bulk::after", &json!({"after": true}))
        );
        drop(watcher.stop());
        let (_, per_second) = rss.stop();
        eprintln!(
            "flow_control (multicatch, SUB never read): {FLOOD_EVENTS} events of \
             {FLOOD_PAYLOAD} B {flooded}; \
             transmitter RSS baseline {baseline} MiB, peak {peak} MiB (bound \
             {FLOOD_RSS_BOUND_MIB} MiB), per second {per_second:?}, {} MiB at the end; the \
             SUB then read {received} events ({} lost); {} probe events went through \
             meanwhile",
            rss_kib(t.pid())? / 1024,
            FLOOD_EVENTS - received,
            probe.count()
        );
        assert!(
            peak < FLOOD_RSS_BOUND_MIB,
            "the transmitter's RSS peaked at {peak} MiB, over the {FLOOD_RSS_BOUND_MIB} MiB bound"
        );
        assert!(
            received < FLOOD_EVENTS,
            "the SUB that never read got all {FLOOD_EVENTS} events ({received}): the \
             transmitter queued them all for it"
        );
        Ok(())
    })
}
