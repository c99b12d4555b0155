//! Targeted sends, metadata, discovery and membership end to end, across
//! two `thynapse` processes: raw cells carry metadata (versions, regions,
//! the users a gateway holds), `SEND` picks cells by a query, `META`
//! changes what a later send picks, `DISC` describes both transmitters'
//! cells, and `MEMB` frames on the event socket tell who joined and left.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use thynapse_tests::{
    binary_watchdog, eventually, Msg, RawCell, RawSub, TransmitterProcess, POLL, REPLY_TIMEOUT,
};

/// How long two transmitters may take to see each other's cells.
const CONVERGE: Duration = Duration::from_secs(20);

/// A 5 s heartbeat: raw cells only speak when the test makes them, and
/// must not be expired (after 3 × 5 s of silence) on a loaded machine.
const PATIENT: [&str; 2] = ["--heartbeat-ms", "5000"];

/// The channel `SEND` uses for `service` when it names none.
fn send_channel(service: &str) -> String {
    format!("send::{service}")
}

/// A cell of `service` with `metadata` on `t`, listening anycatch to
/// `send::<service>`.
fn cell_with(t: &TransmitterProcess, service: &str, metadata: Value) -> anyhow::Result<RawCell> {
    let mut c = RawCell::open(t.command_endpoint())?;
    let reference = c.next_ref();
    c.send_json(
        "HELO",
        &json!({"id": c.id(), "service": service, "metadata": metadata, "ref": reference}),
    )?;
    c.expect_reply("WLCM", &reference)?;
    c.listen(&send_channel(service), "any", true)?;
    Ok(c)
}

/// Two transmitters, B joined to A, and their cells:
///
/// | cell | on | service | metadata |
/// | --- | --- | --- | --- |
/// | `b19` | A | backend | version 1.9.0, region eu |
/// | `b210` | B | backend | version 2.10.0, region us |
/// | `b22` | A | backend | version 2.2.0, region eu |
/// | `gw1` | B | gateway | users [123, 456] |
/// | `gw2` | A | gateway | users [789] |
/// | `sender` | A | sender | (none) |
struct Mesh {
    a: TransmitterProcess,
    b: TransmitterProcess,
    b19: RawCell,
    b210: RawCell,
    b22: RawCell,
    gw1: RawCell,
    gw2: RawCell,
    sender: RawCell,
    /// How long until both transmitters saw every cell.
    converged: Duration,
}

impl Mesh {
    fn start() -> anyhow::Result<Mesh> {
        let a = TransmitterProcess::spawn(&PATIENT)?;
        let b =
            TransmitterProcess::spawn(&[PATIENT[0], PATIENT[1], "--join", a.command_endpoint()])?;
        let started = Instant::now();
        // The sender, which listens to nothing, says HELO before cells of
        // A listen, so that A announces it with them (see
        // `a_cell_that_listens_to_nothing_is_in_the_other_transmitters_view`).
        let mut sender = RawCell::open(a.command_endpoint())?;
        sender.hello("sender")?;
        let b19 = cell_with(&a, "backend", json!({"version": "1.9.0", "region": "eu"}))?;
        let b210 = cell_with(&b, "backend", json!({"version": "2.10.0", "region": "us"}))?;
        let b22 = cell_with(&a, "backend", json!({"version": "2.2.0", "region": "eu"}))?;
        let gw1 = cell_with(&b, "gateway", json!({"users": [123, 456]}))?;
        let gw2 = cell_with(&a, "gateway", json!({"users": [789]}))?;
        let mut mesh = Mesh {
            a,
            b,
            b19,
            b210,
            b22,
            gw1,
            gw2,
            sender,
            converged: Duration::ZERO,
        };
        mesh.until_both_views_hold_every_cell()?;
        mesh.converged = started.elapsed();
        Ok(mesh)
    }

    /// The THIDs of every cell.
    fn ids(&self) -> BTreeSet<String> {
        [
            &self.b19,
            &self.b210,
            &self.b22,
            &self.gw1,
            &self.gw2,
            &self.sender,
        ]
        .iter()
        .map(|c| c.id().to_hex())
        .collect()
    }

    /// Polls `DISC instances` on both transmitters (from `sender` on A and
    /// `gw1` on B) until each lists every cell, with its listen.
    fn until_both_views_hold_every_cell(&mut self) -> anyhow::Result<()> {
        let ids = self.ids();
        for side in ["A", "B"] {
            let mut last = Ok(Value::Null);
            let complete = eventually(CONVERGE, POLL, || {
                let asker = if side == "A" {
                    &mut self.sender
                } else {
                    &mut self.gw1
                };
                last = discover(asker, json!({"what": "instances"}));
                let Ok(Value::Array(instances)) = &last else {
                    return last.is_err();
                };
                let listening: BTreeSet<String> = instances
                    .iter()
                    .filter(|i| i["service"] == "sender" || i["listens"][0]["mode"] == "any")
                    .filter_map(|i| i["id"].as_str().map(str::to_owned))
                    .collect();
                listening.is_superset(&ids)
            });
            let last = last?;
            if !complete {
                bail!("transmitter {side} did not see every cell within {CONVERGE:?}: {last}");
            }
        }
        Ok(())
    }

    /// The backend cells, in the order b19, b210, b22.
    fn backends(&mut self) -> [&mut RawCell; 3] {
        [&mut self.b19, &mut self.b210, &mut self.b22]
    }
}

/// Asks `DISC` with `body` (a `ref` is added) and returns its `result`.
fn discover(cell: &mut RawCell, mut body: Value) -> anyhow::Result<Value> {
    let reference = cell.next_ref();
    body["ref"] = reference.clone();
    cell.send_json("DISC", &body)?;
    let okay = cell.expect_reply("OKAY", &reference)?;
    Ok(okay["result"].clone())
}

/// Sends `SEND` with `body` (a `ref` is added) and returns the reply:
/// the OKAY or the ERRR for it.
fn send(sender: &mut RawCell, mut body: Value) -> anyhow::Result<Msg> {
    let reference = sender.next_ref();
    body["ref"] = reference.clone();
    sender.send_json("SEND", &body)?;
    sender.expect_where(&format!("the reply to SEND {body}"), REPLY_TIMEOUT, |m| {
        (m.verb == "OKAY" && m.body["ref"] == reference)
            || (m.verb == "ERRR" && m.body["re"] == reference)
    })
}

/// Sends `SEND` with `body` and requires an OKAY routed to `routed` cells;
/// returns the event id.
fn send_ok(sender: &mut RawCell, body: Value, routed: u64) -> anyhow::Result<String> {
    let reply = send(sender, body.clone())?;
    if reply.verb != "OKAY" || reply.body["routed"] != routed {
        bail!("SEND {body}: expected OKAY routed {routed}, got {reply}");
    }
    reply.body["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("OKAY without an id: {reply}"))
}

/// Receives DLVRs on `cells` until `total` arrived, acking each; returns
/// the DLVR bodies per cell.
fn deliveries(cells: &mut [&mut RawCell], total: usize) -> anyhow::Result<Vec<Vec<Value>>> {
    let mut got: Vec<Vec<Value>> = vec![Vec::new(); cells.len()];
    let end = Instant::now() + REPLY_TIMEOUT;
    while got.iter().map(Vec::len).sum::<usize>() < total {
        for (i, c) in cells.iter_mut().enumerate() {
            while let Some(m) = c.recv(Duration::from_millis(1))? {
                if m.verb != "DLVR" {
                    bail!("cell {i} got {m}");
                }
                c.ack(m.body["id"].as_str().context("DLVR id")?)?;
                got[i].push(m.body);
            }
        }
        if Instant::now() >= end {
            let counts: Vec<usize> = got.iter().map(Vec::len).collect();
            bail!("only {counts:?} of {total} deliveries within {REPLY_TIMEOUT:?}");
        }
    }
    Ok(got)
}

/// Requires that none of `cells` holds a DLVR now (a PING barrier for
/// each: whatever its transmitter sent it before the PONG is in).
fn nothing_more(cells: &mut [&mut RawCell]) -> anyhow::Result<()> {
    for (i, c) in cells.iter_mut().enumerate() {
        c.ping()?;
        let extra: Vec<String> = c
            .drain()?
            .iter()
            .filter(|m| m.verb == "DLVR")
            .map(ToString::to_string)
            .collect();
        if !extra.is_empty() {
            bail!("cell {i} got more: {extra:?}");
        }
    }
    Ok(())
}

#[test]
fn sends_where_version_is_at_least_2_never_reach_1_9_and_are_spread_over_both_2x_cells(
) -> anyhow::Result<()> {
    binary_watchdog("targeted_version", || {
        let mut m = Mesh::start()?;
        eprintln!(
            "targeted: both views held every cell after {:?}",
            m.converged
        );
        const SENDS: usize = 40;
        for n in 0..SENDS {
            send_ok(
                &mut m.sender,
                json!({"service": "backend", "where": "version>=2.0.0", "payload": {"n": n}}),
                1,
            )?;
        }
        let got = deliveries(&mut m.backends(), SENDS)?;
        let counts: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(counts[0], 0, "the 1.9.0 cell got sends ({counts:?})");
        assert!(
            counts[1] >= SENDS / 4 && counts[2] >= SENDS / 4,
            "the sends are not spread over the 2.10.0 and 2.2.0 cells: {counts:?}"
        );
        let ns: BTreeSet<u64> = got
            .iter()
            .flatten()
            .filter_map(|d| d["payload"]["n"].as_u64())
            .collect();
        assert_eq!(ns.len(), SENDS, "each send arrived once");
        for d in got.iter().flatten() {
            assert_eq!(d["channel"], "send::backend", "{d}");
            assert_eq!(d["from"], m.sender.id().to_hex().as_str(), "{d}");
        }
        nothing_more(&mut m.backends())?;
        Ok(())
    })
}

#[test]
fn a_send_to_all_reaches_every_matching_cell_once() -> anyhow::Result<()> {
    binary_watchdog("targeted_all", || {
        let mut m = Mesh::start()?;
        let id = send_ok(
            &mut m.sender,
            json!({"service": "backend", "where": "version>=2.0.0", "all": true, "payload": "hi"}),
            2,
        )?;
        let got = deliveries(&mut m.backends(), 2)?;
        let counts: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(counts, [0, 1, 1], "all:true deliveries per backend cell");
        for d in got.iter().flatten() {
            assert_eq!(d["id"], id.as_str(), "{d}");
            assert_eq!(d["payload"], "hi", "{d}");
        }
        nothing_more(&mut m.backends())?;

        // Without a query, all:true reaches every cell of the service.
        send_ok(&mut m.sender, json!({"service": "backend", "all": true}), 3)?;
        let got = deliveries(&mut m.backends(), 3)?;
        assert!(got.iter().all(|d| d.len() == 1), "{got:?}");
        Ok(())
    })
}

#[test]
fn a_send_nothing_matches_fails_with_no_route_at_once() -> anyhow::Result<()> {
    binary_watchdog("targeted_no_route", || {
        let mut m = Mesh::start()?;
        let mut times = Vec::new();
        for body in [
            json!({"service": "backend", "where": "version>=3.0.0"}),
            json!({
                "service": "backend",
                "where": {"ops": [{"path": "/region", "op": "$eq", "to": "ap"}]}
            }),
            json!({"service": "nobody"}),
            json!({"service": "backend", "channel": "elsewhere::x"}),
        ]
        .into_iter()
        .cycle()
        .take(20)
        {
            let started = Instant::now();
            let reply = send(&mut m.sender, body.clone())?;
            times.push(started.elapsed());
            assert_eq!(reply.verb, "ERRR", "SEND {body}: {reply}");
            assert_eq!(reply.body["code"], "no_route", "SEND {body}: {reply}");
            assert!(reply.body["message"].is_string(), "{reply}");
        }
        times.sort();
        let (median, max) = (times[times.len() / 2], times[times.len() - 1]);
        eprintln!("targeted: no_route latency median {median:?} max {max:?}");
        assert!(
            median < Duration::from_millis(100),
            "no_route took {median:?} (median), expected well under 100 ms"
        );
        assert!(max < Duration::from_secs(1), "a no_route took {max:?}");
        nothing_more(&mut m.backends())?;
        Ok(())
    })
}

#[test]
fn a_droppable_send_nothing_matches_is_confirmed_as_routed_to_no_cell() -> anyhow::Result<()> {
    binary_watchdog("targeted_droppable", || {
        let mut m = Mesh::start()?;
        for body in [
            json!({"service": "backend", "where": "version>=3.0.0", "droppable": true}),
            // The flag may also sit in the JSON query.
            json!({"service": "backend", "where": {"ops": "version>=3.0.0", "droppable": true}}),
        ] {
            send_ok(&mut m.sender, body, 0)?;
        }
        // A droppable send that matches is delivered as usual.
        send_ok(
            &mut m.sender,
            json!({"service": "backend", "where": "version<2", "droppable": true}),
            1,
        )?;
        let got = deliveries(&mut m.backends(), 1)?;
        assert_eq!(got[0].len(), 1, "{got:?}");
        nothing_more(&mut m.backends())?;
        Ok(())
    })
}

#[test]
fn an_optional_send_nothing_matches_falls_back_to_any_cell_of_the_service() -> anyhow::Result<()> {
    binary_watchdog("targeted_optional", || {
        let mut m = Mesh::start()?;
        const SENDS: usize = 30;
        for n in 0..SENDS {
            send_ok(
                &mut m.sender,
                json!({
                    "service": "backend",
                    "where": "version>=3.0.0",
                    "optional": true,
                    "payload": n
                }),
                1,
            )?;
        }
        let got = deliveries(&mut m.backends(), SENDS)?;
        let counts: Vec<usize> = got.iter().map(Vec::len).collect();
        assert!(
            counts.iter().all(|&c| c > 0),
            "the fall-back goes to any cell, the 1.9.0 one included: {counts:?}"
        );
        // When something matches, optional changes nothing.
        for _ in 0..10 {
            send_ok(
                &mut m.sender,
                json!({"service": "backend", "where": "region=us", "optional": true}),
                1,
            )?;
        }
        let got = deliveries(&mut m.backends(), 10)?;
        let counts: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(counts, [0, 10, 0], "region=us is the 2.10.0 cell only");
        nothing_more(&mut m.backends())?;
        Ok(())
    })
}

#[test]
fn sends_with_the_same_key_keep_going_to_the_same_cell() -> anyhow::Result<()> {
    binary_watchdog("targeted_key", || {
        let mut m = Mesh::start()?;
        let keys: Vec<Value> = (0..20)
            .map(|k| json!(format!("user-{k}")))
            .chain([json!(42)])
            .collect();
        let mut cells_used = BTreeSet::new();
        for key in &keys {
            for round in 0..5 {
                send_ok(
                    &mut m.sender,
                    json!({
                        "service": "backend",
                        "where": "version>=2.0.0",
                        "key": key,
                        "payload": round
                    }),
                    1,
                )?;
            }
            let got = deliveries(&mut m.backends(), 5)?;
            let counts: Vec<usize> = got.iter().map(Vec::len).collect();
            let holder = counts
                .iter()
                .position(|&c| c == 5)
                .with_context(|| format!("key {key} went to several cells: {counts:?}"))?;
            assert_ne!(holder, 0, "key {key} reached the 1.9.0 cell");
            cells_used.insert(holder);
        }
        assert_eq!(
            cells_used.len(),
            2,
            "{} keys all went to one cell: keys do not spread",
            keys.len()
        );
        nothing_more(&mut m.backends())?;
        Ok(())
    })
}

#[test]
fn a_send_reaches_the_gateway_that_holds_the_user() -> anyhow::Result<()> {
    binary_watchdog("targeted_gateway", || {
        let mut m = Mesh::start()?;
        let holds = |user: u64| json!({"ops": [{"path": "/users", "op": "$contains", "to": user}]});
        for user in [123, 456, 789, 123, 789] {
            send_ok(
                &mut m.sender,
                json!({"service": "gateway", "where": holds(user), "payload": {"user": user}}),
                1,
            )?;
        }
        let got = deliveries(&mut [&mut m.gw1, &mut m.gw2], 5)?;
        let users = |d: &Vec<Value>| -> Vec<u64> {
            d.iter()
                .filter_map(|d| d["payload"]["user"].as_u64())
                .collect()
        };
        assert_eq!(
            users(&got[0]),
            [123, 456, 123],
            "gateway 1 (on B) holds 123 and 456"
        );
        assert_eq!(users(&got[1]), [789, 789], "gateway 2 (on A) holds 789");
        let reply = send(
            &mut m.sender,
            json!({"service": "gateway", "where": holds(999)}),
        )?;
        assert_eq!(
            reply.body["code"], "no_route",
            "nobody holds user 999: {reply}"
        );
        nothing_more(&mut [&mut m.gw1, &mut m.gw2])?;
        Ok(())
    })
}

/// Sends to `where` until a send is routed (`no_route` means the view
/// has not caught up yet); returns which of the backend cells got it.
fn first_routed(m: &mut Mesh, query: &str) -> anyhow::Result<usize> {
    let end = Instant::now() + CONVERGE;
    loop {
        let reply = send(&mut m.sender, json!({"service": "backend", "where": query}))?;
        match (reply.verb.as_str(), reply.body["code"].as_str()) {
            ("OKAY", _) if reply.body["routed"] == 1 => {
                let got = deliveries(&mut m.backends(), 1)?;
                return got
                    .iter()
                    .position(|d| d.len() == 1)
                    .context("a delivery arrived");
            }
            ("ERRR", Some("no_route")) if Instant::now() < end => std::thread::sleep(POLL),
            _ => bail!("SEND where {query}: {reply}"),
        }
    }
}

#[test]
fn a_metadata_update_changes_which_cell_a_later_send_picks() -> anyhow::Result<()> {
    binary_watchdog("targeted_meta", || {
        let mut m = Mesh::start()?;
        let reply = send(
            &mut m.sender,
            json!({"service": "backend", "where": "role=primary"}),
        )?;
        assert_eq!(reply.body["code"], "no_route", "{reply}");

        // The 2.10.0 cell, on the other transmitter, becomes primary.
        let reference = m.b210.next_ref();
        m.b210.send_json(
            "META",
            &json!({"metadata": {"role": "primary"}, "ref": reference}),
        )?;
        let okay = m.b210.expect_reply("OKAY", &reference)?;
        let meta = &okay["metadata"];
        assert_eq!(meta["role"], "primary", "merged: {okay}");
        assert_eq!(meta["version"], "2.10.0", "merged: {okay}");
        assert_eq!(meta["transmitter"], m.b.id(), "reserved keys stay: {okay}");
        let started = Instant::now();
        let picked = first_routed(&mut m, "role=primary")?;
        eprintln!(
            "targeted: a META on B changed sends from A after {:?}",
            started.elapsed()
        );
        assert_eq!(picked, 1, "role=primary is the 2.10.0 cell");

        // Primary moves to the 2.2.0 cell (on A).
        for (cell, role) in [(1, "standby"), (2, "primary")] {
            let c = &mut m.backends()[cell];
            let reference = c.next_ref();
            c.send_json(
                "META",
                &json!({"metadata": {"role": role}, "ref": reference}),
            )?;
            c.expect_reply("OKAY", &reference)?;
        }
        let b22 = m.b22.id().to_hex();
        let mut last = Ok(Value::Null);
        let moved = eventually(CONVERGE, POLL, || {
            last = discover(
                &mut m.sender,
                json!({"what": "instances", "where": "role=primary"}),
            );
            match &last {
                Ok(Value::Array(i)) => i.len() == 1 && i[0]["id"] == b22.as_str(),
                _ => last.is_err(),
            }
        });
        let last = last?;
        assert!(
            moved,
            "the view never showed only the 2.2.0 cell as primary: {last}"
        );
        for _ in 0..10 {
            send_ok(
                &mut m.sender,
                json!({"service": "backend", "where": "role=primary"}),
                1,
            )?;
        }
        let got = deliveries(&mut m.backends(), 10)?;
        let counts: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(counts, [0, 0, 10], "every send goes to the new primary");

        // replace: the 1.9.0 cell starts over with only a new version.
        let reference = m.b19.next_ref();
        m.b19.send_json(
            "META",
            &json!({"metadata": {"version": "3.0.0"}, "replace": true, "ref": reference}),
        )?;
        let okay = m.b19.expect_reply("OKAY", &reference)?;
        assert_eq!(okay["metadata"]["version"], "3.0.0", "{okay}");
        assert!(okay["metadata"].get("region").is_none(), "replaced: {okay}");
        assert_eq!(
            okay["metadata"]["transmitter"],
            m.a.id(),
            "reserved keys stay: {okay}"
        );
        assert_eq!(first_routed(&mut m, "version>=3")?, 0);
        nothing_more(&mut m.backends())?;
        Ok(())
    })
}

#[test]
fn discovery_describes_the_cells_of_both_transmitters() -> anyhow::Result<()> {
    binary_watchdog("targeted_discovery", || {
        let mut m = Mesh::start()?;
        let (a, b) = (m.a.id().to_owned(), m.b.id().to_owned());
        let expected: Vec<(String, &str, &str)> = vec![
            (m.b19.id().to_hex(), "backend", a.as_str()),
            (m.b210.id().to_hex(), "backend", b.as_str()),
            (m.b22.id().to_hex(), "backend", a.as_str()),
            (m.gw1.id().to_hex(), "gateway", b.as_str()),
            (m.gw2.id().to_hex(), "gateway", a.as_str()),
            (m.sender.id().to_hex(), "sender", a.as_str()),
        ];
        for side in ["A", "B"] {
            let asker = if side == "A" {
                &mut m.sender
            } else {
                &mut m.gw1
            };
            let instances = discover(asker, json!({"what": "instances"}))?;
            let list = instances.as_array().context("instances is a list")?;
            assert_eq!(list.len(), expected.len(), "asked at {side}: {instances}");
            for (id, service, transmitter) in &expected {
                let i = list
                    .iter()
                    .find(|i| i["id"] == id.as_str())
                    .with_context(|| format!("asked at {side}: no instance {id} in {instances}"))?;
                assert_eq!(i["service"], *service, "asked at {side}: {i}");
                assert_eq!(i["transmitter"], *transmitter, "asked at {side}: {i}");
                assert_eq!(
                    i["metadata"]["transmitter"], *transmitter,
                    "asked at {side}: {i}"
                );
                if *service != "sender" {
                    assert_eq!(
                        i["listens"],
                        json!([{"pattern": send_channel(service), "mode": "any"}]),
                        "asked at {side}: {i}"
                    );
                }
            }
            let services = discover(asker, json!({"what": "services"}))?;
            assert_eq!(
                services,
                json!([
                    {
                        "service": "backend",
                        "instances": 3,
                        "versions": ["1.9.0", "2.10.0", "2.2.0"]
                    },
                    {"service": "gateway", "instances": 2, "versions": ["(none)"]},
                    {"service": "sender", "instances": 1, "versions": ["(none)"]},
                ]),
                "asked at {side}"
            );
            let eu = discover(
                asker,
                json!({"what": "instances", "service": "backend", "where": "region=eu"}),
            )?;
            let eu: BTreeSet<&str> = eu
                .as_array()
                .context("instances is a list")?
                .iter()
                .filter_map(|i| i["id"].as_str())
                .collect();
            let want: BTreeSet<&str> = [expected[0].0.as_str(), expected[2].0.as_str()].into();
            assert_eq!(eu, want, "asked at {side}: backend cells in eu");
        }
        Ok(())
    })
}

#[test]
fn a_cell_that_listens_to_nothing_is_in_the_other_transmitters_view() -> anyhow::Result<()> {
    binary_watchdog("targeted_listenless_cell", || {
        let mut m = Mesh::start()?;
        // The mesh has settled. A cell that only publishes joins A: both
        // transmitters must list it, as they list the others. (Within
        // 10 s: the silent cells of the fixture expire after 15 s, and
        // that change would carry it along.)
        let mut quiet = RawCell::open(m.a.command_endpoint())?;
        quiet.hello("sender")?;
        quiet.publish("anything::x", &json!({}))?;
        quiet.ping()?;
        let id = quiet.id().to_hex();
        for (side, asker) in [("A", &mut m.sender), ("B", &mut m.gw1)] {
            let mut last = Ok(Value::Null);
            let listed = eventually(Duration::from_secs(10), POLL, || {
                last = discover(asker, json!({"what": "instances", "service": "sender"}));
                match &last {
                    Ok(Value::Array(i)) => i.iter().any(|i| i["id"] == id.as_str()),
                    _ => last.is_err(),
                }
            });
            let last = last?;
            assert!(
                listed,
                "transmitter {side} does not list the new cell {id}, which listens to \
                 nothing, 10 s after its HELO: {last}"
            );
        }
        Ok(())
    })
}

/// The next `MEMB backend` frame about cell `id` on `sub`, as its body.
fn membership_of(sub: &mut RawSub, id: &str, timeout: Duration) -> anyhow::Result<Value> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let Some(parts) = sub.recv(left)? else {
            bail!("no MEMB frame about {id} within {timeout:?}");
        };
        let text = String::from_utf8_lossy(&parts[0]).into_owned();
        let Some(json) = text.strip_prefix("MEMB backend ") else {
            bail!("not a MEMB backend frame: {text:?}");
        };
        let body: Value = serde_json::from_str(json).with_context(|| format!("{text:?}"))?;
        if body["cell"]["id"] == id {
            return Ok(body);
        }
    }
}

#[test]
fn a_subscriber_sees_a_cell_of_the_other_transmitter_join_change_and_leave() -> anyhow::Result<()> {
    binary_watchdog("targeted_membership", || {
        let m = Mesh::start()?;
        let mut sub = RawSub::open(m.a.event_endpoint(), None)?;
        sub.subscribe("MEMB backend ")?;
        sub.sync(REPLY_TIMEOUT)?;

        let started = Instant::now();
        let mut x = cell_with(&m.b, "backend", json!({"version": "2.3.0"}))?;
        let id = x.id().to_hex();
        let joined = membership_of(&mut sub, &id, CONVERGE)?;
        let seen_after = started.elapsed();
        assert_eq!(joined["event"], "joined", "{joined}");
        assert_eq!(joined["cell"]["service"], "backend", "{joined}");
        assert_eq!(joined["cell"]["transmitter"], m.b.id(), "{joined}");
        assert_eq!(joined["cell"]["metadata"]["version"], "2.3.0", "{joined}");

        let reference = x.next_ref();
        x.send_json(
            "META",
            &json!({"metadata": {"version": "2.3.1"}, "ref": reference}),
        )?;
        x.expect_reply("OKAY", &reference)?;
        let updated = membership_of(&mut sub, &id, CONVERGE)?;
        assert_eq!(updated["event"], "updated", "{updated}");
        assert_eq!(updated["cell"]["metadata"]["version"], "2.3.1", "{updated}");

        x.bye()?;
        let left = membership_of(&mut sub, &id, CONVERGE)?;
        assert_eq!(left["event"], "left", "{left}");
        assert_eq!(left["cell"]["transmitter"], m.b.id(), "{left}");
        eprintln!(
            "targeted: A's event socket announced B's new cell {seen_after:?} after its HELO, \
             its departure {:?} after the HELO",
            started.elapsed()
        );
        Ok(())
    })
}
