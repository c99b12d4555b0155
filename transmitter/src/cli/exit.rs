//! How an operator command ends: its exit code, and what it says on stderr
//! when it fails.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code: the command did what was asked.
pub const SUCCESS: u8 = 0;
/// Exit code: the transmitter refused the command (`ERRR`), or a local
/// failure (writing the output, creating sockets).
pub const REFUSED: u8 = 1;
/// Exit code: the transmitter cannot be reached, or did not answer in time.
pub const UNREACHABLE: u8 = 3;
// Exit code 2, a usage error, is clap's own.
/// Exit code: the command was valid but matched nothing.
pub const NOTHING_MATCHED: u8 = 4;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of the operator commands:
  0  success
  1  the transmitter refused the command (prints `error: <code>: <message>`),
     or a local failure
  2  usage error: bad flags, a payload that is not JSON, a bad pattern
  3  the transmitter cannot be reached or did not answer within --timeout-ms
     (the message names the endpoint)
  4  nothing matched: `send` found no cell (no_route, or routed 0 when
     --droppable), `publish` found no listener (no_listeners), or a
     discovery command's answer is empty (its header or `[]` is still
     printed)";

/// ERRR codes that mean "nothing matched" rather than "refused".
const NOTHING_MATCHED_CODES: &[&str] = &["no_route", "no_listeners"];

/// A command that did not fail: did it find anything?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It found something (or had nothing to find).
    Done,
    /// Its answer is empty: no cell, no listener, nothing to show.
    NothingMatched,
}

impl Outcome {
    /// [`Outcome::NothingMatched`] when `empty`, else [`Outcome::Done`].
    pub fn unless_empty(empty: bool) -> Outcome {
        if empty {
            Outcome::NothingMatched
        } else {
            Outcome::Done
        }
    }
}

/// Why a command failed.
#[derive(Debug)]
pub enum Failure {
    /// The transmitter answered `ERRR`.
    Refused {
        /// The stable error code (`bad_query`, `no_route`, ...).
        code: String,
        /// The transmitter's explanation.
        message: String,
    },
    /// No connection to the transmitter could be made.
    Unreachable {
        /// The command endpoint tried.
        endpoint: String,
        /// What the socket saw, in words.
        why: String,
    },
    /// The connection was made but the answer did not come in time.
    NoAnswer {
        /// The command endpoint.
        endpoint: String,
        /// What was awaited (`WLCM`, `OKAY to DISC`, ...).
        awaited: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The transmitter said GBYE while the command was running.
    Left {
        /// The command endpoint.
        endpoint: String,
        /// The reason it gave.
        reason: String,
    },
    /// Something failed on this side (sockets, output, a reply that does
    /// not parse).
    Local(String),
}

impl Failure {
    /// A [`Failure::Local`] from any error, with what was being done.
    pub fn local(doing: &str, error: impl fmt::Display) -> Failure {
        Failure::Local(format!("{doing}: {error}"))
    }

    /// The exit code this failure ends the process with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused { code, .. } if NOTHING_MATCHED_CODES.contains(&code.as_str()) => {
                NOTHING_MATCHED
            }
            Failure::Refused { .. } | Failure::Local(_) => REFUSED,
            Failure::Unreachable { .. } | Failure::NoAnswer { .. } | Failure::Left { .. } => {
                UNREACHABLE
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused { code, message } => write!(f, "{code}: {message}"),
            Failure::Unreachable { endpoint, why } => {
                write!(f, "cannot reach the transmitter at {endpoint}: {why}")
            }
            Failure::NoAnswer {
                endpoint,
                awaited,
                waited,
            } => write!(
                f,
                "no {awaited} from the transmitter at {endpoint} within {} ms",
                waited.as_millis()
            ),
            Failure::Left { endpoint, reason } => {
                write!(f, "the transmitter at {endpoint} said goodbye ({reason})")
            }
            Failure::Local(why) => f.write_str(why),
        }
    }
}

/// Ends an operator command: prints a failure as `error: ...` on stderr and
/// turns the result into the exit code.
pub fn finish(result: Result<Outcome, Failure>) -> ExitCode {
    ExitCode::from(match result {
        Ok(Outcome::Done) => SUCCESS,
        Ok(Outcome::NothingMatched) => NOTHING_MATCHED,
        Err(failure) => {
            eprintln!("error: {failure}");
            failure.exit_code()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str) -> Failure {
        Failure::Refused {
            code: code.to_owned(),
            message: "m".to_owned(),
        }
    }

    #[test]
    fn nothing_matched_errors_exit_4_and_other_refusals_exit_1() {
        assert_eq!(refused("no_route").exit_code(), NOTHING_MATCHED);
        assert_eq!(refused("no_listeners").exit_code(), NOTHING_MATCHED);
        assert_eq!(refused("bad_query").exit_code(), REFUSED);
        assert_eq!(refused("bad_query").to_string(), "bad_query: m");
    }

    #[test]
    fn unreachable_transmitters_exit_3_and_are_named() {
        let f = Failure::NoAnswer {
            endpoint: "tcp://h:1".to_owned(),
            awaited: "WLCM".to_owned(),
            waited: Duration::from_millis(250),
        };
        assert_eq!(f.exit_code(), UNREACHABLE);
        assert_eq!(
            f.to_string(),
            "no WLCM from the transmitter at tcp://h:1 within 250 ms"
        );
    }
}
