//! `tail`: prints the events published on channels matching a pattern, as
//! they come, until Ctrl-C or a count.
//!
//! The command's cell listens multicatch (PROTOCOL.md §6): its SUB
//! subscribes to `EVNT ` + the pattern's literal prefix, waits for its
//! `SYNC` marker, then the cell sends `LSTN` with mode `multi`. Events are
//! filtered locally with the whole pattern. The cell PINGs every
//! `heartbeat_ms` so the transmitter keeps it, and gives up when a PONG
//! does not come within the timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thynapse_protocol::{frame, Pattern, Thid, Verb};

use super::exit::{Failure, Outcome};
use super::render::{text, write_stdout, Format};
use super::session::{Connection, Session};

/// Longest wait between two looks at the Ctrl-C flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Exit status of a second Ctrl-C while the first is being handled.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// `thynapse tail`.
#[derive(clap::Args, Debug, Clone)]
pub struct TailArgs {
    /// The channel pattern: `billing::*`, `*::paid`, `a::?::b`, or a
    /// channel.
    #[arg(value_parser = parse_pattern)]
    pub pattern: Pattern,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// `table`: one line `channel payload` per event; `json`: one JSON
    /// object per line (id, channel, payload, from).
    #[arg(long, value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub connection: Connection,
}

/// Reads a pattern as the transmitter would.
fn parse_pattern(text: &str) -> Result<Pattern, String> {
    Pattern::parse(text).map_err(|e| e.to_string())
}

/// Runs `tail` until Ctrl-C (or SIGTERM) or `--count` events.
///
/// # Errors
/// As [`Session::open`] and [`Session::request`]; [`Failure::NoAnswer`]
/// when the `SYNC` marker or a `PONG` does not come in time,
/// [`Failure::Left`] when the transmitter leaves.
pub fn tail(args: &TailArgs) -> Result<Outcome, Failure> {
    let stop = stop_flag()?;
    let (mut session, welcome) = Session::open(&args.connection)?;
    let (sub, event_endpoint) = session.subscriber(&welcome.event_endpoint)?;
    let marker = format!("SYNC thynapse-cli-{}", Thid::random());
    let mut topic = frame::EVENT_TOPIC.to_vec();
    topic.extend_from_slice(args.pattern.literal_prefix().as_bytes());
    for t in [&topic, marker.as_bytes()] {
        sub.set_subscribe(t)
            .map_err(|e| Failure::local("subscribing", e))?;
    }
    let timeout = session.timeout();
    let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(1));
    let sync_deadline = Instant::now() + timeout;
    let mut synced = false;
    let mut printed = 0;
    let mut pings = 0u64;
    let mut next_ping = Instant::now() + heartbeat;
    // The ref of the PING awaiting its PONG, and when it was sent.
    let mut awaiting: Option<(Value, Instant)> = None;
    while !stop.load(Ordering::Relaxed) && args.count.is_none_or(|n| printed < n) {
        let now = Instant::now();
        if !synced && now >= sync_deadline {
            return Err(Failure::NoAnswer {
                endpoint: event_endpoint,
                awaited: "SYNC marker on the event socket".to_owned(),
                waited: timeout,
            });
        }
        if now >= next_ping {
            if let Some((_, sent)) = &awaiting {
                if now.duration_since(*sent) >= timeout {
                    return Err(Failure::NoAnswer {
                        endpoint: session.endpoint().to_owned(),
                        awaited: "PONG".to_owned(),
                        waited: timeout,
                    });
                }
            } else {
                pings += 1;
                let reference = json!(format!("ping-{pings}"));
                session.send(Verb::PING, &json!({ "ref": reference }))?;
                awaiting = Some((reference, now));
            }
            next_ping = now + heartbeat;
        }
        let wait = next_ping.saturating_duration_since(now).min(STOP_CHECK);
        let mut items = [
            sub.as_poll_item(zmq::POLLIN),
            session.socket().as_poll_item(zmq::POLLIN),
        ];
        match zmq::poll(&mut items, i64::try_from(wait.as_millis()).unwrap_or(0)) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(Failure::local("waiting for events", e)),
        }
        if items[1].is_readable() {
            if let Some((verb, body)) = session.next_message(Duration::ZERO)? {
                if verb == Verb::PONG && awaiting.as_ref().is_some_and(|(r, _)| body["ref"] == *r) {
                    awaiting = None;
                }
            }
        }
        if !items[0].is_readable() {
            continue;
        }
        let parts = sub
            .recv_multipart(0)
            .map_err(|e| Failure::local("receiving an event", e))?;
        if !synced && parts.first().is_some_and(|f| f == marker.as_bytes()) {
            sub.set_unsubscribe(marker.as_bytes())
                .map_err(|e| Failure::local("unsubscribing", e))?;
            session.request(
                Verb::LSTN,
                json!({"pattern": args.pattern.as_str(), "mode": "multi"}),
            )?;
            synced = true;
        } else if let Some(line) = event_line(&parts, &args.pattern, args.output) {
            write_stdout(&line)?;
            printed += 1;
        }
    }
    Ok(Outcome::Done)
}

/// The line to print for an event-socket message, or `None` when it is not
/// an event on a channel matching `pattern`.
fn event_line(parts: &[Vec<u8>], pattern: &Pattern, format: Format) -> Option<String> {
    let (channel, body) = frame::decode_event(parts.first()?)?;
    if !pattern.matches(channel) {
        return None;
    }
    let body: Value = serde_json::from_slice(body).ok()?;
    Some(match format {
        Format::Json => format!("{body}\n"),
        Format::Table => {
            let payload = match (body.get("payload"), parts.get(1)) {
                (Some(p), _) => p.to_string(),
                (None, Some(binary)) => format!("({} bytes)", binary.len()),
                (None, None) => text(&Value::Null),
            };
            format!("{channel} {payload}\n")
        }
    })
}

/// A flag SIGINT and SIGTERM set; a second signal exits at once.
///
/// # Errors
/// [`Failure::Local`] when the handlers cannot be installed.
fn stop_flag() -> Result<Arc<AtomicBool>, Failure> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(
            signal,
            EXIT_ON_SECOND_SIGNAL,
            stop.clone(),
        )
        .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
        .map_err(|e| Failure::local("installing signal handlers", e))?;
    }
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, body: &str) -> Vec<Vec<u8>> {
        vec![frame::encode_event(channel, body.as_bytes())]
    }

    #[test]
    fn events_print_as_channel_and_compact_payload() {
        let p = Pattern::parse("billing::*").unwrap();
        let e = event("billing::paid", r#"{"id":"x","payload":{ "a" : [1, 2] }}"#);
        assert_eq!(
            event_line(&e, &p, Format::Table).unwrap(),
            "billing::paid {\"a\":[1,2]}\n"
        );
        assert_eq!(
            event_line(&e, &p, Format::Json).unwrap(),
            "{\"id\":\"x\",\"payload\":{\"a\":[1,2]}}\n"
        );
        let mut binary = event("billing::x", r#"{"id":"x"}"#);
        binary.push(vec![0; 3]);
        assert_eq!(
            event_line(&binary, &p, Format::Table).unwrap(),
            "billing::x (3 bytes)\n"
        );
    }

    #[test]
    fn events_outside_the_pattern_are_skipped() {
        let p = Pattern::parse("billing::*::paid").unwrap();
        assert!(event_line(&event("billing::x::late", "{}"), &p, Format::Table).is_none());
        assert!(event_line(&[b"SYNC x".to_vec()], &p, Format::Table).is_none());
    }
}
