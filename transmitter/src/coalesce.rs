//! Batching at send time: runs of `DLVR` frames, or of multicatch `EVNT`
//! frames, to one cell that takes batches (HELO `batch`) become one
//! [`Output::Batch`], and runs of `MDLV` or `MEVT` frames to another
//! transmitter that takes them one [`Output::NodeBatch`]: one frame whose
//! body is the JSON array of their bodies, in order, followed by their
//! binary frames (a run has a binary frame for every message or for
//! none). One ZeroMQ message then carries many, which is where libzmq's
//! cost per message goes. For a cell that takes packed batches (HELO
//! `packed`), a run with binary frames carries them in one frame, each
//! element saying its `bin` length (PROTOCOL.md §23). Everything else
//! passes unchanged, and the messages to one destination keep their order.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use thynapse_protocol::Thid;

use crate::router::{Merged, Output, PeerId};

/// Most messages in one batch.
pub const MAX_ITEMS: u32 = 256;
/// Most bytes of one batch, frames together.
pub const MAX_BYTES: usize = 64 * 1024;

/// The length of a frame's header, `J VERB `.
const HEADER: usize = 7;

/// How a destination takes batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Not at all: every message goes alone.
    Off,
    /// Merged, with one binary frame per message (or none).
    Frames,
    /// Merged, with the binary payloads in one frame (a cell that said
    /// HELO `packed`).
    Packed,
}

/// Where an output goes.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Dest {
    Peer(PeerId),
    Node(Thid),
}

impl Dest {
    fn of(o: &Output) -> Option<Dest> {
        match o {
            Output::ToPeer { peer, .. }
            | Output::Multicatch { peer, .. }
            | Output::Batch { peer, .. } => Some(Dest::Peer(peer.clone())),
            Output::ToNode { node, .. } | Output::NodeBatch { node, .. } => Some(Dest::Node(*node)),
            Output::Publish { .. } => None,
        }
    }
}

/// A message that may join a batch.
struct Item<'a> {
    frame: &'a [u8],
    binary: Option<&'a Arc<[u8]>>,
}

impl<'a> Item<'a> {
    /// `o` as an item, if it is a single `DLVR`, multicatch `EVNT`,
    /// `MDLV` or `MEVT`.
    fn of(o: &'a Output) -> Option<Item<'a>> {
        let frame = o.frame();
        let single = match o {
            Output::ToPeer { .. } => frame.starts_with(b"J DLVR {"),
            Output::Multicatch { .. } => true,
            Output::ToNode { .. } => {
                frame.starts_with(b"J MDLV {") || frame.starts_with(b"J MEVT {")
            }
            _ => false,
        };
        single.then(|| Item {
            frame,
            binary: o.binaries().first(),
        })
    }

    fn size(&self) -> usize {
        self.frame.len() + self.binary.map_or(0, |b| b.len())
    }
}

/// Moves `from` into `to`, merging what can be merged for the cells and
/// transmitters as `batching` says (given a cell's connection or a
/// transmitter's THID).
pub fn coalesce(
    from: &mut Vec<Output>,
    to: &mut Vec<Output>,
    batching: impl Fn(Result<&[u8], &Thid>) -> Batching,
) {
    // The open run of each destination: its index in `to`.
    let mut open: HashMap<Dest, usize> = HashMap::new();
    for o in from.drain(..) {
        let Some(dest) = Dest::of(&o) else {
            to.push(o);
            continue;
        };
        let batching = match &dest {
            Dest::Peer(p) => batching(Ok(p)),
            Dest::Node(n) => batching(Err(n)),
        };
        let Some(item) = Item::of(&o).filter(|_| batching != Batching::Off) else {
            close(to, open.remove(&dest));
            to.push(o);
            continue;
        };
        if let Some(&at) = open.get(&dest) {
            if join(&mut to[at], &item, batching == Batching::Packed) {
                continue;
            }
        }
        let at = to.len();
        close(to, open.insert(dest, at));
        to.push(o);
    }
    for at in open.into_values() {
        close(to, Some(at));
    }
}

/// Appends an item's body to a batch frame; packed, with its `bin` length
/// as the last field.
fn push_body(frame: &mut Vec<u8>, item: &Item<'_>, packed: bool) {
    let body = &item.frame[HEADER..];
    match item.binary.filter(|_| packed) {
        Some(binary) => {
            // `{...}` becomes `{...,"bin":n}`.
            frame.extend_from_slice(&body[..body.len() - 1]);
            frame.extend_from_slice(b",\"bin\":");
            let mut digits = [0u8; 20];
            frame.extend_from_slice(thynapse_protocol::thid::decimal(
                binary.len() as u64,
                &mut digits,
            ));
            frame.push(b'}');
        }
        None => frame.extend_from_slice(body),
    }
}

/// Adds `item` to the run at `run` (a single message so far, or a
/// batch), if it fits: same verb, both with binary frames or both
/// without, room left. `packed`: the destination takes packed batches.
fn join(run: &mut Output, item: &Item<'_>, packed: bool) -> bool {
    if let Some(first) = Item::of(run) {
        let fits = first.frame[..HEADER] == item.frame[..HEADER]
            && first.binary.is_some() == item.binary.is_some()
            && first.size() + item.size() < MAX_BYTES;
        if !fits {
            return false;
        }
        // `J VERB {first}` becomes `J VERB [{first}`; room for a few
        // dozen more, so that the batch rarely grows.
        let mut frame = Vec::with_capacity((first.frame.len() * 32).min(MAX_BYTES));
        frame.extend_from_slice(&first.frame[..HEADER]);
        frame.push(b'[');
        push_body(&mut frame, &first, packed);
        let merged = Merged {
            frame,
            binaries: first.binary.cloned().into_iter().collect(),
            count: 1,
            bytes: first.size(),
            packed: packed && first.binary.is_some(),
        };
        *run = match run {
            Output::ToPeer { peer, .. } => Output::Batch {
                peer: std::mem::take(peer),
                merged,
                multicatch: false,
            },
            Output::Multicatch { peer, .. } => Output::Batch {
                peer: std::mem::take(peer),
                merged,
                multicatch: true,
            },
            Output::ToNode { node, .. } => Output::NodeBatch {
                node: *node,
                merged,
            },
            _ => return false,
        };
    }
    let (Output::Batch { merged, .. } | Output::NodeBatch { merged, .. }) = run else {
        return false;
    };
    let fits = merged.frame[..HEADER] == item.frame[..HEADER]
        && merged.binaries.is_empty() != item.binary.is_some()
        && merged.count < MAX_ITEMS
        && merged.bytes + item.size() < MAX_BYTES;
    if !fits {
        return false;
    }
    merged.frame.push(b',');
    push_body(&mut merged.frame, item, merged.packed);
    merged.binaries.extend(item.binary.cloned());
    merged.count += 1;
    merged.bytes += item.size();
    true
}

/// Ends the run at `to[at]`: a batch gets its closing bracket; a single
/// message stays the plain frame it was.
fn close(to: &mut [Output], at: Option<usize>) {
    if let Some(Output::Batch { merged, .. } | Output::NodeBatch { merged, .. }) =
        at.map(|at| &mut to[at])
    {
        merged.frame.push(b']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_peer(peer: &str, frame: &str) -> Output {
        Output::ToPeer {
            peer: Arc::from(peer.as_bytes()),
            frame: frame.as_bytes().to_vec(),
            binary: None,
        }
    }

    fn with_binary(o: Output, b: &str) -> Output {
        match o {
            Output::ToPeer { peer, frame, .. } => Output::ToPeer {
                peer,
                frame,
                binary: Some(Arc::from(b.as_bytes())),
            },
            other => other,
        }
    }

    fn multicatch(peer: &str, frame: &str) -> Output {
        Output::Multicatch {
            peer: Arc::from(peer.as_bytes()),
            frame: Arc::from(frame.as_bytes()),
            binary: None,
        }
    }

    /// Each output as (peer, frame, binaries), batches marked by `xN`
    /// after the peer (`mN` for multicatch, `pN` when packed).
    fn run(outputs: Vec<Output>, batching: &[&str]) -> Vec<(String, String, Vec<String>)> {
        run_packing(outputs, batching, &[])
    }

    /// [`run`], with the cells in `packing` taking packed batches.
    fn run_packing(
        outputs: Vec<Output>,
        batching: &[&str],
        packing: &[&str],
    ) -> Vec<(String, String, Vec<String>)> {
        let mut from = outputs;
        let mut to = Vec::new();
        coalesce(&mut from, &mut to, |dest| match dest {
            Ok(p) if packing.iter().any(|b| b.as_bytes() == p) => Batching::Packed,
            Ok(p) if batching.iter().any(|b| b.as_bytes() == p) => Batching::Frames,
            Ok(_) => Batching::Off,
            Err(_) => Batching::Frames,
        });
        assert!(from.is_empty());
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        to.into_iter()
            .map(|o| match &o {
                Output::ToPeer { peer, binary, .. } | Output::Multicatch { peer, binary, .. } => (
                    text(peer),
                    text(o.frame()),
                    binary.iter().map(|b| text(b)).collect(),
                ),
                Output::Batch {
                    peer,
                    merged,
                    multicatch,
                } => (
                    format!(
                        "{}{}{}{}",
                        text(peer),
                        if *multicatch { "m" } else { "x" },
                        if merged.packed { "p" } else { "" },
                        merged.count
                    ),
                    text(&merged.frame),
                    merged.binaries.iter().map(|b| text(b)).collect(),
                ),
                Output::ToNode { node, frame, .. } => (node.to_string(), text(frame), vec![]),
                Output::NodeBatch { node, merged } => (
                    format!("{node}n{}", merged.count),
                    text(&merged.frame),
                    merged.binaries.iter().map(|b| text(b)).collect(),
                ),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn row(peer: &str, frame: &str, binaries: &[&str]) -> (String, String, Vec<String>) {
        (
            peer.into(),
            frame.into(),
            binaries.iter().map(|b| b.to_string()).collect(),
        )
    }

    #[test]
    fn runs_to_a_batching_cell_merge_in_order_and_others_pass() {
        let got = run(
            vec![
                to_peer("a", r#"J DLVR {"n":1}"#),
                to_peer("b", r#"J DLVR {"n":1}"#),
                to_peer("a", r#"J DLVR {"n":2}"#),
                multicatch("a", r#"J EVNT {"m":1}"#),
                multicatch("a", r#"J EVNT {"m":2}"#),
                to_peer("a", r#"J OKAY {}"#),
                to_peer("a", r#"J DLVR {"n":3}"#),
                to_peer("b", r#"J DLVR {"n":2}"#),
                to_peer("a", r#"J RQST {"r":1}"#),
            ],
            &["a"],
        );
        assert_eq!(
            got,
            [
                row("ax2", r#"J DLVR [{"n":1},{"n":2}]"#, &[]),
                row("b", r#"J DLVR {"n":1}"#, &[]),
                row("am2", r#"J EVNT [{"m":1},{"m":2}]"#, &[]),
                row("a", r#"J OKAY {}"#, &[]),
                row("a", r#"J DLVR {"n":3}"#, &[]),
                row("b", r#"J DLVR {"n":2}"#, &[]),
                row("a", r#"J RQST {"r":1}"#, &[]),
            ]
        );
    }

    #[test]
    fn runs_to_another_transmitter_merge_too() {
        let node = Thid::random();
        let to_node = |frame: &str| Output::ToNode {
            node,
            frame: frame.as_bytes().to_vec(),
            binary: None,
        };
        let got = run(
            vec![
                to_node(r#"J MDLV {"n":1}"#),
                to_node(r#"J MDLV {"n":2}"#),
                to_node(r#"J MACK {"ids":[]}"#),
                to_node(r#"J MEVT {"m":1}"#),
                to_node(r#"J MEVT {"m":2}"#),
            ],
            &[],
        );
        assert_eq!(
            got,
            [
                row(&format!("{node}n2"), r#"J MDLV [{"n":1},{"n":2}]"#, &[]),
                row(&node.to_string(), r#"J MACK {"ids":[]}"#, &[]),
                row(&format!("{node}n2"), r#"J MEVT [{"m":1},{"m":2}]"#, &[]),
            ]
        );
    }

    #[test]
    fn binary_frames_travel_with_their_deliveries_and_full_batches_start_anew() {
        let mut outputs = vec![
            to_peer("a", r#"J DLVR {"n":0}"#),
            with_binary(to_peer("a", r#"J DLVR {"n":1}"#), "b1"),
            with_binary(to_peer("a", r#"J DLVR {"n":2}"#), "b2"),
        ];
        for n in 3..3 + MAX_ITEMS + 1 {
            outputs.push(to_peer("a", &format!(r#"J DLVR {{"n":{n}}}"#)));
        }
        let got = run(outputs, &["a"]);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], row("a", r#"J DLVR {"n":0}"#, &[]));
        assert_eq!(
            got[1],
            row("ax2", r#"J DLVR [{"n":1},{"n":2}]"#, &["b1", "b2"])
        );
        assert_eq!(got[2].0, format!("ax{MAX_ITEMS}"));
        let full: Vec<serde_json::Value> =
            serde_json::from_str(got[2].1.strip_prefix("J DLVR ").unwrap()).unwrap();
        assert_eq!(full[0]["n"], 3);
        assert_eq!(
            got[3],
            row("a", &format!(r#"J DLVR {{"n":{}}}"#, 3 + MAX_ITEMS), &[])
        );
    }

    #[test]
    fn a_packing_cell_gets_its_binaries_packed_and_each_body_says_its_bin() {
        let got = run_packing(
            vec![
                with_binary(to_peer("a", r#"J DLVR {"n":1}"#), "b1"),
                with_binary(to_peer("a", r#"J DLVR {"n":2}"#), ""),
                with_binary(to_peer("a", r#"J DLVR {"n":3}"#), "b333"),
                to_peer("a", r#"J DLVR {"n":4}"#),
                to_peer("a", r#"J DLVR {"n":5}"#),
                with_binary(to_peer("a", r#"J DLVR {"n":6}"#), "alone"),
                to_peer("a", r#"J OKAY {}"#),
            ],
            &[],
            &["a"],
        );
        assert_eq!(
            got,
            [
                row(
                    "axp3",
                    r#"J DLVR [{"n":1,"bin":2},{"n":2,"bin":0},{"n":3,"bin":4}]"#,
                    &["b1", "", "b333"]
                ),
                row("ax2", r#"J DLVR [{"n":4},{"n":5}]"#, &[]),
                row("a", r#"J DLVR {"n":6}"#, &["alone"]),
                row("a", r#"J OKAY {}"#, &[]),
            ]
        );
    }

    #[test]
    fn a_packing_transmitter_gets_its_binaries_packed_too() {
        let node = Thid::random();
        let to_node = |frame: &str, b: &str| Output::ToNode {
            node,
            frame: frame.as_bytes().to_vec(),
            binary: Some(Arc::from(b.as_bytes())),
        };
        let mut from = vec![
            to_node(r#"J MDLV {"n":1}"#, "b1"),
            to_node(r#"J MDLV {"n":2}"#, "b22"),
        ];
        let mut to = Vec::new();
        coalesce(&mut from, &mut to, |_| Batching::Packed);
        let [Output::NodeBatch { merged, .. }] = &to[..] else {
            panic!("{to:?}");
        };
        assert!(merged.packed);
        assert_eq!(
            String::from_utf8_lossy(&merged.frame),
            r#"J MDLV [{"n":1,"bin":2},{"n":2,"bin":3}]"#
        );
    }
}
