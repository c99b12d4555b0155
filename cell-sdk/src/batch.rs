//! Ack batching, event batching and redelivery de-duplication: pure
//! data structures the connection task drives, tested without sockets.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use thynapse_protocol::thid::decimal;
use thynapse_protocol::zmtp;
use thynapse_protocol::Thid;

/// Collects acked ids and says when to flush them as one `ACKN` frame:
/// once it holds `max_ids`, or once the oldest has waited `max_delay`.
#[derive(Debug)]
pub(crate) struct AckBatcher {
    /// The ids waiting to be sent, oldest first.
    ids: Vec<Thid>,
    /// When the oldest waiting id arrived.
    oldest: Option<Instant>,
    /// Flush at this many ids.
    max_ids: usize,
    /// Flush when the oldest id is this old.
    max_delay: Duration,
}

impl AckBatcher {
    /// An empty batcher.
    pub(crate) fn new(max_ids: usize, max_delay: Duration) -> AckBatcher {
        AckBatcher {
            ids: Vec::with_capacity(max_ids),
            oldest: None,
            max_ids: max_ids.max(1),
            max_delay,
        }
    }

    /// Adds an id; returns whether the batch is now full.
    pub(crate) fn push(&mut self, id: Thid, now: Instant) -> bool {
        if self.ids.is_empty() {
            self.oldest = Some(now);
        }
        self.ids.push(id);
        self.ids.len() >= self.max_ids
    }

    /// Whether the batch must go now.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.ids.len() >= self.max_ids || self.deadline().is_some_and(|d| now >= d)
    }

    /// When the batch must go at the latest, if it holds anything.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.max_delay)
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Takes the waiting ids, leaving the batcher empty.
    pub(crate) fn take(&mut self) -> Vec<Thid> {
        self.oldest = None;
        std::mem::replace(&mut self.ids, Vec::with_capacity(self.max_ids))
    }
}

/// How a publish's command frame starts: the SDK writes `J EVNT {...}`.
const EVENT_PREFIX: &[u8] = b"J EVNT ";

/// What a packed batch adds before an element's closing `}`, followed by
/// the length of its binary payload.
const BIN_FIELD: &[u8] = b",\"bin\":";

/// A publish that expects no answer, as the async side hands it to the
/// connection task: its `J EVNT {...}` frame and its binary frame, if
/// any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Publish {
    /// The command frame.
    pub(crate) command: Vec<u8>,
    /// The binary frame.
    pub(crate) binary: Option<Vec<u8>>,
}

impl Publish {
    /// Its message: the command frame, then the binary frame if any.
    pub(crate) fn into_frames(self) -> Vec<Vec<u8>> {
        let mut frames = Vec::with_capacity(2);
        frames.push(self.command);
        frames.extend(self.binary);
        frames
    }

    /// Bytes of its frames.
    pub(crate) fn size(&self) -> usize {
        self.command.len() + self.binary.as_ref().map_or(0, Vec::len)
    }

    /// Its body, `{...}`, when it can join a batch.
    fn body(&self) -> Option<&[u8]> {
        let body = self.command.strip_prefix(EVENT_PREFIX)?;
        (body.first() == Some(&b'{') && body.last() == Some(&b'}')).then_some(body)
    }
}

/// Collects the publishes (a `J EVNT {...}` frame and its binary frame,
/// if any) ready at the same time, to send as one `J EVNT [...]` frame
/// followed by their binary frames (PROTOCOL.md §23), or, when the
/// transmitter takes packed batches, by one binary frame holding them all,
/// each element saying its `"bin":<n>` length. A batch holds events that
/// all have a binary frame or none, at most `max_events` of them and about
/// `max_bytes`, and its command frame stays within the transmitter's
/// `max_frame`; an event that does not fit starts the next batch. Order is
/// kept: the caller sends the held batch before anything that does not
/// join it.
#[derive(Debug)]
pub(crate) struct EventBatcher {
    /// The publishes held, in order.
    events: Vec<Publish>,
    /// Whether the events held have binary frames, when they can take
    /// more (`None` with none held, or one that cannot join a batch).
    binary: Option<bool>,
    /// Length of the batch's command frame: `J EVNT [`, then each body
    /// (with its `bin` when packed) and its `,` or closing `]`.
    frame_len: usize,
    /// Bytes of every frame held.
    bytes: usize,
    /// Most events per batch.
    max_events: usize,
    /// Most bytes per batch (an event alone may exceed it).
    max_bytes: usize,
    /// Largest command frame the transmitter accepts.
    max_frame: usize,
    /// Whether the transmitter takes packed batches (its `WLCM` said
    /// `"packed":true`).
    packed: bool,
}

impl EventBatcher {
    /// An empty batcher.
    pub(crate) fn new(max_events: usize, max_bytes: usize, max_frame: usize) -> EventBatcher {
        EventBatcher {
            events: Vec::new(),
            binary: None,
            frame_len: EVENT_PREFIX.len() + 1,
            bytes: 0,
            max_events: max_events.max(1),
            max_bytes,
            max_frame,
            packed: false,
        }
    }

    /// Applies the transmitter's `WLCM`: its largest frame, and whether it
    /// takes packed batches. Called with no event held.
    pub(crate) fn welcomed(&mut self, max_frame: usize, packed: bool) {
        self.max_frame = max_frame;
        self.packed = packed;
    }

    /// How many bytes a publish that can join a batch takes in the
    /// batch's command frame: its body, plus its `bin` field when packed.
    fn element_len(&self, event: &Publish) -> Option<usize> {
        let body = event.body()?;
        let bin = event
            .binary
            .as_ref()
            .filter(|_| self.packed)
            .map_or(0, |b| {
                BIN_FIELD.len() + decimal(b.len() as u64, &mut [0; 20]).len()
            });
        Some(body.len() + bin)
    }

    /// Whether `event` can join the events held: always when none is
    /// held. When not, the caller sends [`EventBatcher::take`] first.
    pub(crate) fn fits(&self, event: &Publish) -> bool {
        if self.events.is_empty() {
            return true;
        }
        let (Some(binary), Some(len)) = (self.binary, self.element_len(event)) else {
            return false;
        };
        binary == event.binary.is_some()
            && self.events.len() < self.max_events
            // The body and its `,` or `]` within the frame limit.
            && self.frame_len + len < self.max_frame
            && self.bytes + event.size() <= self.max_bytes
    }

    /// Holds a publish; the caller checked [`EventBatcher::fits`].
    pub(crate) fn push(&mut self, event: Publish) {
        let len = self.element_len(&event);
        if self.events.is_empty() {
            self.binary = len.map(|_| event.binary.is_some());
        }
        self.frame_len += len.map_or(0, |len| len + 1);
        self.bytes += event.size();
        self.events.push(event);
    }

    /// The events held as one message, leaving the batcher empty: the
    /// plain message of an event alone, else `J EVNT [...]` and the
    /// binary frames (packed into one when the transmitter takes it).
    /// `None` when none is held.
    pub(crate) fn take(&mut self) -> Option<Vec<Vec<u8>>> {
        let mut message = Vec::new();
        self.write(&mut message).then_some(message)
    }

    /// [`EventBatcher::take`], written as ZMTP frames at the end of `out`
    /// (a socket's output): no frame of its own to copy there. `false`
    /// when none is held.
    pub(crate) fn take_into(&mut self, out: &mut Vec<u8>) -> bool {
        self.write(&mut ZmtpFrames(out))
    }

    /// Writes the events held as one message into `sink`, leaving the
    /// batcher empty; `false` when none is held.
    fn write(&mut self, sink: &mut impl FrameSink) -> bool {
        let frame_len = std::mem::replace(&mut self.frame_len, EVENT_PREFIX.len() + 1);
        self.bytes = 0;
        let binary = self.binary.take();
        if self.events.len() <= 1 {
            let Some(event) = self.events.pop() else {
                return false;
            };
            sink.frame(event.command.len(), event.binary.is_some())
                .extend_from_slice(&event.command);
            if let Some(binary) = event.binary {
                sink.frame(binary.len(), false).extend_from_slice(&binary);
            }
            return true;
        }
        // `fits` admitted only `J EVNT {...}` frames, all with a binary
        // frame or all without.
        let packed = self.packed && binary == Some(true);
        let frame = sink.frame(frame_len, binary == Some(true));
        frame.extend_from_slice(EVENT_PREFIX);
        for (i, event) in self.events.iter().enumerate() {
            frame.push(if i == 0 { b'[' } else { b',' });
            let body = &event.command[EVENT_PREFIX.len()..];
            match &event.binary {
                Some(binary) if packed => {
                    frame.extend_from_slice(&body[..body.len() - 1]);
                    frame.extend_from_slice(BIN_FIELD);
                    frame.extend_from_slice(decimal(binary.len() as u64, &mut [0; 20]));
                    frame.push(b'}');
                }
                _ => frame.extend_from_slice(body),
            }
        }
        frame.push(b']');
        if packed {
            let joined = sink.frame(self.bytes_of_binaries(), false);
            for event in self.events.drain(..) {
                joined.extend_from_slice(event.binary.as_deref().unwrap_or_default());
            }
            return true;
        }
        let last = self.events.len() - 1;
        for (i, event) in self.events.drain(..).enumerate() {
            if let Some(binary) = event.binary {
                sink.frame(binary.len(), i < last)
                    .extend_from_slice(&binary);
            }
        }
        true
    }

    /// Bytes of the binary frames held.
    fn bytes_of_binaries(&self) -> usize {
        self.events
            .iter()
            .map(|e| e.binary.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

/// Where [`EventBatcher`] writes a message's frames.
trait FrameSink {
    /// Starts a frame of `len` bytes (`more`: another follows in the same
    /// message); the bytes go at the end of the vector returned.
    fn frame(&mut self, len: usize, more: bool) -> &mut Vec<u8>;
}

/// A frame per vector.
impl FrameSink for Vec<Vec<u8>> {
    fn frame(&mut self, len: usize, _more: bool) -> &mut Vec<u8> {
        self.push(Vec::with_capacity(len));
        self.last_mut().expect("just pushed")
    }
}

/// ZMTP frames in one buffer.
struct ZmtpFrames<'a>(&'a mut Vec<u8>);

impl FrameSink for ZmtpFrames<'_> {
    fn frame(&mut self, len: usize, more: bool) -> &mut Vec<u8> {
        zmtp::encode_header(self.0, len, more, false);
        self.0.reserve(len);
        self.0
    }
}

/// A bounded set of the event THIDs this cell already processed, to drop
/// redeliveries: when full, the oldest entry is forgotten.
#[derive(Debug)]
pub(crate) struct SeenSet {
    /// Membership.
    set: HashSet<Thid>,
    /// Insertion order, to forget the oldest.
    order: VecDeque<Thid>,
    /// Most entries kept.
    capacity: usize,
}

impl SeenSet {
    /// An empty set remembering at most `capacity` ids.
    pub(crate) fn new(capacity: usize) -> SeenSet {
        SeenSet {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Remembers `id`; returns false if it was already known.
    pub(crate) fn insert(&mut self, id: Thid) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    /// Whether `id` is remembered.
    pub(crate) fn contains(&self, id: &Thid) -> bool {
        self.set.contains(id)
    }

    /// How many ids are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Thid {
        Thid::from_bytes([n; 20])
    }

    #[test]
    fn a_batch_is_due_when_full() {
        let now = Instant::now();
        let mut b = AckBatcher::new(3, Duration::from_secs(60));
        assert!(!b.push(id(1), now));
        assert!(!b.push(id(2), now));
        assert!(!b.due(now));
        assert!(b.push(id(3), now));
        assert!(b.due(now));
        assert_eq!(b.take(), vec![id(1), id(2), id(3)]);
        assert!(b.is_empty());
        assert!(!b.due(now));
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn a_batch_is_due_when_its_oldest_id_has_waited_long_enough() {
        let t0 = Instant::now();
        let delay = Duration::from_micros(500);
        let mut b = AckBatcher::new(64, delay);
        b.push(id(1), t0);
        b.push(id(2), t0 + Duration::from_micros(400));
        assert_eq!(b.deadline(), Some(t0 + delay));
        assert!(!b.due(t0 + Duration::from_micros(499)));
        assert!(b.due(t0 + delay));
        b.take();
        // The clock restarts with the next id.
        let t1 = t0 + Duration::from_millis(5);
        b.push(id(3), t1);
        assert!(!b.due(t1));
        assert_eq!(b.deadline(), Some(t1 + delay));
    }

    fn event(channel: &str, binary: Option<&[u8]>) -> Publish {
        Publish {
            command: format!(r#"J EVNT {{"channel":"{channel}"}}"#).into_bytes(),
            binary: binary.map(<[u8]>::to_vec),
        }
    }

    fn batch(b: &mut EventBatcher, events: Vec<Publish>) -> Vec<Vec<Vec<u8>>> {
        let mut sent = Vec::new();
        for e in events {
            if !b.fits(&e) {
                sent.extend(b.take());
            }
            b.push(e);
        }
        sent.extend(b.take());
        sent
    }

    #[test]
    fn an_event_alone_goes_as_its_plain_message() {
        let mut b = EventBatcher::new(256, 65_536, 1 << 20);
        assert!(b.take().is_none());
        let e = event("a", Some(b"x"));
        assert_eq!(batch(&mut b, vec![e.clone()]), vec![e.into_frames()]);
        assert!(b.take().is_none());
    }

    #[test]
    fn events_ready_together_share_one_frame_and_keep_their_binary_frames() {
        let mut b = EventBatcher::new(256, 65_536, 1 << 20);
        let sent = batch(
            &mut b,
            vec![event("a", Some(b"1")), event("b", Some(b"22"))],
        );
        assert_eq!(
            sent,
            vec![vec![
                br#"J EVNT [{"channel":"a"},{"channel":"b"}]"#.to_vec(),
                b"1".to_vec(),
                b"22".to_vec()
            ]]
        );
        let f = thynapse_protocol::frame::decode(&sent[0][0]).unwrap();
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(f.body).unwrap();
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn a_batch_ends_where_binary_frames_start_or_stop_and_when_full() {
        let mut b = EventBatcher::new(2, 65_536, 1 << 20);
        let sent = batch(
            &mut b,
            vec![
                event("a", None),
                event("b", Some(b"x")),
                event("c", Some(b"y")),
                event("d", Some(b"z")),
                event("e", None),
            ],
        );
        let shapes: Vec<(usize, String)> = sent
            .iter()
            .map(|m| (m.len(), String::from_utf8(m[0].clone()).unwrap()))
            .collect();
        assert_eq!(
            shapes,
            vec![
                (1, r#"J EVNT {"channel":"a"}"#.to_owned()),
                (3, r#"J EVNT [{"channel":"b"},{"channel":"c"}]"#.to_owned()),
                (2, r#"J EVNT {"channel":"d"}"#.to_owned()),
                (1, r#"J EVNT {"channel":"e"}"#.to_owned()),
            ]
        );
    }

    #[test]
    fn a_batch_stays_within_its_byte_budget_and_the_frame_limit() {
        // 22 bytes per event: two fit in 50, not three.
        let mut b = EventBatcher::new(256, 50, 1 << 20);
        let sent = batch(&mut b, vec![event("a", None); 3]);
        assert_eq!(
            sent.iter().map(|m| m[0].len()).collect::<Vec<_>>(),
            [40, 22]
        );
        // The batch frame itself within max_frame: `J EVNT [` + 15 + `,` +
        // 15 + `]` is 40 bytes.
        let mut b = EventBatcher::new(256, 65_536, 39);
        assert_eq!(batch(&mut b, vec![event("a", None); 2]).len(), 2);
        let mut b = EventBatcher::new(256, 65_536, 40);
        assert_eq!(batch(&mut b, vec![event("a", None); 2]).len(), 1);
        // Anything but a `J EVNT {...}` frame goes alone.
        let mut b = EventBatcher::new(256, 65_536, 1 << 20);
        let odd = Publish {
            command: b"EVNT {}".to_vec(),
            binary: None,
        };
        assert_eq!(batch(&mut b, vec![odd.clone(), event("a", None)]).len(), 2);
        assert_eq!(batch(&mut b, vec![event("a", None), odd]).len(), 2);
    }

    /// A batcher as after a `WLCM` that says (or not) `"packed":true`.
    fn welcomed(packed: bool) -> EventBatcher {
        let mut b = EventBatcher::new(256, 65_536, 1);
        b.welcomed(1 << 20, packed);
        b
    }

    /// Publishes as the SDK writes them, binary payloads of these sizes.
    fn publishes(sizes: &[usize]) -> Vec<Publish> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let command = crate::wire::publish("a::b", None, &id(i as u8), i as u64, None);
                Publish {
                    command,
                    binary: Some(vec![i as u8; n]),
                }
            })
            .collect()
    }

    #[test]
    fn a_message_written_into_a_socket_output_is_the_zmtp_of_its_frames() {
        for packed in [false, true] {
            for events in [
                vec![event("a", None)],
                vec![event("a", None), event("b", None)],
                publishes(&[3]),
                publishes(&[1, 2, 3]),
                publishes(&[300, 2]),
            ] {
                let (mut framed, mut written) = (welcomed(packed), welcomed(packed));
                for e in events {
                    assert!(framed.fits(&e));
                    framed.push(e.clone());
                    written.push(e);
                }
                let frames = framed.take().unwrap();
                let mut expected = b"queued".to_vec();
                for (i, f) in frames.iter().enumerate() {
                    zmtp::encode_frame(&mut expected, f, i + 1 < frames.len());
                }
                let mut out = b"queued".to_vec();
                assert!(written.take_into(&mut out));
                assert_eq!(out, expected, "packed: {packed}, {} frames", frames.len());
                assert!(!written.take_into(&mut out));
            }
        }
    }

    #[test]
    fn a_packed_batch_carries_every_binary_payload_in_one_frame() {
        let sizes = [3, 0, 1000, 1, 0];
        let sent = batch(&mut welcomed(true), publishes(&sizes));
        assert_eq!(sent.len(), 1);
        let message = &sent[0];
        assert_eq!(message.len(), 2, "the command frame and one binary frame");
        let joined: Vec<u8> = publishes(&sizes)
            .into_iter()
            .flat_map(|e| e.binary.unwrap())
            .collect();
        assert_eq!(message[1], joined);
        // Each element ends in its `bin`, in the one spelling the
        // transmitter reads without serde_json.
        let f = thynapse_protocol::frame::decode(&message[0]).unwrap();
        let read = thynapse_protocol::body::Publish::canonical_batch(f.body).expect("canonical");
        let bins: Vec<Option<u64>> = read.iter().map(|p| p.bin).collect();
        assert_eq!(bins, sizes.map(|n| Some(n as u64)));
        assert_eq!(read[2].id, Some(id(2)));
        assert_eq!(read[2].seq, Some(2));
        let first = format!(
            r#"J EVNT [{{"channel":"a::b","id":"{}","seq":0,"bin":3}},"#,
            id(0)
        );
        assert!(message[0].starts_with(first.as_bytes()));
    }

    #[test]
    fn without_packed_in_the_welcome_a_batch_keeps_a_frame_per_payload() {
        for b in [
            &mut EventBatcher::new(256, 65_536, 1 << 20),
            &mut welcomed(false),
        ] {
            let events = publishes(&[3, 0, 7]);
            let sent = batch(b, events.clone());
            assert_eq!(sent.len(), 1);
            assert_eq!(sent[0].len(), 4);
            assert!(!sent[0][0].windows(6).any(|w| w == b"\"bin\":"));
            let binaries: Vec<Vec<u8>> = events.into_iter().flat_map(|e| e.binary).collect();
            assert_eq!(sent[0][1..], binaries[..]);
        }
    }

    #[test]
    fn packing_spares_events_alone_and_batches_without_binaries() {
        let mut b = welcomed(true);
        let alone = publishes(&[5]);
        assert_eq!(
            batch(&mut b, alone.clone()),
            alone
                .into_iter()
                .map(Publish::into_frames)
                .collect::<Vec<_>>()
        );
        let json = vec![event("a", None), event("b", None)];
        assert_eq!(
            batch(&mut b, json),
            vec![vec![br#"J EVNT [{"channel":"a"},{"channel":"b"}]"#.to_vec()]]
        );
        // A run with binaries and one without still part ways.
        let sent = batch(
            &mut b,
            vec![
                event("a", Some(b"1")),
                event("b", Some(b"")),
                event("c", None),
            ],
        );
        assert_eq!(
            sent,
            vec![
                vec![
                    br#"J EVNT [{"channel":"a","bin":1},{"channel":"b","bin":0}]"#.to_vec(),
                    b"1".to_vec()
                ],
                event("c", None).into_frames()
            ]
        );
    }

    #[test]
    fn a_packed_batch_counts_its_bin_fields_within_the_frame_limit() {
        // `J EVNT [` + 2 × `{"channel":"a","bin":1}` (23) + `,` + `]`: 56.
        let two = || vec![event("a", Some(b"x")); 2];
        let mut b = EventBatcher::new(256, 65_536, 1);
        b.welcomed(55, true);
        assert_eq!(batch(&mut b, two()).len(), 2);
        b.welcomed(56, true);
        let sent = batch(&mut b, two());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0][0].len(), 56);
        // Unpacked, the same events fit in 16 bytes less.
        b.welcomed(40, false);
        assert_eq!(batch(&mut b, two()).len(), 1);
    }

    #[test]
    fn the_seen_set_reports_duplicates() {
        let mut s = SeenSet::new(10);
        assert!(s.insert(id(1)));
        assert!(!s.insert(id(1)));
        assert!(s.contains(&id(1)));
        assert!(!s.contains(&id(2)));
    }

    #[test]
    fn the_seen_set_forgets_its_oldest_entries_when_full() {
        let mut s = SeenSet::new(3);
        for n in 1..=5 {
            s.insert(id(n));
        }
        assert_eq!(s.len(), 3);
        assert!(!s.contains(&id(1)));
        assert!(!s.contains(&id(2)));
        assert!(s.contains(&id(3)) && s.contains(&id(5)));
        // A forgotten id is new again.
        assert!(s.insert(id(1)));
        assert!(!s.contains(&id(3)));
    }
}
