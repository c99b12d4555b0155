//! `tail`: prints the events published on channels matching a pattern, as
//! they come, until Ctrl-C or a count.
//!
//! The command's cell listens multicatch (PROTOCOL.md §6): it sends `LSTN`
//! with mode `multi`, and once the `OKAY` is in, every matching event
//! reaches its DEALER as a `J EVNT` frame (the event socket is not used).
//! The cell PINGs every `heartbeat_ms` so the transmitter keeps it, and
//! gives up when a PONG does not come within the timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thynapse_protocol::{frame, Pattern, Verb};

use super::exit::{Failure, Outcome};
use super::render::{text, write_stdout, Format};
use super::session::{readable, Connection, Session};

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
/// when a `PONG` does not come in time, [`Failure::Left`] when the
/// transmitter leaves.
pub fn tail(args: &TailArgs) -> Result<Outcome, Failure> {
    let stop = stop_flag()?;
    let (mut session, welcome) = Session::open(&args.connection)?;
    session.request(
        Verb::LSTN,
        json!({"pattern": args.pattern.as_str(), "mode": "multi"}),
    )?;
    let timeout = session.timeout();
    let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(1));
    let mut printed = 0;
    let mut pings = 0u64;
    let mut next_ping = Instant::now() + heartbeat;
    // The ref of the PING awaiting its PONG, and when it was sent.
    let mut awaiting: Option<(Value, Instant)> = None;
    while !stop.load(Ordering::Relaxed) && args.count.is_none_or(|n| printed < n) {
        let now = Instant::now();
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
        if !readable(session.socket(), wait)? {
            continue;
        }
        let parts = session
            .socket()
            .recv_multipart(0)
            .map_err(|e| Failure::local("receiving", e))?;
        let Some(message) = parts.first().and_then(|f| frame::decode(f).ok()) else {
            continue;
        };
        match message.verb {
            Verb::EVNT => {
                if let Some(line) =
                    event_line(message.body, parts.get(1), &args.pattern, args.output)
                {
                    write_stdout(&line)?;
                    printed += 1;
                }
            }
            Verb::PONG => {
                let body: Value = serde_json::from_slice(message.body).unwrap_or_default();
                if awaiting.as_ref().is_some_and(|(r, _)| body["ref"] == *r) {
                    awaiting = None;
                }
            }
            Verb::GBYE => {
                let body: Value = serde_json::from_slice(message.body).unwrap_or_default();
                return Err(Failure::Left {
                    endpoint: session.endpoint().to_owned(),
                    reason: body["reason"].as_str().unwrap_or("no reason").to_owned(),
                });
            }
            _ => {}
        }
    }
    Ok(Outcome::Done)
}

/// The line to print for a multicatch event (`body` is its JSON body,
/// `binary` its optional second frame), or `None` when its body does not
/// read or its channel does not match `pattern`.
fn event_line(
    body: &[u8],
    binary: Option<&Vec<u8>>,
    pattern: &Pattern,
    format: Format,
) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let channel = body.get("channel")?.as_str()?;
    if !pattern.matches(channel) {
        return None;
    }
    Some(match format {
        Format::Json => format!("{body}\n"),
        Format::Table => {
            let payload = match (body.get("payload"), binary) {
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

    fn line(body: &str, binary: Option<&Vec<u8>>, pattern: &str, format: Format) -> Option<String> {
        event_line(
            body.as_bytes(),
            binary,
            &Pattern::parse(pattern).unwrap(),
            format,
        )
    }

    #[test]
    fn events_print_as_channel_and_compact_payload() {
        let e = r#"{"id":"x","channel":"billing::paid","payload":{ "a" : [1, 2] }}"#;
        assert_eq!(
            line(e, None, "billing::*", Format::Table).unwrap(),
            "billing::paid {\"a\":[1,2]}\n"
        );
        assert_eq!(
            line(e, None, "billing::*", Format::Json).unwrap(),
            "{\"channel\":\"billing::paid\",\"id\":\"x\",\"payload\":{\"a\":[1,2]}}\n"
        );
        let binary = r#"{"id":"x","channel":"billing::x"}"#;
        assert_eq!(
            line(binary, Some(&vec![0; 3]), "billing::*", Format::Table).unwrap(),
            "billing::x (3 bytes)\n"
        );
    }

    #[test]
    fn events_outside_the_pattern_or_unreadable_are_skipped() {
        let late = r#"{"id":"x","channel":"billing::x::late"}"#;
        assert!(line(late, None, "billing::*::paid", Format::Table).is_none());
        assert!(line("not json", None, "billing::*", Format::Table).is_none());
        assert!(line(r#"{"id":"x"}"#, None, "billing::*", Format::Table).is_none());
    }
}
