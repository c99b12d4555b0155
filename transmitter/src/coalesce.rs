//! Batching at send time: runs of `DLVR` frames, or of multicatch `EVNT`
//! frames, to one cell that takes batches (HELO `batch`) become one
//! [`Output::Batch`]: one frame whose body is the JSON array of their
//! bodies, in order, followed by their binary frames (a run has a binary
//! frame for every delivery or for none). One ZeroMQ message then carries
//! many deliveries, which is where libzmq's cost per message goes.
//! Everything else passes unchanged, and a cell's messages keep their
//! order.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

use crate::router::{Output, PeerId};

/// Most deliveries in one batch.
pub const MAX_ITEMS: u32 = 256;
/// Most bytes of one batch, frames together.
pub const MAX_BYTES: usize = 64 * 1024;

/// The length of a frame's header, `J VERB `.
const HEADER: usize = 7;

/// A delivery that may join a batch.
struct Item<'a> {
    peer: &'a PeerId,
    frame: &'a [u8],
    binary: Option<&'a Arc<Vec<u8>>>,
}

impl<'a> Item<'a> {
    /// `o` as an item, if it is a single `DLVR` or multicatch `EVNT`.
    fn of(o: &'a Output) -> Option<Item<'a>> {
        match o {
            Output::ToPeer {
                peer,
                frame,
                binary,
            } if frame.starts_with(b"J DLVR {") => Some(Item {
                peer,
                frame,
                binary: binary.as_ref(),
            }),
            Output::Multicatch {
                peer,
                frame,
                binary,
            } => Some(Item {
                peer,
                frame,
                binary: binary.as_ref(),
            }),
            _ => None,
        }
    }

    fn size(&self) -> usize {
        self.frame.len() + self.binary.map_or(0, |b| b.len())
    }
}

/// Moves `from` into `to`, merging what can be merged for the cells
/// `takes_batches` says yes to.
pub fn coalesce(
    from: &mut Vec<Output>,
    to: &mut Vec<Output>,
    takes_batches: impl Fn(&[u8]) -> bool,
) {
    // The open run of each cell: its index in `to`.
    let mut open: HashMap<PeerId, usize> = HashMap::new();
    for o in from.drain(..) {
        let Some(item) = Item::of(&o).filter(|i| takes_batches(i.peer)) else {
            if let Output::ToPeer { peer, .. } | Output::Multicatch { peer, .. } = &o {
                close(to, open.remove(peer.as_slice()));
            }
            to.push(o);
            continue;
        };
        if let Some(&at) = open.get(item.peer.as_slice()) {
            if join(&mut to[at], &item) {
                continue;
            }
        }
        let at = to.len();
        close(to, open.insert(item.peer.clone(), at));
        to.push(o);
    }
    for at in open.into_values() {
        close(to, Some(at));
    }
}

/// Adds `item` to the run at `run` (a single delivery so far, or a
/// batch), if it fits: same verb, both with binary frames or both
/// without, room left.
fn join(run: &mut Output, item: &Item<'_>) -> bool {
    if let Some(first) = Item::of(run) {
        let fits = first.frame[..HEADER] == item.frame[..HEADER]
            && first.binary.is_some() == item.binary.is_some()
            && first.size() + item.size() < MAX_BYTES;
        if !fits {
            return false;
        }
        // `J VERB {first}` becomes `J VERB [{first}`.
        // Room for a few dozen more, so that the batch rarely grows.
        let mut frame = Vec::with_capacity((first.frame.len() * 32).min(MAX_BYTES));
        frame.extend_from_slice(&first.frame[..HEADER]);
        frame.push(b'[');
        frame.extend_from_slice(&first.frame[HEADER..]);
        *run = Output::Batch {
            peer: first.peer.clone(),
            frame,
            binaries: first.binary.cloned().into_iter().collect(),
            count: 1,
            bytes: first.size(),
            multicatch: matches!(run, Output::Multicatch { .. }),
        };
    }
    let Output::Batch {
        frame,
        binaries,
        count,
        bytes,
        ..
    } = run
    else {
        return false;
    };
    let fits = frame[..HEADER] == item.frame[..HEADER]
        && binaries.is_empty() != item.binary.is_some()
        && *count < MAX_ITEMS
        && *bytes + item.size() < MAX_BYTES;
    if !fits {
        return false;
    }
    frame.push(b',');
    frame.extend_from_slice(&item.frame[HEADER..]);
    binaries.extend(item.binary.cloned());
    *count += 1;
    *bytes += item.size();
    true
}

/// Ends the run at `to[at]`: a batch gets its closing bracket; a single
/// delivery stays the plain frame it was.
fn close(to: &mut [Output], at: Option<usize>) {
    if let Some(Output::Batch { frame, .. }) = at.map(|at| &mut to[at]) {
        frame.push(b']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_peer(peer: &str, frame: &str) -> Output {
        Output::ToPeer {
            peer: peer.as_bytes().to_vec(),
            frame: frame.as_bytes().to_vec(),
            binary: None,
        }
    }

    fn with_binary(o: Output, b: &str) -> Output {
        match o {
            Output::ToPeer { peer, frame, .. } => Output::ToPeer {
                peer,
                frame,
                binary: Some(Arc::new(b.as_bytes().to_vec())),
            },
            other => other,
        }
    }

    fn multicatch(peer: &str, frame: &str) -> Output {
        Output::Multicatch {
            peer: peer.as_bytes().to_vec(),
            frame: frame.as_bytes().to_vec(),
            binary: None,
        }
    }

    /// Each output as (peer, frame, binaries), batches marked by `xN`
    /// after the peer (`mN` for multicatch).
    fn run(outputs: Vec<Output>, batching: &[&str]) -> Vec<(String, String, Vec<String>)> {
        let mut from = outputs;
        let mut to = Vec::new();
        coalesce(&mut from, &mut to, |p| {
            batching.iter().any(|b| b.as_bytes() == p)
        });
        assert!(from.is_empty());
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        to.into_iter()
            .map(|o| match o {
                Output::ToPeer {
                    peer,
                    frame,
                    binary,
                }
                | Output::Multicatch {
                    peer,
                    frame,
                    binary,
                } => (
                    text(&peer),
                    text(&frame),
                    binary.iter().map(|b| text(b)).collect(),
                ),
                Output::Batch {
                    peer,
                    frame,
                    binaries,
                    count,
                    multicatch,
                    ..
                } => (
                    format!(
                        "{}{}{count}",
                        text(&peer),
                        if multicatch { "m" } else { "x" }
                    ),
                    text(&frame),
                    binaries.iter().map(|b| text(b)).collect(),
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
}
