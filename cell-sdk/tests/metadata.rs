//! Metadata, targeted sends, discovery and membership against an
//! in-process transmitter.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Map, Value};
use thynapse_cell::{
    Client, ErrorKind, MembershipChange, MembershipEvent, MembershipStream, Mode, Options,
};
use thynapse_transmitter::Transmitter;

async fn cell_with_version(t: &Transmitter, service: &str, version: &str) -> Client {
    Client::connect(
        t.command_endpoint(),
        Options::new(service).metadata("version", version),
    )
    .await
    .expect("client connects")
}

#[tokio::test]
async fn a_targeted_send_reaches_only_the_cells_whose_metadata_matches() {
    watchdog(async {
        let t = start(config());
        let mut cells = Vec::new();
        for version in ["1.4.0", "1.9.2", "2.1.0"] {
            let c = cell_with_version(&t, "workers", version).await;
            let s = c.listen("send::workers", Mode::Any).await.unwrap();
            cells.push((c, s));
        }
        let sender = client(&t, "shop").await;

        for n in 0..5 {
            let confirm = sender
                .send_to("workers")
                .matching("version>=2.0.0")
                .send(json!({"n": n}))
                .await
                .unwrap();
            assert_eq!(confirm.routed, 1);
            let e = next(&mut cells[2].1).await;
            assert_eq!(e.payload_value(), json!({"n": n}));
            assert_eq!(e.id(), confirm.id);
        }
        for (_, s) in &mut cells[..2] {
            assert!(arrives_within(s, Duration::from_millis(100))
                .await
                .is_none());
        }

        // Every 1.x cell, on a channel of our choosing (JSON query form).
        let mut jobs = Vec::new();
        for (c, _) in &cells {
            jobs.push(c.listen("jobs::*", Mode::Any).await.unwrap());
        }
        let query = json!({"ops": [{"path": "/version", "op": "$lt", "to": "2.0.0"}]});
        let confirm = sender
            .send_to("workers")
            .matching(query)
            .all()
            .channel("jobs::rebuild")
            .bytes(vec![7u8])
            .await
            .unwrap();
        assert_eq!(confirm.routed, 2);
        for s in &mut jobs[..2] {
            let e = next(s).await;
            assert_eq!(
                (e.channel(), e.binary()),
                ("jobs::rebuild", Some(&[7u8][..]))
            );
        }
        assert!(arrives_within(&mut jobs[2], Duration::from_millis(100))
            .await
            .is_none());

        // No match: no route, unless droppable.
        let err = sender
            .send_to("workers")
            .matching("version>=3")
            .send(1)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoRoute);
        let confirm = sender
            .send_to("workers")
            .matching("version>=3")
            .droppable()
            .send(1)
            .await
            .unwrap();
        assert_eq!(confirm.routed, 0);
        let err = sender
            .send_to("workers")
            .matching("version>=")
            .send(1)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadQuery);
    })
    .await;
}

/// The metadata discovery reports for one cell.
async fn discovered_metadata(asker: &Client, cell: &Client) -> Map<String, Value> {
    let instances = asker
        .discover("instances")
        .service(cell.service())
        .await
        .unwrap();
    let id = Value::String(cell.id().to_hex());
    let instance = instances
        .as_array()
        .expect("a list of instances")
        .iter()
        .find(|i| i["id"] == id)
        .expect("the cell is an instance");
    instance["metadata"].as_object().unwrap().clone()
}

#[tokio::test]
async fn updated_metadata_is_what_discovery_reports() {
    watchdog(async {
        let t = start(config());
        let cell = cell_with_version(&t, "billing", "1.0.0").await;
        let asker = client(&t, "ops").await;
        assert_eq!(discovered_metadata(&asker, &cell).await["version"], "1.0.0");

        let mut update = Map::new();
        update.insert("version".into(), json!("1.1.0"));
        update.insert("region".into(), json!("eu"));
        let effective = cell.update_metadata(update, false).await.unwrap();
        assert_eq!(effective["version"], "1.1.0");
        assert_eq!(effective["region"], "eu");
        assert_eq!(effective["transmitter"], t.id().to_hex());
        let seen = discovered_metadata(&asker, &cell).await;
        assert_eq!(seen["version"], "1.1.0");
        assert_eq!(seen["region"], "eu");

        // Replacing drops the other keys, but not the transmitter's own.
        let mut update = Map::new();
        update.insert("tier".into(), json!("gold"));
        let effective = cell.update_metadata(update, true).await.unwrap();
        assert!(effective.get("version").is_none());
        assert_eq!(effective["tier"], "gold");
        assert!(effective.contains_key("transmitter"));
        assert_eq!(discovered_metadata(&asker, &cell).await, effective);

        // A query sees it too, and so do the other questions.
        let regions = asker
            .discover("services")
            .matching("tier=gold")
            .await
            .unwrap();
        assert_eq!(regions[0]["service"], "billing");
        assert_eq!(regions.as_array().unwrap().len(), 1);

        let mut reserved = Map::new();
        reserved.insert("host".into(), json!("elsewhere"));
        let err = cell.update_metadata(reserved, false).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidMetadata);
        let err = asker.discover("everything").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected);
    })
    .await;
}

/// The next membership event about `cell`, skipping others.
async fn next_about(stream: &mut MembershipStream, cell: &Client) -> MembershipEvent {
    loop {
        let event = tokio::time::timeout(PATIENCE, stream.next_event())
            .await
            .expect("a membership event within the deadline")
            .expect("the stream is open");
        if event.cell == cell.id() {
            return event;
        }
    }
}

#[tokio::test]
async fn membership_streams_see_cells_join_change_and_leave() {
    watchdog(async {
        let t = start(config());
        let watcher = client(&t, "ops").await;
        let mut billing = watcher.membership(Some("bill")).await.unwrap();
        let mut everyone = watcher.membership(None).await.unwrap();

        let cell = cell_with_version(&t, "billing", "1.0.0").await;
        let joined = next_about(&mut billing, &cell).await;
        assert_eq!(joined.change, MembershipChange::Joined);
        assert_eq!(joined.service, "billing");
        assert_eq!(joined.metadata["version"], "1.0.0");
        assert_eq!(joined.transmitter, t.id());
        assert_eq!(
            next_about(&mut everyone, &cell).await.change,
            MembershipChange::Joined
        );

        let mut update = Map::new();
        update.insert("version".into(), json!("1.0.1"));
        cell.update_metadata(update, false).await.unwrap();
        let updated = next_about(&mut billing, &cell).await;
        assert_eq!(updated.change, MembershipChange::Updated);
        assert_eq!(updated.metadata["version"], "1.0.1");

        // Another service's cells are not in the "bill" stream.
        let shop = client(&t, "shop").await;
        assert_eq!(
            next_about(&mut everyone, &shop).await.change,
            MembershipChange::Joined
        );

        cell.close().await;
        let left = next_about(&mut billing, &cell).await;
        assert_eq!(left.change, MembershipChange::Left);
        // The "bill" stream saw only billing's cell.
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(50), billing.next_event()).await
        {
            assert!(e.service.starts_with("bill"), "{e:?}");
        }
    })
    .await;
}
