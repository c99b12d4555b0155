//! The NATS side, over `async-nats`: the same client shape as the Thynapse
//! runs (one publisher connection, one connection per cell, all in this
//! process on one tokio runtime).
//!
//! - `anycatch_noack`: a core NATS queue group of N subscribers.
//! - `anycatch_ack`: a JetStream work-queue stream in memory storage, one
//!   durable pull consumer with explicit acks, N workers pulling from it
//!   (each on its own connection), each message acked.
//! - `multicatch`: N plain subscribers, each gets every message.
//! - memory: N idle connections, the server's resident size before/after.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use futures::{stream, StreamExt};

use crate::payload;
use crate::procfs::{self, CpuMark};
use crate::report::{Answers, Report, RunClock, Tally};
use crate::{await_deliveries, tally_deliveries, Load, Scenario};

/// The subject of the anycatch and multicatch runs.
const SUBJECT: &str = "bench.events";
/// The queue group of the anycatch run.
const QUEUE: &str = "bench-workers";
/// The JetStream stream of the acked anycatch run.
const STREAM: &str = "BENCH";
/// Its durable consumer.
const CONSUMER: &str = "bench-workers";

/// How the JetStream publisher hands events to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JsPublish {
    /// Core publish, no publish ack: the same fire-and-forget as a Thynapse
    /// EVNT without `confirm`.
    Core,
    /// JetStream publish, awaiting every publish ack with a window of
    /// outstanding ones.
    Acked,
}

/// Tuning of the JetStream run.
#[derive(Debug, Clone, Copy)]
pub struct JsTuning {
    /// How the publisher publishes.
    pub publish: JsPublish,
    /// The consumer's `max_ack_pending`.
    pub max_ack_pending: i64,
    /// Messages requested per pull.
    pub batch: usize,
    /// Acked publishing: most publish acks outstanding.
    pub window: usize,
}

impl Default for JsTuning {
    fn default() -> Self {
        JsTuning {
            publish: JsPublish::Core,
            max_ack_pending: 1_000,
            batch: 200,
            window: 1024,
        }
    }
}

/// Connects with the client's defaults (a subscription buffers up to 64 Ki
/// messages, like the SDK's 100 k socket high-water mark).
async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Runs one throughput scenario against the server at `url`.
///
/// # Errors
/// When connecting or setting up subscriptions or the stream fails.
pub async fn run(
    url: &str,
    scenario: Scenario,
    load: &Load,
    js: JsTuning,
) -> anyhow::Result<Report> {
    let begin = Instant::now();
    let clock = Arc::new(RunClock::new());
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = connect(load.publish_to.as_deref().unwrap_or(url)).await?;

    // The cells.
    let mut cells = Vec::new();
    match scenario {
        Scenario::AnycatchNoack | Scenario::Multicatch => {
            for _ in 0..load.cells {
                let c = connect(url).await?;
                let sub = if scenario == Scenario::Multicatch {
                    c.subscribe(SUBJECT).await?
                } else {
                    c.queue_subscribe(SUBJECT, QUEUE.into()).await?
                };
                // The PING/PONG of a flush proves the SUB reached the server.
                c.flush().await?;
                let (clock, stop, msgs) = (clock.clone(), stop.clone(), load.msgs);
                cells.push(tokio::spawn(async move {
                    let deliveries = sub.map(|m| payload::seq_of(&m.payload));
                    let tally = tally_deliveries(deliveries, msgs, &clock, &stop).await;
                    drop(c);
                    tally
                }));
            }
        }
        Scenario::AnycatchAck => {
            let ctx = jetstream::new(publisher.clone());
            let _ = ctx.delete_stream(STREAM).await;
            let stream = ctx
                .create_stream(jetstream::stream::Config {
                    name: STREAM.into(),
                    subjects: vec![SUBJECT.into()],
                    retention: jetstream::stream::RetentionPolicy::WorkQueue,
                    storage: jetstream::stream::StorageType::Memory,
                    ..Default::default()
                })
                .await
                .context("creating the work-queue stream")?;
            stream
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: js.max_ack_pending,
                    ..Default::default()
                })
                .await
                .context("creating the consumer")?;
            for _ in 0..load.cells {
                let c = connect(url).await?;
                let cctx = jetstream::new(c.clone());
                let consumer: jetstream::consumer::PullConsumer = cctx
                    .get_stream(STREAM)
                    .await?
                    .get_consumer(CONSUMER)
                    .await
                    .map_err(|e| anyhow::anyhow!("getting the consumer: {e}"))?;
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(js.batch)
                    .messages()
                    .await?;
                let (clock, stop, msgs) = (clock.clone(), stop.clone(), load.msgs);
                cells.push(tokio::spawn(async move {
                    // A message counts once acked (explicitly, and
                    // fire-and-forget as a Thynapse ACKN is); a failed
                    // ack ends the cell.
                    let deliveries = stream::unfold(messages, |mut messages| async move {
                        loop {
                            match messages.next().await? {
                                Ok(m) => {
                                    m.ack().await.ok()?;
                                    return Some((payload::seq_of(&m.payload), messages));
                                }
                                Err(_) => continue,
                            }
                        }
                    });
                    let tally = tally_deliveries(deliveries, msgs, &clock, &stop).await;
                    drop(c);
                    tally
                }));
            }
        }
    }

    // The publisher.
    let published = Arc::new(AtomicBool::new(false));
    tokio::time::sleep(load.settle).await;
    let mark = CpuMark::now(load.server_pid);
    clock.restart();
    let pub_begin = Instant::now();
    let pub_task = {
        let (published, msgs, size, deadline) =
            (published.clone(), load.msgs, load.payload, load.deadline);
        let publisher = publisher.clone();
        let acked = scenario == Scenario::AnycatchAck && js.publish == JsPublish::Acked;
        let js_window = js.window.max(1);
        tokio::spawn(async move {
            let mut template = payload::template(size);
            let ctx = jetstream::new(publisher.clone());
            let mut window = std::collections::VecDeque::new();
            let mut sent = 0;
            for seq in 0..msgs {
                if begin.elapsed() > deadline {
                    break;
                }
                payload::stamp(&mut template, seq);
                let p = Bytes::copy_from_slice(&template);
                if acked {
                    window.push_back(ctx.publish(SUBJECT, p).await?);
                    if window.len() >= js_window {
                        if let Some(f) = window.pop_front() {
                            f.await?;
                        }
                    }
                } else {
                    publisher.publish(SUBJECT, p).await?;
                }
                sent += 1;
            }
            for f in window {
                f.await?;
            }
            publisher.flush().await?;
            published.store(true, Ordering::Relaxed);
            anyhow::Ok((sent, pub_begin.elapsed()))
        })
    };

    await_deliveries(&clock, scenario, load, begin, &published).await?;
    let cpu = mark.since();
    stop.store(true, Ordering::Relaxed);
    let (sent, publish_took) = pub_task.await??;
    let mut tally = Tally::new(load.msgs);
    for c in cells {
        tally.merge(&c.await?);
    }

    let mut r = Report::new("nats", &load.scenario_name(scenario));
    r.payload = load.payload;
    r.cells = load.cells;
    r.msgs = sent;
    r.publish_secs = publish_took.as_secs_f64();
    r.fill(&clock, &tally, scenario.fan_out(), load.cells);
    r.cpu(cpu);
    if scenario == Scenario::AnycatchAck {
        r.note = Some(format!(
            "JetStream work queue, memory storage, pull consumer, explicit acks, max_ack_pending {}, batch {}, publish {:?} (window {})",
            js.max_ack_pending, js.batch, js.publish, js.window
        ));
        let _ = jetstream::new(publisher.clone())
            .delete_stream(STREAM)
            .await;
    }
    Ok(r)
}

/// Opens `conns` idle connections and reports the server's resident size
/// before and with them.
///
/// # Errors
/// When the server's `/proc` entry cannot be read or a connection fails.
pub async fn memory(url: &str, pid: u32, conns: usize, settle: Duration) -> anyhow::Result<Report> {
    let idle = procfs::rss_kib(pid)?;
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        let c = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        clients.push(c);
    }
    for c in &clients {
        c.flush().await?;
    }
    tokio::time::sleep(settle).await;
    let loaded = procfs::rss_kib(pid)?;
    drop(clients);
    let mut r = Report::new("nats", "memory");
    r.cells = conns;
    r.rss_idle_kib = Some(idle);
    r.rss_loaded_kib = Some(loaded);
    r.per_cell_bytes = Some((loaded as f64 - idle as f64) * 1024.0 / conns.max(1) as f64);
    Ok(r)
}

/// The subject of the request/reply runs.
const RR_SUBJECT: &str = "bench.requests";
/// The queue group of the responders.
const RR_QUEUE: &str = "bench-responders";

/// Request/reply: `load.cells` responders in a queue group, `requesters`
/// connections each with one request outstanding at a time
/// (`Client::request`, which waits on the client's shared reply inbox).
/// Reports replies per second and the request → reply latency.
///
/// # Errors
/// When connecting or subscribing fails.
pub async fn request_reply(url: &str, load: &Load, requesters: usize) -> anyhow::Result<Report> {
    let begin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut responders = Vec::new();
    for _ in 0..load.cells {
        let c = connect(url).await?;
        let mut sub = c.queue_subscribe(RR_SUBJECT, RR_QUEUE.into()).await?;
        c.flush().await?;
        let stop = stop.clone();
        responders.push(tokio::spawn(async move {
            // Wakes the loop now and then to look at the stop flag.
            let mut wake = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => {
                            // The answer is the request's sequence number.
                            if let Some(reply) = m.reply {
                                let seq = m.payload.slice(..payload::MIN_PAYLOAD.min(m.payload.len()));
                                if c.publish(reply, seq).await.is_err() { break; }
                            }
                        }
                        None => break,
                    },
                    _ = wake.tick() => {}
                }
            }
        }));
    }
    let mut clients = Vec::new();
    for _ in 0..requesters.max(1) {
        clients.push(connect(url).await?);
    }
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mark = CpuMark::now(load.server_pid);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        let (next, msgs, size, deadline) = (next.clone(), load.msgs, load.payload, load.deadline);
        tasks.push(tokio::spawn(async move {
            let mut answers = Answers::new(msgs, t0);
            let mut template = payload::template(size);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= msgs || begin.elapsed() > deadline {
                    break;
                }
                payload::stamp(&mut template, seq);
                let t = Instant::now();
                match c
                    .request(RR_SUBJECT, Bytes::copy_from_slice(&template))
                    .await
                {
                    Ok(m) => answers.answer(Some(t), payload::seq_of(&m.payload)),
                    Err(_) => answers.errors += 1,
                }
            }
            answers
        }));
    }
    let mut answers = Answers::new(load.msgs, t0);
    for t in tasks {
        answers.merge(t.await?);
    }
    let cpu = mark.since();
    stop.store(true, Ordering::Relaxed);
    for r in responders {
        r.await?;
    }
    let sent = next.load(Ordering::Relaxed).min(load.msgs);
    Ok(Report::request_reply(
        "nats",
        load,
        requesters.max(1),
        sent,
        answers,
        cpu,
        "failed requests",
    ))
}
