//! The operator commands of `thynapse`: ask any transmitter about the whole
//! mesh, publish, send to cells chosen by their metadata, and tail events.
//!
//! Each command is a short-lived cell: a blocking libzmq DEALER that says
//! `HELO` as `thynapse-cli` (with a random THID), sends one command, prints
//! the answer and says `GBYE`. No async runtime is involved.
//!
//! ## Layout
//! - this module: the subcommands, their flags, and `services` ...
//!   `topology`, `metrics`, `publish` and `send`;
//! - [`exit`]: exit codes ([`EXIT_CODES_HELP`]) and failures;
//! - [`session`]: the short-lived cell, its connection flags, and why a
//!   connection failed;
//! - [`query`]: the filter flags, turned into the `where` of a command;
//! - [`render`]: tables, the topology tree, JSON;
//! - [`tail`]: the `tail` command.

mod exit;
mod query;
mod render;
mod session;
mod tail;

use std::process::ExitCode;

use serde_json::{json, Value};
use thynapse_protocol::{pattern, Verb};

pub use exit::EXIT_CODES_HELP;
use exit::{Failure, Outcome};
use query::{Filters, Term};
use render::{Format, Shape};
use session::{Connection, Session, CLI_KEY};
use tail::TailArgs;

/// The operator commands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the services of the mesh, with instance counts and versions.
    ///
    /// Every discovery command answers for the whole mesh, whichever
    /// transmitter it asks; the operator commands' own cells are left out.
    Services(DiscoverArgs),
    /// List every cell: service, version, region, host, transmitter,
    /// listens.
    Instances(DiscoverArgs),
    /// List the hosts cells connect from, with instance counts and services.
    Hosts(DiscoverArgs),
    /// List the regions of the cells, with instance counts and services.
    Regions(DiscoverArgs),
    /// List the versions of each service, with instance counts.
    Versions(DiscoverArgs),
    /// Show the mesh as a tree: region, host, service, version, cells.
    Topology(DiscoverArgs),
    /// Show the counters of the transmitter asked (not the mesh): events,
    /// deliveries, what was queued and dropped, errors by code.
    ///
    /// The command's own connection counts among `cells` and `commands`.
    Metrics(Common),
    /// Publish an event, confirmed; print its id and ROUTED.
    ///
    /// ROUTED counts the services that got it anycatch, plus 1 when
    /// multicatch listeners got it.
    Publish(PublishArgs),
    /// Send a payload to a cell of a service chosen by its metadata.
    ///
    /// One matching cell gets it (every one with --all), among the cells of
    /// the service that listen anycatch to the channel. Prints its id and
    /// ROUTED, the number of cells that got it.
    Send(SendArgs),
    /// Print the events on channels matching a pattern, one per line.
    ///
    /// Each line is `channel payload` (payload as compact JSON). Runs until
    /// Ctrl-C, or until --count events were printed.
    Tail(TailArgs),
}

/// The flags every command but `tail` takes: which transmitter, and how
/// to print its answer.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// How to print the answer (json: the answer's JSON, for discovery its
    /// `result`).
    #[arg(long, value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub connection: Connection,
}

/// Flags of the discovery commands.
#[derive(clap::Args, Debug, Clone)]
pub struct DiscoverArgs {
    /// Only cells of this service.
    #[arg(long)]
    pub service: Option<String>,
    #[command(flatten)]
    pub filters: Filters,
    #[command(flatten)]
    pub common: Common,
}

/// Flags of `publish`.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// The channel to publish on (no wildcards).
    #[arg(value_parser = parse_channel)]
    pub channel: String,
    /// The payload, as JSON: '{"amount":42}', '"text"', 7. None: an event
    /// without payload.
    #[arg(value_name = "PAYLOAD_JSON", value_parser = parse_json)]
    pub payload: Option<Value>,
    #[command(flatten)]
    pub common: Common,
}

/// Flags of `send`.
#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// The service whose cells may receive the payload.
    #[arg(long)]
    pub service: String,
    #[command(flatten)]
    pub filters: Filters,
    /// Send to every matching cell rather than to one.
    #[arg(long)]
    pub all: bool,
    /// The channel the cells see, and must listen to anycatch.
    #[arg(
        long,
        value_parser = parse_channel,
        help = "The channel the cells see, and must listen to anycatch [default: send::<SERVICE>]"
    )]
    pub channel: Option<String>,
    /// When no cell matches, send to any cell of the service instead.
    #[arg(long)]
    pub optional: bool,
    /// When no cell matches, drop the payload instead of failing (the exit
    /// code is still 4).
    #[arg(long)]
    pub droppable: bool,
    /// Choose the cell consistently: the same key goes to the same cell
    /// while the matching cells stay the same.
    #[arg(long)]
    pub key: Option<String>,
    /// The payload, as JSON: '{"job":7}', '"text"', 7. None: no payload.
    #[arg(value_name = "PAYLOAD_JSON", value_parser = parse_json)]
    pub payload: Option<Value>,
    #[command(flatten)]
    pub common: Common,
}

impl Command {
    /// Runs the command, prints its answer (or `error: ...` on stderr) and
    /// returns the exit code ([`EXIT_CODES_HELP`]).
    pub fn run(&self) -> ExitCode {
        use render::{COUNTERS, HOSTS, INSTANCES, REGIONS, SERVICES, VERSIONS};
        exit::finish(match self {
            Command::Services(a) => discover(a, "services", Shape::Table(SERVICES)),
            Command::Instances(a) => discover(a, "instances", Shape::Table(INSTANCES)),
            Command::Hosts(a) => discover(a, "hosts", Shape::Table(HOSTS)),
            Command::Regions(a) => discover(a, "regions", Shape::Table(REGIONS)),
            Command::Versions(a) => discover(a, "versions", Shape::Table(VERSIONS)),
            Command::Topology(a) => discover(a, "topology", Shape::Tree),
            Command::Metrics(c) => metrics(c, Shape::Table(COUNTERS)),
            Command::Publish(a) => publish(a),
            Command::Send(a) => send(a),
            Command::Tail(a) => tail::tail(a),
        })
    }
}

/// `DISC` `what`, printed as `shape`. The operator commands' own cells are
/// left out of the answer.
fn discover(args: &DiscoverArgs, what: &str, shape: Shape) -> Result<Outcome, Failure> {
    let mut body = json!({ "what": what });
    set(&mut body, "service", args.service.clone());
    set(
        &mut body,
        "where",
        args.filters.query(&[Term::Absent(CLI_KEY)]),
    );
    let (mut session, _) = Session::open(&args.common.connection)?;
    let mut answer = session.request(Verb::DISC, body)?;
    drop(session);
    let result = answer
        .get_mut("result")
        .map(Value::take)
        .ok_or_else(|| Failure::Local(format!("the answer to DISC has no result: {answer}")))?;
    render::print(&result, args.common.output, shape)?;
    let empty = match &result {
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        _ => false,
    };
    Ok(Outcome::unless_empty(empty))
}

/// `DISC` `metrics`: the transmitter's counters, one row each (the JSON
/// output is the answer's object as is).
fn metrics(common: &Common, shape: Shape) -> Result<Outcome, Failure> {
    let (mut session, _) = Session::open(&common.connection)?;
    let answer = session.request(Verb::DISC, json!({ "what": "metrics" }))?;
    drop(session);
    let Some(Value::Object(counters)) = answer.get("result") else {
        return Err(Failure::Local(format!(
            "the answer to DISC metrics has no counters: {answer}"
        )));
    };
    let shown = match common.output {
        render::Format::Json => Value::Object(counters.clone()),
        render::Format::Table => counters
            .iter()
            .map(|(name, value)| json!({ "counter": name, "value": value }))
            .collect(),
    };
    render::print(&shown, common.output, shape)?;
    Ok(Outcome::unless_empty(counters.is_empty()))
}

/// `publish`: a confirmed `EVNT`.
fn publish(args: &PublishArgs) -> Result<Outcome, Failure> {
    let mut body = json!({ "channel": args.channel, "confirm": true });
    set(&mut body, "payload", args.payload.clone());
    routed(&args.common, Verb::EVNT, body)
}

/// `send`: a `SEND`.
fn send(args: &SendArgs) -> Result<Outcome, Failure> {
    let mut body = json!({ "service": args.service });
    set(&mut body, "where", args.filters.query(&[]));
    set(&mut body, "channel", args.channel.clone());
    set(&mut body, "payload", args.payload.clone());
    set(&mut body, "key", args.key.clone());
    for (flag, on) in [
        ("all", args.all),
        ("optional", args.optional),
        ("droppable", args.droppable),
    ] {
        set(&mut body, flag, on.then_some(true));
    }
    routed(&args.common, Verb::SEND, body)
}

/// Sends a command answered with `OKAY {"id", "routed"}` and prints both;
/// routed 0 is "nothing matched".
fn routed(common: &Common, verb: Verb, body: Value) -> Result<Outcome, Failure> {
    let (mut session, _) = Session::open(&common.connection)?;
    let answer = session.request(verb, body)?;
    drop(session);
    let result = json!({ "id": answer["id"], "routed": answer["routed"] });
    render::print(&result, common.output, Shape::Table(render::ROUTED))?;
    Ok(Outcome::unless_empty(answer["routed"] == 0))
}

/// Sets `body[key]` to `value` when there is one.
fn set(body: &mut Value, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        body[key] = v.into();
    }
}

/// Reads a payload argument.
fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("not JSON ({e}); text is written '\"like this\"'"))
}

/// Reads a channel argument as the transmitter would.
fn parse_channel(text: &str) -> Result<String, String> {
    pattern::validate_channel(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_must_be_json_and_channels_valid() {
        assert_eq!(parse_json(r#"{"a":1}"#).unwrap(), json!({"a": 1}));
        assert!(parse_json("hello").unwrap_err().contains("not JSON"));
        assert!(parse_channel("a::b").is_ok());
        assert!(parse_channel("a::*").is_err());
    }

    #[test]
    fn absent_options_stay_out_of_the_body() {
        let mut body = json!({});
        set(&mut body, "a", None::<String>);
        set(&mut body, "b", Some(true));
        assert_eq!(body, json!({"b": true}));
    }
}
