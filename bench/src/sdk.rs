//! The Thynapse side on the cell SDK (`thynapse-cell`): what users get.
//! Same shape as the NATS runs: one publisher [`Client`], one `Client` per
//! cell, all in this process on one tokio runtime. Each `Client` owns its
//! sockets on its own background thread (the SDK's design).
//!
//! - `anycatch_noack`: `listen_with(pattern, ListenOptions::any_unacked())`.
//! - `anycatch_ack`: `ListenOptions::any()`; every event is acked when
//!   dropped, the SDK batches the ACKNs.
//! - `multicatch`: `ListenOptions::multi()`.
//! - request/reply: `Client::serve` and `Client::request_bytes`.
//!
//! Payloads go as binary frames (`publish_bytes`), as NATS payloads are
//! opaque bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use thynapse_cell::{Client, ListenOptions, Options, Request};

use crate::payload;
use crate::procfs::{self, CpuMark};
use crate::raw::{CELL_SERVICE, CHANNEL, PUBLISHER_SERVICE, REQUESTER_SERVICE, RR_CHANNEL};
use crate::report::{Answers, Report, RunClock, Tally};
use crate::{await_deliveries, tally_deliveries, Load, Scenario};

async fn connect(command: &str, service: &str) -> anyhow::Result<Client> {
    Client::connect(command, Options::new(service))
        .await
        .with_context(|| format!("joining {command}"))
}

/// Runs one throughput scenario against the transmitter whose command
/// socket is `command`.
///
/// # Errors
/// When a client cannot join or listen, or publishing fails.
pub async fn run(command: &str, scenario: Scenario, load: &Load) -> anyhow::Result<Report> {
    let begin = Instant::now();
    let clock = Arc::new(RunClock::new());
    let stop = Arc::new(AtomicBool::new(false));
    let options = match scenario {
        Scenario::AnycatchNoack => ListenOptions::any_unacked(),
        Scenario::AnycatchAck => ListenOptions::any(),
        Scenario::Multicatch => ListenOptions::multi(),
    };
    let tag = crate::run_tag();
    let channel = format!("{CHANNEL}::{tag}");
    let service = format!("{CELL_SERVICE}-{tag}");
    let mut cells = Vec::new();
    for _ in 0..load.cells {
        let c = connect(command, &service).await?;
        // Returns once the listen is in place at the transmitter.
        let sub = c.listen_with(&channel, options).await?;
        let (clock, stop, msgs) = (clock.clone(), stop.clone(), load.msgs);
        cells.push(tokio::spawn(async move {
            // Dropping each event once read acks it (acked listens).
            let deliveries = sub.map(|e| e.binary().and_then(payload::seq_of));
            let tally = tally_deliveries(deliveries, msgs, &clock, &stop).await;
            c.close().await;
            tally
        }));
    }

    let publisher = connect(
        load.publish_to.as_deref().unwrap_or(command),
        PUBLISHER_SERVICE,
    )
    .await?;
    tokio::time::sleep(load.settle).await;
    let published = Arc::new(AtomicBool::new(false));
    let mark = CpuMark::now(load.server_pid);
    clock.restart();
    let pub_task = {
        let (published, msgs, size, deadline) =
            (published.clone(), load.msgs, load.payload, load.deadline);
        let publisher = publisher.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut template = payload::template(size);
            let mut sent = 0;
            for seq in 0..msgs {
                if begin.elapsed() > deadline {
                    break;
                }
                payload::stamp(&mut template, seq);
                publisher.publish_bytes(&channel, template.clone()).await?;
                sent += 1;
            }
            let took = t0.elapsed();
            published.store(true, Ordering::Relaxed);
            anyhow::Ok((sent, took))
        })
    };

    await_deliveries(&clock, scenario, load, begin, &published).await?;
    let cpu = mark.since();
    stop.store(true, Ordering::Relaxed);
    let (sent, took) = pub_task.await??;
    let mut tally = Tally::new(load.msgs);
    for c in cells {
        tally.merge(&c.await?);
    }
    publisher.close().await;

    let mut r = Report::new("thynapse-sdk", &load.scenario_name(scenario));
    r.payload = load.payload;
    r.cells = load.cells;
    r.msgs = sent;
    r.publish_secs = took.as_secs_f64();
    r.fill(&clock, &tally, scenario.fan_out(), load.cells);
    r.cpu(cpu);
    Ok(r)
}

/// Joins `conns` idle SDK clients (each a DEALER on its own thread; the
/// SDK opens a SUB only for membership streams) and reports the
/// transmitter's resident size before and with them.
///
/// # Errors
/// When the transmitter's `/proc` entry cannot be read or a client cannot
/// join.
pub async fn memory(
    command: &str,
    pid: u32,
    conns: usize,
    settle: Duration,
) -> anyhow::Result<Report> {
    let idle = procfs::rss_kib(pid)?;
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(connect(command, CELL_SERVICE).await?);
    }
    tokio::time::sleep(settle).await;
    let loaded = procfs::rss_kib(pid)?;
    for c in &clients {
        c.close().await;
    }
    let mut r = Report::new("thynapse-sdk", "memory");
    r.cells = conns;
    r.rss_idle_kib = Some(idle);
    r.rss_loaded_kib = Some(loaded);
    r.per_cell_bytes = Some((loaded as f64 - idle as f64) * 1024.0 / conns.max(1) as f64);
    r.note = Some("each cell: SDK Client (DEALER)".into());
    Ok(r)
}

/// Request/reply on the SDK: `load.cells` clients serving
/// [`RR_CHANNEL`] with `Client::serve` (the handler answers the request's
/// sequence number, as JSON), `requesters` clients each with one
/// `Client::request_bytes` outstanding at a time. Reports replies per
/// second and the request → reply latency.
///
/// # Errors
/// When a client cannot join or serve.
pub async fn request_reply(
    command: &str,
    load: &Load,
    requesters: usize,
) -> anyhow::Result<Report> {
    let begin = Instant::now();
    let mut responders = Vec::new();
    for _ in 0..load.cells {
        let c = connect(command, CELL_SERVICE).await?;
        let r = c
            .serve(RR_CHANNEL, |request: Request| async move {
                Ok::<_, String>(request.binary().and_then(payload::seq_of))
            })
            .await?;
        responders.push((c, r));
    }
    let mut clients = Vec::new();
    for _ in 0..requesters.max(1) {
        clients.push(connect(command, REQUESTER_SERVICE).await?);
    }
    let next = Arc::new(AtomicU64::new(0));
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
                match c.request_bytes(RR_CHANNEL, template.clone()).await {
                    Ok(reply) => {
                        answers.answer(Some(t), reply.payload::<Option<u64>>().ok().flatten())
                    }
                    Err(_) => answers.errors += 1,
                }
            }
            c.close().await;
            answers
        }));
    }
    let mut answers = Answers::new(load.msgs, t0);
    for t in tasks {
        answers.merge(t.await?);
    }
    let cpu = mark.since();
    for (c, r) in responders {
        r.stop().await;
        c.close().await;
    }
    let sent = next.load(Ordering::Relaxed).min(load.msgs);
    Ok(Report::request_reply(
        "thynapse-sdk",
        load,
        requesters.max(1),
        sent,
        answers,
        cpu,
        "failed requests",
    ))
}
