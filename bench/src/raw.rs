//! A Thynapse client on raw libzmq frames, independent of the cell SDK: it
//! speaks PROTOCOL.md's `J VERB {json}` frames directly and acks in
//! batches (`ACKN {"ids":[...]}`, flushed when the socket has nothing more
//! to read or 64 ids are pending). It shows what the transmitter can move
//! when the client costs as little as possible; the SDK runs show what
//! users get.
//!
//! Each cell is a thread with its own libzmq context (its own I/O thread),
//! as separate processes would have; the publisher likewise. A cell has one
//! socket, its DEALER: deliveries, requests and multicatch events (`J EVNT`,
//! each cell its own copy) all come there.
//!
//! Batches (PROTOCOL.md §23): the cells say HELO with `batch` and
//! `packed` true and take `DLVR`/`EVNT` frames with an array of
//! deliveries, their binary payloads packed in one frame (each element's
//! `bin` its length) or, as the transmitter sends a batch of one, one
//! binary frame each; the publisher sends [`PUBLISH_BATCH`] events per
//! `EVNT` frame, as a client that has many events ready at once would,
//! packed when the transmitter's `WLCM` says it takes packed batches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use thynapse_protocol::{frame, Thid, Verb};

use crate::payload;
use crate::procfs::{self, CpuMark};
use crate::report::{wait_for_deliveries, Answers, Report, RunClock, Tally};
use crate::{Load, Scenario};

/// The channel every run publishes on (throughput runs add `::<tag>`, see
/// [`crate::run_tag`]).
pub const CHANNEL: &str = "bench::events";
/// The service of the listening cells (throughput runs add `-<tag>`).
pub const CELL_SERVICE: &str = "bench-cells";
/// The service of the publisher.
pub const PUBLISHER_SERVICE: &str = "bench-publisher";
/// Most ids in one ACKN.
pub const ACK_BATCH: usize = 64;
/// Events per `EVNT` batch the publisher sends.
pub const PUBLISH_BATCH: u64 = 64;
/// How often an otherwise silent client pings (the transmitter expires a
/// cell after 3 silent heartbeats, 1 s each by default).
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// Receive high-water mark of a multicatch cell's DEALER, in messages (the
/// SDK's sockets have the same): the transmitter drops, and counts, the
/// events of a cell beyond what its own queue, this and the TCP buffers
/// hold.
pub const MULTICATCH_RCVHWM: i32 = 100_000;
/// How long to wait for a reply during setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A welcomed connection.
struct Joined {
    dealer: zmq::Socket,
    /// The transmitter's `WLCM` says `"packed":true`: it takes packed
    /// batches (PROTOCOL.md §23).
    packed: bool,
}

fn send_cmd(s: &zmq::Socket, verb: Verb, body: &str) -> anyhow::Result<()> {
    s.send(frame::encode(verb, body.as_bytes()), 0)?;
    Ok(())
}

/// Receives until a frame with `verb` arrives; an ERRR is an error.
fn expect(s: &zmq::Socket, verb: Verb) -> anyhow::Result<Vec<u8>> {
    let until = Instant::now() + SETUP_TIMEOUT;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no {verb} within {SETUP_TIMEOUT:?}");
        }
        if s.poll(zmq::POLLIN, left.as_millis() as i64)? == 0 {
            continue;
        }
        let parts = s.recv_multipart(0)?;
        let Some(first) = parts.first() else { continue };
        let Ok(f) = frame::decode(first) else {
            continue;
        };
        if f.verb == verb {
            return Ok(f.body.to_vec());
        }
        if f.verb == Verb::ERRR {
            bail!(
                "{verb} expected, got ERRR {}",
                String::from_utf8_lossy(f.body)
            );
        }
    }
}

/// Connects a DEALER (with `rcvhwm` when given, else libzmq's default)
/// and says HELO, taking batches, packed or not.
fn join(
    ctx: &zmq::Context,
    command: &str,
    service: &str,
    rcvhwm: Option<i32>,
) -> anyhow::Result<Joined> {
    let dealer = ctx.socket(zmq::DEALER)?;
    dealer.set_linger(1000)?;
    if let Some(hwm) = rcvhwm {
        dealer.set_rcvhwm(hwm)?;
    }
    dealer
        .connect(command)
        .with_context(|| format!("connecting to {command}"))?;
    let id = Thid::random();
    send_cmd(
        &dealer,
        Verb::HELO,
        &format!(r#"{{"id":"{id}","service":"{service}","batch":true,"packed":true}}"#),
    )?;
    let welcome: serde_json::Value = serde_json::from_slice(&expect(&dealer, Verb::WLCM)?)?;
    let packed = welcome.get("packed") == Some(&serde_json::Value::Bool(true));
    Ok(Joined { dealer, packed })
}

/// The id of a DLVR body, which the transmitter writes first:
/// `{"id":"<40 hex>",...`.
fn delivery_id(body: &[u8]) -> Option<&[u8]> {
    let rest = body.strip_prefix(br#"{"id":""#)?;
    rest.get(..40)
}

/// The `bin` of an element of a packed batch, which the transmitter writes
/// last: `{...,"bin":<n>}`. `None` when the element has none.
fn packed_len(element: &[u8]) -> Option<usize> {
    let rest = element.strip_suffix(b"}")?;
    let digits = rest.len() - rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let key = rest[..digits].strip_suffix(br#""bin":"#)?;
    if digits == rest.len() || !matches!(key.last(), Some(b',' | b'{')) {
        return None;
    }
    std::str::from_utf8(&rest[digits..]).ok()?.parse().ok()
}

struct CellLoop {
    join: Joined,
    ack: bool,
    tally: Tally,
    pending: Vec<u8>,
    pending_n: usize,
    last_sent: Instant,
    errors: u64,
}

impl CellLoop {
    fn flush_acks(&mut self) -> anyhow::Result<()> {
        if self.pending_n == 0 {
            return Ok(());
        }
        self.pending.extend_from_slice(b"]}");
        self.join.dealer.send(&self.pending[..], 0)?;
        self.pending.clear();
        self.pending.extend_from_slice(br#"J ACKN {"ids":["#);
        self.pending_n = 0;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// One delivery: its binary frame carries the sequence number.
    fn on_delivery(&mut self, body: &[u8], binary: Option<&[u8]>) -> anyhow::Result<()> {
        self.tally.record(binary.and_then(payload::seq_of));
        if self.ack {
            if let Some(id) = delivery_id(body) {
                if self.pending_n > 0 {
                    self.pending.push(b',');
                }
                self.pending.push(b'"');
                self.pending.extend_from_slice(id);
                self.pending.push(b'"');
                self.pending_n += 1;
                if self.pending_n >= ACK_BATCH {
                    self.flush_acks()?;
                }
            }
        }
        Ok(())
    }

    fn on_command(&mut self, parts: &[Vec<u8>], clock: &RunClock) -> anyhow::Result<()> {
        let Some(Ok(f)) = parts.first().map(|p| frame::decode(p)) else {
            return Ok(());
        };
        match f.verb {
            Verb::DLVR | Verb::EVNT if f.body.first() == Some(&b'[') => {
                let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(f.body)?;
                // Packed: one binary frame, element k's payload the `bin`
                // bytes after those before it. Else one frame each.
                let packed = parts.get(1).filter(|_| {
                    items
                        .first()
                        .is_some_and(|e| packed_len(e.get().as_bytes()).is_some())
                });
                let mut at = 0usize;
                for (i, item) in items.iter().enumerate() {
                    let body = item.get().as_bytes();
                    let binary = match packed {
                        Some(all) => packed_len(body).and_then(|n| {
                            let end = at.checked_add(n)?;
                            let one = all.get(at..end);
                            at = end;
                            one
                        }),
                        None => parts.get(1 + i).map(Vec::as_slice),
                    };
                    self.on_delivery(body, binary)?;
                }
                clock.delivered_now(items.len() as u64);
            }
            Verb::DLVR | Verb::EVNT => {
                self.on_delivery(f.body, parts.get(1).map(Vec::as_slice))?;
                clock.delivered_now(1);
            }
            Verb::ERRR => {
                if self.errors == 0 {
                    eprintln!("cell got ERRR {}", String::from_utf8_lossy(f.body));
                }
                self.errors += 1;
            }
            _ => {}
        }
        Ok(())
    }

    fn run(mut self, clock: &RunClock, stop: &AtomicBool) -> anyhow::Result<Tally> {
        while !stop.load(Ordering::Relaxed) {
            if self.join.dealer.poll(zmq::POLLIN, 50)? > 0 {
                for _ in 0..1024 {
                    match self.join.dealer.recv_multipart(zmq::DONTWAIT) {
                        Ok(parts) => self.on_command(&parts, clock)?,
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                self.flush_acks()?;
            }
            if self.last_sent.elapsed() >= PING_EVERY {
                send_cmd(&self.join.dealer, Verb::PING, "{}")?;
                self.last_sent = Instant::now();
            }
        }
        let _ = send_cmd(&self.join.dealer, Verb::GBYE, "{}");
        Ok(self.tally)
    }
}

fn setup_cell(
    command: &str,
    scenario: Scenario,
    msgs: u64,
    channel: &str,
    service: &str,
) -> anyhow::Result<CellLoop> {
    let ctx = zmq::Context::new();
    let listen = match scenario {
        Scenario::AnycatchNoack | Scenario::AnycatchAck => {
            let ack = scenario == Scenario::AnycatchAck;
            format!(r#"{{"pattern":"{channel}","mode":"any","ack":{ack}}}"#)
        }
        Scenario::Multicatch => format!(r#"{{"pattern":"{channel}","mode":"multi"}}"#),
    };
    let rcvhwm = (scenario == Scenario::Multicatch).then_some(MULTICATCH_RCVHWM);
    let join = join(&ctx, command, service, rcvhwm)?;
    // Once OKAY is in, every later event reaches this DEALER.
    send_cmd(&join.dealer, Verb::LSTN, &listen)?;
    expect(&join.dealer, Verb::OKAY)?;
    // Each socket holds its context, so dropping this handle is fine.
    drop(ctx);
    Ok(CellLoop {
        join,
        ack: scenario == Scenario::AnycatchAck,
        tally: Tally::new(msgs),
        pending: br#"J ACKN {"ids":["#.to_vec(),
        pending_n: 0,
        last_sent: Instant::now(),
        errors: 0,
    })
}

/// Runs one throughput scenario against the transmitter whose command
/// socket is `command`.
///
/// # Errors
/// When a cell cannot join or listen, or a socket fails.
pub fn run(command: &str, scenario: Scenario, load: &Load) -> anyhow::Result<Report> {
    let begin = Instant::now();
    let clock = Arc::new(RunClock::new());
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(load.cells + 1));
    let tag = crate::run_tag();
    let channel = format!("{CHANNEL}::{tag}");
    let service = format!("{CELL_SERVICE}-{tag}");
    let mut cells = Vec::new();
    for _ in 0..load.cells {
        let (command, clock, stop, ready, msgs, channel, service) = (
            command.to_owned(),
            clock.clone(),
            stop.clone(),
            ready.clone(),
            load.msgs,
            channel.clone(),
            service.clone(),
        );
        cells.push(std::thread::spawn(move || -> anyhow::Result<Tally> {
            let cell = setup_cell(&command, scenario, msgs, &channel, &service);
            ready.wait();
            cell?.run(&clock, &stop)
        }));
    }
    ready.wait();

    let pctx = zmq::Context::new();
    let publisher = join(
        &pctx,
        load.publish_to.as_deref().unwrap_or(command),
        PUBLISHER_SERVICE,
        None,
    )?;
    std::thread::sleep(load.settle);
    let published = Arc::new(AtomicBool::new(false));
    let mark = CpuMark::now(load.server_pid);
    let pub_thread = {
        let (published, clock, stop, msgs, size, deadline) = (
            published.clone(),
            clock.clone(),
            stop.clone(),
            load.msgs,
            load.payload,
            load.deadline,
        );
        std::thread::spawn(move || -> anyhow::Result<(u64, Duration)> {
            let p = payload::template(size);
            // Packed (PROTOCOL.md §23): `bin` last, the shape the
            // transmitter reads fastest, and one frame for the batch.
            let event = if publisher.packed {
                format!(r#"{{"channel":"{channel}","bin":{}}}"#, p.len())
            } else {
                format!(r#"{{"channel":"{channel}"}}"#)
            };
            let head = |n: u64| {
                let events = vec![event.as_str(); n as usize].join(",");
                frame::encode(Verb::EVNT, format!("[{events}]").as_bytes())
            };
            let full = head(PUBLISH_BATCH);
            let mut batch = p.repeat(PUBLISH_BATCH as usize);
            clock.restart();
            let t0 = Instant::now();
            let mut sent = 0;
            while sent < msgs && begin.elapsed() <= deadline {
                let n = PUBLISH_BATCH.min(msgs - sent);
                if n == PUBLISH_BATCH {
                    publisher.dealer.send(&full[..], zmq::SNDMORE)?;
                } else {
                    publisher.dealer.send(head(n), zmq::SNDMORE)?;
                }
                let batch = &mut batch[..n as usize * p.len()];
                for (i, one) in (sent..).zip(batch.chunks_mut(p.len())) {
                    payload::stamp(one, i);
                }
                if publisher.packed {
                    publisher.dealer.send(&batch[..], 0)?;
                } else {
                    let mut frames = batch.chunks(p.len()).peekable();
                    while let Some(one) = frames.next() {
                        let more = if frames.peek().is_some() {
                            zmq::SNDMORE
                        } else {
                            0
                        };
                        publisher.dealer.send(one, more)?;
                    }
                }
                sent += n;
            }
            let took = t0.elapsed();
            published.store(true, Ordering::Relaxed);
            // Stay joined (and alive) until the cells are done.
            let mut last_ping = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                if last_ping.elapsed() >= PING_EVERY {
                    send_cmd(&publisher.dealer, Verb::PING, "{}")?;
                    last_ping = Instant::now();
                }
            }
            let _ = send_cmd(&publisher.dealer, Verb::GBYE, "{}");
            Ok((sent, took))
        })
    };

    let expected = load.expected_deliveries(scenario);
    wait_for_deliveries(&clock, expected, begin, load.deadline, load.idle, || {
        published.load(Ordering::Relaxed)
    });
    let cpu = mark.since();
    stop.store(true, Ordering::Relaxed);
    let (sent, took) = pub_thread
        .join()
        .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
    let mut tally = Tally::new(load.msgs);
    for c in cells {
        tally.merge(&c.join().map_err(|_| anyhow::anyhow!("cell panicked"))??);
    }
    let mut r = Report::new("thynapse-raw", &load.scenario_name(scenario));
    r.payload = load.payload;
    r.cells = load.cells;
    r.msgs = sent;
    r.publish_secs = took.as_secs_f64();
    r.fill(&clock, &tally, scenario.fan_out(), load.cells);
    r.cpu(cpu);
    Ok(r)
}

/// Joins `conns` idle cells (each a DEALER that said HELO and, when
/// `multicatch`, listened multicatch to [`CHANNEL`]) and reports the
/// transmitter's resident size before and with them. The cells ping to
/// stay alive.
///
/// # Errors
/// When the transmitter's `/proc` entry cannot be read or a cell cannot
/// join or listen.
pub fn memory(
    command: &str,
    pid: u32,
    conns: usize,
    multicatch: bool,
    settle: Duration,
) -> anyhow::Result<Report> {
    let idle = procfs::rss_kib(pid)?;
    // libzmq allows 1023 sockets per context: take a new one every 400.
    let mut ctx = zmq::Context::new();
    let mut cells = Vec::with_capacity(conns);
    for i in 0..conns {
        if i > 0 && i % 400 == 0 {
            ctx = zmq::Context::new();
        }
        let rcvhwm = multicatch.then_some(MULTICATCH_RCVHWM);
        let j = join(&ctx, command, CELL_SERVICE, rcvhwm)?;
        if multicatch {
            send_cmd(
                &j.dealer,
                Verb::LSTN,
                &format!(r#"{{"pattern":"{CHANNEL}","mode":"multi"}}"#),
            )?;
            expect(&j.dealer, Verb::OKAY)?;
        }
        cells.push(j);
    }
    let until = Instant::now() + settle;
    while Instant::now() < until {
        for c in &cells {
            send_cmd(&c.dealer, Verb::PING, "{}")?;
        }
        std::thread::sleep(PING_EVERY);
        for c in &cells {
            while c.dealer.recv_multipart(zmq::DONTWAIT).is_ok() {}
        }
    }
    let loaded = procfs::rss_kib(pid)?;
    for c in &cells {
        let _ = send_cmd(&c.dealer, Verb::GBYE, "{}");
    }
    let mut r = Report::new("thynapse-raw", "memory");
    r.cells = conns;
    r.rss_idle_kib = Some(idle);
    r.rss_loaded_kib = Some(loaded);
    r.per_cell_bytes = Some((loaded as f64 - idle as f64) * 1024.0 / conns.max(1) as f64);
    r.note = Some(if multicatch {
        "each cell: DEALER (HELO) + LSTN multi".into()
    } else {
        "each cell: DEALER (HELO)".into()
    });
    Ok(r)
}

/// The channel of the request/reply runs.
pub const RR_CHANNEL: &str = "bench::requests";
/// The service of the requesters.
pub const REQUESTER_SERVICE: &str = "bench-requesters";

/// A responder cell: listens anycatch to [`RR_CHANNEL`] and answers every
/// RQST with an RPLY carrying the request's sequence number (its first 8
/// bytes) as a binary frame.
fn respond(command: &str, ready: &Barrier, stop: &AtomicBool) -> anyhow::Result<u64> {
    let ctx = zmq::Context::new();
    let setup = (|| -> anyhow::Result<Joined> {
        let j = join(&ctx, command, CELL_SERVICE, None)?;
        send_cmd(
            &j.dealer,
            Verb::LSTN,
            &format!(r#"{{"pattern":"{RR_CHANNEL}","mode":"any"}}"#),
        )?;
        expect(&j.dealer, Verb::OKAY)?;
        Ok(j)
    })();
    ready.wait();
    let j = setup?;
    let mut reply = Vec::with_capacity(64);
    let mut answered = 0;
    let mut last_sent = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if j.dealer.poll(zmq::POLLIN, 50)? > 0 {
            for _ in 0..1024 {
                let parts = match j.dealer.recv_multipart(zmq::DONTWAIT) {
                    Ok(parts) => parts,
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => return Err(e.into()),
                };
                let Some(Ok(f)) = parts.first().map(|p| frame::decode(p)) else {
                    continue;
                };
                let Some(id) = (f.verb == Verb::RQST)
                    .then(|| delivery_id(f.body))
                    .flatten()
                else {
                    continue;
                };
                reply.clear();
                reply.extend_from_slice(br#"J RPLY {"id":""#);
                reply.extend_from_slice(id);
                reply.extend_from_slice(br#""}"#);
                // The answer is the request's sequence number (8 bytes).
                match parts.get(1).and_then(|b| b.get(..payload::MIN_PAYLOAD)) {
                    Some(seq) => {
                        j.dealer.send(&reply[..], zmq::SNDMORE)?;
                        j.dealer.send(seq, 0)?;
                    }
                    None => j.dealer.send(&reply[..], 0)?,
                }
                answered += 1;
                last_sent = Instant::now();
            }
        }
        if last_sent.elapsed() >= PING_EVERY {
            send_cmd(&j.dealer, Verb::PING, "{}")?;
            last_sent = Instant::now();
        }
    }
    let _ = send_cmd(&j.dealer, Verb::GBYE, "{}");
    Ok(answered)
}

/// Request/reply: `load.cells` responder cells, `requesters` requester
/// connections each with one request outstanding at a time (one thread
/// polls them all, as async tasks on one runtime would). Reports replies
/// per second and the request → reply latency.
///
/// # Errors
/// When a cell cannot join or listen, or a socket fails.
pub fn request_reply(command: &str, load: &Load, requesters: usize) -> anyhow::Result<Report> {
    let begin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(load.cells + 1));
    let mut responders = Vec::new();
    for _ in 0..load.cells {
        let (command, ready, stop) = (command.to_owned(), ready.clone(), stop.clone());
        responders.push(std::thread::spawn(move || respond(&command, &ready, &stop)));
    }
    ready.wait();

    let ctx = zmq::Context::new();
    let socks = (0..requesters.max(1))
        .map(|_| join(&ctx, command, REQUESTER_SERVICE, None))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let head = frame::encode(
        Verb::RQST,
        format!(r#"{{"channel":"{RR_CHANNEL}"}}"#).as_bytes(),
    );
    let mut p = payload::template(load.payload);
    let mut sent_at: Vec<Option<Instant>> = vec![None; socks.len()];
    let mut next_seq = 0u64;
    let mut send = |i: usize, sent_at: &mut [Option<Instant>]| -> anyhow::Result<()> {
        if next_seq >= load.msgs || begin.elapsed() > load.deadline {
            return Ok(());
        }
        payload::stamp(&mut p, next_seq);
        socks[i].dealer.send(&head[..], zmq::SNDMORE)?;
        socks[i].dealer.send(&p[..], 0)?;
        sent_at[i] = Some(Instant::now());
        next_seq += 1;
        Ok(())
    };
    let mark = CpuMark::now(load.server_pid);
    let mut answers = Answers::new(load.msgs, Instant::now());
    for i in 0..socks.len() {
        send(i, &mut sent_at)?;
    }
    while sent_at.iter().any(Option::is_some)
        && begin.elapsed() < load.deadline
        && answers.last.elapsed() < load.idle
    {
        let readable: Vec<usize> = {
            let mut items: Vec<_> = socks
                .iter()
                .map(|j| j.dealer.as_poll_item(zmq::POLLIN))
                .collect();
            zmq::poll(&mut items, 50)?;
            items
                .iter()
                .enumerate()
                .filter(|(_, it)| it.is_readable())
                .map(|(i, _)| i)
                .collect()
        };
        for i in readable {
            while let Ok(parts) = socks[i].dealer.recv_multipart(zmq::DONTWAIT) {
                let Some(Ok(f)) = parts.first().map(|p| frame::decode(p)) else {
                    continue;
                };
                match f.verb {
                    Verb::RPLY => {
                        let seq = parts.get(1).and_then(|b| payload::seq_of(b));
                        answers.answer(sent_at[i].take(), seq);
                        send(i, &mut sent_at)?;
                    }
                    Verb::ERRR => {
                        if answers.errors == 0 {
                            eprintln!("requester got ERRR {}", String::from_utf8_lossy(f.body));
                        }
                        answers.errors += 1;
                        sent_at[i] = None;
                        send(i, &mut sent_at)?;
                    }
                    _ => {}
                }
            }
        }
    }
    let cpu = mark.since();
    stop.store(true, Ordering::Relaxed);
    for r in responders {
        r.join()
            .map_err(|_| anyhow::anyhow!("responder panicked"))??;
    }
    for s in &socks {
        let _ = send_cmd(&s.dealer, Verb::GBYE, "{}");
    }
    Ok(Report::request_reply(
        "thynapse-raw",
        load,
        socks.len(),
        next_seq,
        answers,
        cpu,
        "ERRR answers",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_len_reads_a_last_bin_field_and_nothing_else() {
        assert_eq!(packed_len(br#"{"id":"x","bin":128}"#), Some(128));
        assert_eq!(packed_len(br#"{"bin":0}"#), Some(0));
        assert_eq!(packed_len(br#"{"id":"x","seq":12}"#), None);
        assert_eq!(packed_len(br#"{"id":"x","bin":}"#), None);
        assert_eq!(packed_len(br#"{"payload":{"bin":3}}"#), None);
    }
}
