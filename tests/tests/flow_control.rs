//! Flow control end to end: a cell that stops taking deliveries must cost
//! the others nothing and the transmitter bounded memory. Each test floods
//! a transmitter from a raw publisher: a real `thynapse` process, whose
//! resident memory it reads from `/proc/<pid>/status` while it runs, or an
//! in-process one, whose counters it reads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use thynapse_protocol::limits::SLOW_CONSUMER_MS;
use thynapse_tests::{
    eventually, thynapse_binary, wait_until, watchdog, FlowProbe, RawCell, RawSub,
    TransmitterProcess, POLL, REPLY_TIMEOUT, SILENCE,
};
use thynapse_transmitter::{Config, Transmitter};

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
/// How long after `started` the membership events on `members` said that
/// cell `id` of `service` left, waiting at most `within` (`None` if it
/// did not). `publisher` pings meanwhile, so that it stays welcomed.
fn left_after(
    members: &mut RawSub,
    publisher: &RawCell,
    (service, id): (&str, &str),
    started: Instant,
    within: Duration,
) -> anyhow::Result<Option<Duration>> {
    let topic = format!("MEMB {service} ");
    let end = Instant::now() + within;
    while Instant::now() < end {
        let _ = publisher.send("J PING {}");
        if let Some(parts) = members.recv(Duration::from_millis(200))? {
            let text = String::from_utf8_lossy(&parts[0]).into_owned();
            let body: Value = serde_json::from_str(
                text.strip_prefix(&topic)
                    .context("a MEMB frame of another service")?,
            )?;
            if body["event"] == "left" && body["cell"]["id"] == id {
                return Ok(Some(started.elapsed()));
            }
        }
    }
    Ok(None)
}

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
        let left = left_after(
            &mut members,
            &publisher,
            ("stuck", &stuck_id),
            started,
            Duration::from_secs(10),
        )?;
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
fn a_multicatch_cell_that_never_reads_costs_bounded_memory_and_is_removed_as_a_slow_consumer(
) -> anyhow::Result<()> {
    thynapse_binary()?;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog("flow_stuck_multicatch", DEADLINE, || {
        let t = TransmitterProcess::spawn(&[])?;
        let baseline = rss_kib(t.pid())? / 1024;
        let rss = RssSampler::start(t.pid());
        let mut members = RawSub::open(t.event_endpoint(), None)?;
        members.subscribe("MEMB watcher ")?;
        members.sync(REPLY_TIMEOUT)?;

        // A multicatch cell that keeps pinging and never reads its DEALER.
        let mut watcher = RawCell::open(t.command_endpoint())?;
        watcher.hello("watcher")?;
        watcher.listen("bulk::*", "multi", false)?;
        let watcher_id = watcher.id().to_hex();
        let watcher = Stalled::start(watcher);
        let mut probe = FlowProbe::join(t.command_endpoint(), None)?;
        probe.check()?;
        let probe = probe.run_in_background(Duration::from_millis(100));
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("publisher")?;

        let started = Instant::now();
        let flooded = flood(&mut publisher, "bulk::e", FLOOD_EVENTS, FLOOD_PAYLOAD)?;

        // Its queue stays full (the PONGs to its PINGs are refused too), so
        // the transmitter lets it go SLOW_CONSUMER_MS after the first
        // refusal: its membership ends with "left".
        let left = left_after(
            &mut members,
            &publisher,
            ("watcher", &watcher_id),
            started,
            Duration::from_millis(SLOW_CONSUMER_MS) * 3,
        )?;
        let peak = rss.peak_mib();
        let probe = probe
            .stop()
            .context("a healthy cell stopped getting its events")?;
        let counters = counters(&mut publisher)?;

        // Now it reads what reached it, then asks whether it is still
        // welcomed.
        let mut watcher = watcher.stop();
        let heads = read_until_quiet(|d| watcher.recv_parts(d))?;
        let received = heads.iter().filter(|h| h.starts_with(b"J EVNT")).count() as u64;
        let (copies, dropped) = (
            counters["multicast"].as_u64().context("multicast")?,
            counters["dropped_multicatch"]
                .as_u64()
                .context("dropped_multicatch")?,
        );
        let gbye = heads.iter().any(|h| h.starts_with(b"J GBYE"));
        let reference = watcher.next_ref();
        watcher.send_json("PING", &json!({ "ref": reference }))?;
        let pong = watcher.expect_where("PONG", REPLY_TIMEOUT, |m| {
            m.verb == "PONG" && m.body["ref"] == reference
        })?;
        let (_, per_second) = rss.stop();
        eprintln!(
            "flow_control (multicatch, never read): {FLOOD_EVENTS} events of \
             {FLOOD_PAYLOAD} B {flooded}; \
             transmitter RSS baseline {baseline} MiB, peak {peak} MiB (bound \
             {FLOOD_RSS_BOUND_MIB} MiB), per second {per_second:?}, {} MiB at the end; \
             the stuck cell left the view after {left:?}, was sent {copies} copies, \
             {dropped} of them dropped and counted, then read {received} EVNTs, a GBYE: \
             {gbye}, and its PONG says welcomed {}; {} probe events went through meanwhile",
            rss_kib(t.pid())? / 1024,
            pong.body["welcomed"],
            probe.count()
        );
        assert!(
            peak < FLOOD_RSS_BOUND_MIB,
            "the transmitter's RSS peaked at {peak} MiB, over the {FLOOD_RSS_BOUND_MIB} MiB bound"
        );
        assert!(
            dropped > 0 && received < FLOOD_EVENTS,
            "the cell that never read got all {FLOOD_EVENTS} events: the transmitter queued \
             them all for it"
        );
        assert_eq!(
            received + dropped,
            copies,
            "every copy is either queued to the cell or dropped and counted"
        );
        assert!(
            left.is_some(),
            "the stuck cell was still in the view {:?} after the flood",
            Duration::from_millis(SLOW_CONSUMER_MS) * 3
        );
        assert_eq!(pong.body["welcomed"], false, "{}", pong.body);
        Ok(())
    })
}

/// The transmitter's counters, asked with `DISC` `metrics` by `cell`.
fn counters(cell: &mut RawCell) -> anyhow::Result<Value> {
    let reference = cell.next_ref();
    cell.send_json("DISC", &json!({"what": "metrics", "ref": reference}))?;
    let okay = cell.expect_reply("OKAY", &reference)?;
    Ok(okay["result"].clone())
}

/// A multicatch cell on its own thread: takes every `J EVNT`, requires
/// the events' `n` to come in order without a gap (multicatch from one
/// publisher keeps publish order), and counts them in `received`.
fn multicatch_reader(
    mut cell: RawCell,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<RawCell>> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Some(m) = cell.recv(Duration::from_millis(100))? else {
                continue;
            };
            if m.verb != "EVNT" {
                bail!("the healthy multicatch cell got {m}");
            }
            let n = m.body["payload"]["n"].as_u64().context("payload n")?;
            let expected = received.load(Ordering::Relaxed);
            if n != expected {
                bail!("the healthy multicatch cell got event #{n} after {expected} events");
            }
            received.store(expected + 1, Ordering::Relaxed);
        }
        Ok(cell)
    })
}

#[test]
fn past_its_bound_a_stuck_multicatch_cell_loses_events_counted_and_is_removed_while_the_other_gets_all(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog("flow_multicatch_counted", DEADLINE, || {
        const EVENTS: u64 = 100_000;
        /// How far the publisher may run ahead of the healthy cell: far
        /// below the 10,000 messages the transmitter queues per cell, so
        /// the healthy cell never loses an event.
        const WINDOW: u64 = 2_000;
        /// Events published after the flood, one at a time, until the
        /// stuck cell is removed, then this many more.
        const AFTER: u64 = 5;

        // A heartbeat longer than the test: no cell needs to PING, so
        // nothing but events goes to the stuck cell.
        let t = Transmitter::start(Config {
            heartbeat: Duration::from_secs(120),
            mesh: false,
            ..Config::for_tests()
        })?;
        let metrics = t.metrics().clone();
        let mut stuck = RawCell::unconnected(None)?;
        stuck.socket().set_rcvhwm(10)?;
        stuck.socket().set_rcvbuf(4096)?;
        stuck.connect(t.command_endpoint())?;
        stuck.hello("stuck")?;
        stuck.listen("feed::*", "multi", false)?;
        let mut healthy = RawCell::open(t.command_endpoint())?;
        healthy.hello("healthy")?;
        healthy.listen("feed::*", "multi", false)?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = multicatch_reader(healthy, received.clone(), stop.clone());
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("publisher")?;

        let started = Instant::now();
        let mut first_drop = None;
        for n in 0..EVENTS {
            if n >= received.load(Ordering::Relaxed) + WINDOW {
                wait_until(
                    &format!("the healthy cell to get event #{}", n - WINDOW),
                    Duration::from_secs(20),
                    Duration::from_millis(1),
                    || received.load(Ordering::Relaxed) + WINDOW > n || reader.is_finished(),
                )?;
                if reader.is_finished() {
                    break;
                }
            }
            publisher.send(&format!(
                r#"J EVNT {{"channel":"feed::tick","payload":{{"n":{n}}}}}"#
            ))?;
            if first_drop.is_none() && metrics.dropped_multicatch.load(Ordering::Relaxed) > 0 {
                first_drop = Some(Instant::now());
            }
        }
        let published = started.elapsed();
        wait_until(
            &format!("the healthy cell to get all {EVENTS} events"),
            Duration::from_secs(20),
            POLL,
            || received.load(Ordering::Relaxed) == EVENTS || reader.is_finished(),
        )
        .with_context(|| format!("it has {}", received.load(Ordering::Relaxed)))?;
        if reader.is_finished() {
            stop.store(true, Ordering::Relaxed);
            reader.join().expect("reader thread")?;
            bail!("the healthy multicatch cell stopped");
        }
        let all_in = started.elapsed();
        // Every event was handled before this PONG: the counters are final.
        publisher.ping()?;
        let dropped = metrics.dropped_multicatch.load(Ordering::Relaxed);
        let first_drop = first_drop.context("no multicatch event was dropped in the flood")?;

        // The stuck cell stays stuck; the next events it is refused make
        // the transmitter remove it, SLOW_CONSUMER_MS after the first.
        let mut next = EVENTS;
        let mut failed = None;
        let in_time = eventually(
            Duration::from_millis(SLOW_CONSUMER_MS) * 3,
            Duration::from_millis(100),
            || {
                if metrics.slow_consumers.load(Ordering::Relaxed) > 0 {
                    return true;
                }
                match publisher.publish_confirmed("feed::tick", &json!({ "n": next })) {
                    Ok(_) => next += 1,
                    Err(e) => failed = Some(e),
                }
                failed.is_some()
            },
        );
        if let Some(e) = failed {
            return Err(e.context("publishing after the flood"));
        }
        if !in_time {
            bail!(
                "the stuck cell was not removed as a slow consumer {:?} after the flood",
                Duration::from_millis(SLOW_CONSUMER_MS) * 3
            );
        }
        let removed = first_drop.elapsed();
        assert_eq!(metrics.slow_consumers.load(Ordering::Relaxed), 1);
        // From now on only the healthy cell gets copies.
        let copies = metrics.multicast.load(Ordering::Relaxed);
        for _ in 0..AFTER {
            let okay = publisher.publish_confirmed("feed::tick", &json!({ "n": next }))?;
            assert_eq!(okay["routed"], 1, "{okay}");
            next += 1;
        }
        wait_until(
            "the healthy cell to get the events after the removal",
            REPLY_TIMEOUT,
            POLL,
            || received.load(Ordering::Relaxed) == next || reader.is_finished(),
        )?;
        stop.store(true, Ordering::Relaxed);
        drop(reader.join().expect("reader thread")?);
        assert_eq!(
            metrics.multicast.load(Ordering::Relaxed) - copies,
            AFTER,
            "copies went to the removed cell"
        );

        // Every copy for the stuck cell was either queued to it or
        // dropped and counted: it now reads exactly the ones not dropped,
        // in publish order.
        let snapshot = t.metrics().snapshot();
        let to_stuck = snapshot["multicast"] - next;
        let dropped_total = snapshot["dropped_multicatch"];
        let queued = to_stuck - dropped_total;
        let mut got = 0u64;
        let mut last = None;
        let mut gbye = None;
        let end = Instant::now() + Duration::from_secs(20);
        while got < queued {
            let left = end.saturating_duration_since(Instant::now());
            let Some(m) = stuck.recv(left)? else {
                bail!("the stuck cell read {got} EVNTs, {queued} were queued to it");
            };
            match m.verb.as_str() {
                "EVNT" => {
                    let n = m.body["payload"]["n"].as_u64().context("payload n")?;
                    assert!(last < Some(n), "event #{n} after #{last:?}");
                    last = Some(n);
                    got += 1;
                }
                "GBYE" => gbye = Some(m.body),
                _ => bail!("the stuck cell got {m}"),
            }
        }
        while let Some(m) = stuck.recv(SILENCE)? {
            match m.verb.as_str() {
                "GBYE" => gbye = Some(m.body),
                _ => bail!("the stuck cell got {m} after the {queued} EVNTs queued to it"),
            }
        }
        let reference = stuck.next_ref();
        stuck.send_json("PING", &json!({ "ref": reference }))?;
        let pong = stuck.expect_reply("PONG", &reference)?;
        eprintln!(
            "flow_control (multicatch, counted): {EVENTS} events published in {published:.1?}, \
             all at the healthy cell after {all_in:.1?}; the stuck cell was sent {to_stuck} \
             copies: {queued} queued to it, {dropped_total} dropped and counted \
             ({dropped} by the end of the flood; dropped_hwm {}); removed as a slow \
             consumer {removed:.1?} after the first drop, GBYE seen: {gbye:?}",
            snapshot["dropped_hwm"]
        );
        assert!(dropped > 0 && queued < EVENTS, "nothing was dropped");
        assert!(
            snapshot["dropped_hwm"] >= dropped_total,
            "dropped_multicatch is part of dropped_hwm: {snapshot:?}"
        );
        assert!(
            removed >= Duration::from_millis(SLOW_CONSUMER_MS - 500),
            "removed {removed:?} after the first drop, before SLOW_CONSUMER_MS"
        );
        if let Some(g) = gbye {
            assert_eq!(g["reason"], "slow_consumer", "{g}");
        }
        assert_eq!(pong["welcomed"], false, "{pong}");
        Ok(())
    })
}
