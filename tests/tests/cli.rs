//! The operator commands of the `thynapse` binary against real
//! transmitters: discovery over a two-transmitter mesh, targeted sends,
//! confirmed publishing, tail, and the exit codes (0 success, 1 refused, 2
//! usage, 3 unreachable, 4 nothing matched).

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use thynapse_tests::{
    binary_watchdog, eventually, run_with_deadline, thynapse_binary, Output, RawCell,
    TransmitterProcess, REPLY_TIMEOUT,
};

/// How long one CLI run may take before the test kills it.
const CLI_DEADLINE: Duration = Duration::from_secs(15);
/// How long the mesh may take to show every cell at every transmitter.
const CONVERGENCE: Duration = Duration::from_secs(10);
/// Interval between two polls of the CLI.
const CLI_POLL: Duration = Duration::from_millis(100);
/// Heartbeat announced to the raw cells: long enough that they never
/// need to PING during a test.
const HEARTBEAT_MS: &str = "60000";

/// Runs `thynapse <args>` with no THYNAPSE_* variables but `env`.
fn cli_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(thynapse_binary()?);
    cmd.args(args)
        .env_remove("THYNAPSE_COMMAND")
        .env_remove("THYNAPSE_TOKEN")
        .envs(env.iter().copied());
    run_with_deadline(&mut cmd, CLI_DEADLINE)
}

/// Runs `thynapse <args>`.
fn cli(args: &[&str]) -> anyhow::Result<Output> {
    cli_with_env(args, &[])
}

/// Runs `thynapse <args>` and requires exit code `code`.
fn cli_exits(code: i32, args: &[&str]) -> anyhow::Result<Output> {
    let out = cli(args)?;
    if out.status.code() != Some(code) {
        bail!(
            "thynapse {args:?} exited {:?}, expected {code}\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            out.stdout,
            out.stderr
        );
    }
    Ok(out)
}

/// Runs `thynapse <args> --output json`, requires exit code `code`, and
/// parses the output.
fn cli_json(code: i32, args: &[&str]) -> anyhow::Result<Value> {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let out = cli_exits(code, &args)?;
    serde_json::from_str(&out.stdout).with_context(|| format!("output is not JSON: {out:?}"))
}

/// Runs `thynapse <args>`, requires exit code `code` and a stderr that
/// starts with `error: <what>`.
fn cli_fails(code: i32, args: &[&str], what: &str) -> anyhow::Result<Output> {
    let out = cli_exits(code, args)?;
    assert!(
        out.stderr.starts_with(&format!("error: {what}")),
        "{args:?}: {}",
        out.stderr
    );
    Ok(out)
}

/// `args` followed by `--command <endpoint>`.
fn at<'a>(endpoint: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(["--command", endpoint]);
    all
}

/// The lines of a table, each split into its cells.
fn rows(table: &str) -> Vec<Vec<&str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// Requires `table` to start with `header` and hold each of `expected`
/// among its rows.
fn assert_table(table: &str, header: &[&str], expected: &[&[&str]]) {
    let rows = rows(table);
    assert_eq!(rows.first().map(Vec::as_slice), Some(header), "{table}");
    for row in expected {
        assert!(rows.iter().any(|r| r == row), "no row {row:?} in\n{table}");
    }
    assert_eq!(rows.len(), expected.len() + 1, "{table}");
}

/// A raw cell of `service` with `metadata`, joined to `t`.
fn join(t: &TransmitterProcess, service: &str, metadata: Value) -> anyhow::Result<RawCell> {
    let mut cell = RawCell::open(t.command_endpoint())?;
    let reference = cell.next_ref();
    cell.send_json(
        "HELO",
        &json!({"id": cell.id(), "service": service, "metadata": metadata, "ref": reference}),
    )?;
    cell.expect_reply("WLCM", &reference)?;
    Ok(cell)
}

/// Two transmitters (the second joined to the first) and three cells:
/// backend 1.0.0 in eu and gateway in eu on the first, backend 2.1.0 in us
/// on the second; both backends listen anycatch to `send::backend`.
struct Mesh {
    first: TransmitterProcess,
    second: TransmitterProcess,
    backend_v1: RawCell,
    backend_v2: RawCell,
    gateway: RawCell,
}

impl Mesh {
    /// Starts it and waits until the first transmitter's view, as the CLI
    /// shows it, holds all three cells.
    fn start() -> anyhow::Result<Mesh> {
        let first = TransmitterProcess::spawn(&["--heartbeat-ms", HEARTBEAT_MS])?;
        let second = TransmitterProcess::spawn(&[
            "--heartbeat-ms",
            HEARTBEAT_MS,
            "--join",
            first.command_endpoint(),
        ])?;
        let mut backend_v1 = join(
            &first,
            "backend",
            json!({"version": "1.0.0", "region": "eu"}),
        )?;
        let mut backend_v2 = join(
            &second,
            "backend",
            json!({"version": "2.1.0", "region": "us"}),
        )?;
        let gateway = join(&first, "gateway", json!({"region": "eu"}))?;
        for cell in [&mut backend_v1, &mut backend_v2] {
            cell.listen("send::backend", "any", true)?;
        }
        let mesh = Mesh {
            first,
            second,
            backend_v1,
            backend_v2,
            gateway,
        };
        let mut seen = Value::Null;
        let converged = eventually(CONVERGENCE, CLI_POLL, || {
            let out = cli(&mesh.args(&["instances", "--output", "json"]));
            seen = out
                .ok()
                .and_then(|o| serde_json::from_str(&o.stdout).ok())
                .unwrap_or(Value::Null);
            seen.as_array().is_some_and(|a| a.len() == 3)
        });
        if !converged {
            bail!("the first transmitter's view never showed the 3 cells; last seen: {seen}");
        }
        Ok(mesh)
    }

    /// `args` followed by `--command <first transmitter>`.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        at(self.first.command_endpoint(), args)
    }

    /// Asks the first transmitter `what`, in JSON (which must be `json`)
    /// and as a table (which must have `header` and `rows`).
    fn assert_answer(
        &self,
        what: &str,
        json: Value,
        header: &[&str],
        rows: &[&[&str]],
    ) -> anyhow::Result<()> {
        assert_eq!(cli_json(0, &self.args(&[what]))?, json, "{what}");
        let table = cli_exits(0, &self.args(&[what]))?.stdout;
        assert_table(&table, header, rows);
        Ok(())
    }

    /// The hex THIDs of (backend 1.0.0, backend 2.1.0, gateway).
    fn ids(&self) -> (String, String, String) {
        (
            self.backend_v1.id().to_hex(),
            self.backend_v2.id().to_hex(),
            self.gateway.id().to_hex(),
        )
    }
}

#[test]
fn discovery_commands_show_the_whole_mesh_as_json_and_tables() -> anyhow::Result<()> {
    binary_watchdog("discovery", || {
        let mesh = Mesh::start()?;
        let (v1, v2, gw) = mesh.ids();
        let (v1, v2, gw) = (v1.as_str(), v2.as_str(), gw.as_str());

        mesh.assert_answer(
            "services",
            json!([
                {"service": "backend", "instances": 2, "versions": ["1.0.0", "2.1.0"]},
                {"service": "gateway", "instances": 1, "versions": ["(none)"]},
            ]),
            &["SERVICE", "INSTANCES", "VERSIONS"],
            &[
                &["backend", "2", "1.0.0,2.1.0"],
                &["gateway", "1", "(none)"],
            ],
        )?;

        let instances = cli_json(0, &mesh.args(&["instances"]))?;
        let by_id = |id: &str| {
            instances
                .as_array()
                .and_then(|all| all.iter().find(|i| i["id"] == id))
                .cloned()
                .unwrap_or(Value::Null)
        };
        assert_eq!(by_id(v2)["service"], "backend");
        assert_eq!(by_id(v2)["metadata"]["version"], "2.1.0");
        assert_eq!(by_id(v2)["transmitter"], mesh.second.id());
        assert_eq!(by_id(v1)["transmitter"], mesh.first.id());
        assert_eq!(
            by_id(v1)["listens"],
            json!([{"pattern": "send::backend", "mode": "any"}])
        );
        assert_eq!(by_id(gw)["metadata"]["region"], "eu");
        let host = by_id(v1)["metadata"]["host"]
            .as_str()
            .context("cells have a host")?
            .to_owned();
        let host = host.as_str();
        let table = cli_exits(0, &mesh.args(&["instances"]))?.stdout;
        let first_id = mesh.first.id();
        let second_id = mesh.second.id();
        assert_table(
            &table,
            &[
                "ID",
                "SERVICE",
                "VERSION",
                "REGION",
                "HOST",
                "TRANSMITTER",
                "LISTENS",
            ],
            &[
                &[
                    v1,
                    "backend",
                    "1.0.0",
                    "eu",
                    host,
                    first_id,
                    "send::backend(any)",
                ],
                &[
                    v2,
                    "backend",
                    "2.1.0",
                    "us",
                    host,
                    second_id,
                    "send::backend(any)",
                ],
                &[gw, "gateway", "-", "eu", host, first_id, "-"],
            ],
        );

        mesh.assert_answer(
            "hosts",
            json!([{"host": host, "instances": 3, "services": ["backend", "gateway"]}]),
            &["HOST", "INSTANCES", "SERVICES"],
            &[&[host, "3", "backend,gateway"]],
        )?;
        mesh.assert_answer(
            "regions",
            json!([
                {"region": "eu", "instances": 2, "services": ["backend", "gateway"]},
                {"region": "us", "instances": 1, "services": ["backend"]},
            ]),
            &["REGION", "INSTANCES", "SERVICES"],
            &[&["eu", "2", "backend,gateway"], &["us", "1", "backend"]],
        )?;
        mesh.assert_answer(
            "versions",
            json!([
                {"service": "backend", "version": "1.0.0", "instances": 1},
                {"service": "backend", "version": "2.1.0", "instances": 1},
                {"service": "gateway", "version": "(none)", "instances": 1},
            ]),
            &["SERVICE", "VERSION", "INSTANCES"],
            &[
                &["backend", "1.0.0", "1"],
                &["backend", "2.1.0", "1"],
                &["gateway", "(none)", "1"],
            ],
        )?;

        let topology = cli_json(0, &mesh.args(&["topology"]))?;
        assert_eq!(
            topology,
            json!({
                "eu": {host: {"backend": {"1.0.0": [v1]}, "gateway": {"(none)": [gw]}}},
                "us": {host: {"backend": {"2.1.0": [v2]}}},
            })
        );
        let tree = cli_exits(0, &mesh.args(&["topology"]))?.stdout;
        let expected = format!(
            "region eu\n  host {host}\n    service backend\n      version 1.0.0\n        cell {v1}\n    \
             service gateway\n      version (none)\n        cell {gw}\n\
             region us\n  host {host}\n    service backend\n      version 2.1.0\n        cell {v2}\n"
        );
        assert_eq!(tree, expected);
        Ok(())
    })
}

#[test]
fn discovery_filters_narrow_the_answer_and_an_empty_answer_exits_4() -> anyhow::Result<()> {
    binary_watchdog("discovery_filters", || {
        let mesh = Mesh::start()?;
        let (v1, v2, gw) = mesh.ids();
        let ids = |answer: &Value| -> Vec<String> {
            let mut ids: Vec<String> = answer
                .as_array()
                .map(|a| a.iter().filter_map(|i| i["id"].as_str()).map(str::to_owned))
                .into_iter()
                .flatten()
                .collect();
            ids.sort();
            ids
        };
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };

        let a = cli_json(0, &mesh.args(&["instances", "--service", "backend"]))?;
        assert_eq!(ids(&a), sorted(vec![v1.clone(), v2.clone()]));
        let a = cli_json(0, &mesh.args(&["instances", "--version", "2.1.0"]))?;
        assert_eq!(ids(&a), vec![v2.clone()]);
        let a = cli_json(0, &mesh.args(&["instances", "--region", "eu"]))?;
        assert_eq!(ids(&a), sorted(vec![v1.clone(), gw.clone()]));
        let a = cli_json(
            0,
            &mesh.args(&["instances", "--region", "eu", "--where", "version>=1.0.0"]),
        )?;
        assert_eq!(ids(&a), vec![v1.clone()]);
        let json_where = r#"{"ops":[{"path":"/version","op":"$gte","to":"2.0.0"}]}"#;
        let a = cli_json(0, &mesh.args(&["instances", "--where", json_where]))?;
        assert_eq!(ids(&a), vec![v2.clone()]);
        // The second transmitter answers for the whole mesh too.
        let second = mesh.second.command_endpoint();
        let a = cli_json(0, &at(second, &["services", "--service", "gateway"]))?;
        assert_eq!(
            a,
            json!([{"service": "gateway", "instances": 1, "versions": ["(none)"]}])
        );

        let none = cli_json(4, &mesh.args(&["services", "--region", "mars"]))?;
        assert_eq!(none, json!([]));
        let out = cli_exits(4, &mesh.args(&["versions", "--service", "nobody"]))?;
        assert_table(&out.stdout, &["SERVICE", "VERSION", "INSTANCES"], &[]);
        Ok(())
    })
}

#[test]
fn send_reaches_only_the_cells_its_query_matches() -> anyhow::Result<()> {
    binary_watchdog("send", || {
        let mut mesh = Mesh::start()?;

        let okay = cli_json(
            0,
            &mesh.args(&[
                "send",
                "--service",
                "backend",
                "--where",
                "version>=2.0.0",
                r#"{"job":1}"#,
            ]),
        )?;
        assert_eq!(okay["routed"], 1);
        let d = mesh.backend_v2.expect("DLVR", REPLY_TIMEOUT)?;
        assert_eq!(d["id"], okay["id"]);
        assert_eq!(d["channel"], "send::backend");
        assert_eq!(d["payload"], json!({"job": 1}));
        mesh.backend_v2.ack(d["id"].as_str().context("DLVR id")?)?;

        // The next send goes to 1.0.0: if the first had reached it too, it
        // would come before this one.
        let table = cli_exits(
            0,
            &mesh.args(&["send", "--service", "backend", "--version", "1.0.0", "2"]),
        )?
        .stdout;
        let rows = rows(&table);
        assert_eq!(rows[0], ["ID", "ROUTED"], "{table}");
        assert_eq!(rows[1][1], "1", "{table}");
        let d = mesh.backend_v1.expect("DLVR", REPLY_TIMEOUT)?;
        assert_eq!(d["id"], rows[1][0]);
        assert_eq!(d["payload"], 2);

        let okay = cli_json(
            0,
            &mesh.args(&[
                "send",
                "--service",
                "backend",
                "--all",
                "--channel",
                "send::backend",
            ]),
        )?;
        assert_eq!(okay["routed"], 2);
        for cell in [&mut mesh.backend_v1, &mut mesh.backend_v2] {
            let d = cell.expect("DLVR", REPLY_TIMEOUT)?;
            assert_eq!(d["id"], okay["id"]);
            assert!(d.get("payload").is_none(), "{d}");
        }

        let out = cli_fails(
            4,
            &mesh.args(&["send", "--service", "backend", "--where", "version>=3"]),
            "no_route: ",
        )?;
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        Ok(())
    })
}

#[test]
fn a_bad_query_is_refused_with_exit_1() -> anyhow::Result<()> {
    binary_watchdog("bad_query", || {
        let t = TransmitterProcess::spawn(&[])?;
        let endpoint = t.command_endpoint();
        for args in [
            vec!["send", "--service", "backend", "--where", "version>>", "1"],
            vec!["instances", "--where", "version>>"],
            vec!["services", "--where", r#"{"ops":[{"op":"$nope"}]}"#],
        ] {
            cli_fails(1, &at(endpoint, &args), "bad_query: ")?;
        }
        Ok(())
    })
}

#[test]
fn publish_is_confirmed_and_reports_no_listeners_with_exit_4() -> anyhow::Result<()> {
    binary_watchdog("publish", || {
        let t = TransmitterProcess::spawn(&[])?;
        let c = t.command_endpoint();
        cli_fails(4, &at(c, &["publish", "orders::created"]), "no_listeners: ")?;

        let mut listener = RawCell::open(c)?;
        listener.hello("orders")?;
        listener.listen("orders::*", "any", true)?;
        let okay = cli_json(0, &at(c, &["publish", "orders::created", r#"{"n":1}"#]))?;
        assert_eq!(okay["routed"], 1);
        let d = listener.expect("DLVR", REPLY_TIMEOUT)?;
        assert_eq!(d["id"], okay["id"]);
        assert_eq!(d["payload"], json!({"n": 1}));
        assert_eq!(d["channel"], "orders::created");

        let table = cli_exits(0, &at(c, &["publish", "orders::paid", "7"]))?.stdout;
        let rows = rows(&table);
        assert_eq!(rows.len(), 2, "{table}");
        assert_eq!(rows[0], ["ID", "ROUTED"]);
        assert_eq!(rows[1][0].len(), 40, "{table}");
        assert_eq!(rows[1][1], "1");
        Ok(())
    })
}

#[test]
fn metrics_shows_the_transmitters_counters() -> anyhow::Result<()> {
    binary_watchdog("metrics", || {
        let t = TransmitterProcess::spawn(&[])?;
        let c = t.command_endpoint();
        cli_fails(4, &at(c, &["publish", "nobody::here"]), "no_listeners: ")?;
        let counters = cli_json(0, &at(c, &["metrics"]))?;
        assert_eq!(counters["events_in"], 1, "{counters}");
        assert_eq!(counters["dropped_no_listeners"], 1, "{counters}");
        assert_eq!(counters["errors.no_listeners"], 1, "{counters}");
        assert_eq!(counters["cells"], 1, "the command's own cell: {counters}");
        assert_eq!(counters["dropped_multicatch"], 0, "{counters}");

        let table = cli_exits(0, &at(c, &["metrics"]))?.stdout;
        let rows = rows(&table);
        assert_eq!(rows[0], ["COUNTER", "VALUE"]);
        assert!(rows.contains(&vec!["events_in", "1"]), "{table}");
        assert_eq!(rows.len() - 1, counters.as_object().map_or(0, |o| o.len()));
        Ok(())
    })
}

#[test]
fn tail_prints_events_another_cell_publishes_until_its_count() -> anyhow::Result<()> {
    binary_watchdog("tail", || {
        let t = TransmitterProcess::spawn(&[])?;
        let c = t.command_endpoint().to_owned();
        let tail = std::thread::spawn(move || {
            cli(&at(
                &c,
                &["tail", "orders::*", "--count", "3", "--timeout-ms", "10000"],
            ))
        });
        let mut publisher = RawCell::open(t.command_endpoint())?;
        publisher.hello("shop")?;
        // Confirmed publishing fails with no_listeners until the tail's
        // LSTN is in, which it sends once its subscriptions are in place.
        let ready = eventually(CONVERGENCE, CLI_POLL, || {
            publisher
                .publish_confirmed("orders::created", &json!({"n": 1}))
                .is_ok()
        });
        assert!(ready, "the tail never listened");
        publisher.publish("orders::paid", &json!({"n": 2, "text": "a b"}))?;
        publisher.publish("orders::shipped", &json!("last"))?;
        let out = match tail.join() {
            Ok(out) => out?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(
            out.stdout,
            "orders::created {\"n\":1}\n\
             orders::paid {\"n\":2,\"text\":\"a b\"}\n\
             orders::shipped \"last\"\n"
        );
        Ok(())
    })
}

#[test]
fn an_unreachable_transmitter_or_a_wrong_token_exits_3_naming_the_endpoint() -> anyhow::Result<()> {
    binary_watchdog("unreachable", || {
        // A port nothing listens on: bound, then released.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            format!("tcp://{}", l.local_addr()?)
        };
        let out = cli_fails(
            3,
            &at(&closed, &["services", "--timeout-ms", "300"]),
            &format!("cannot reach the transmitter at {closed}: connection refused"),
        )?;
        assert!(out.stdout.is_empty(), "{}", out.stdout);

        let t = TransmitterProcess::spawn(&["--token", "s3cret"])?;
        let c = t.command_endpoint();
        // The right token (from the environment): welcomed; the empty mesh
        // answers nothing, which exits 4.
        let out = cli_with_env(&at(c, &["services"]), &[("THYNAPSE_TOKEN", "s3cret")])?;
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        assert_table(&out.stdout, &["SERVICE", "INSTANCES", "VERSIONS"], &[]);
        for args in [
            vec!["services", "--token", "wrong", "--timeout-ms", "500"],
            vec!["services", "--timeout-ms", "500"],
        ] {
            let out = cli_fails(
                3,
                &at(c, &args),
                &format!("cannot reach the transmitter at {c}: "),
            )?;
            assert!(out.stderr.contains("token"), "{args:?}: {}", out.stderr);
        }
        Ok(())
    })
}

#[test]
fn usage_errors_exit_2_and_help_documents_the_exit_codes() -> anyhow::Result<()> {
    binary_watchdog("usage", || {
        for args in [
            vec!["publish", "orders::created", "not json"],
            vec!["publish", "orders::*"],
            vec!["tail", "bad pattern"],
            vec!["send", "{}"],
            vec!["services", "--where", "{not json"],
        ] {
            let out = cli_exits(2, &args)?;
            assert!(out.stderr.contains("error"), "{args:?}: {}", out.stderr);
        }
        let help = cli_exits(0, &["--help"])?.stdout;
        for code in [
            "0  success",
            "1  the transmitter refused",
            "3  the transmitter cannot be reached",
            "4  nothing matched",
        ] {
            assert!(help.contains(code), "no {code:?} in --help:\n{help}");
        }
        Ok(())
    })
}
