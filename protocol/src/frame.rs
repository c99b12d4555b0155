//! The command frame codec: `J VERB {json}`.
//!
//! A command is one text frame: a 1-character encoding, a space, a 4-letter
//! verb, a space and the body. The unprefixed prototype form `VERB {json}` is
//! accepted too. An empty body means `{}`. Decoding only splits the header
//! off; the body stays a borrowed slice so that the caller parses JSON only
//! for the verbs it must read.

use std::fmt;

/// The only body encoding of protocol v1: JSON.
pub const ENCODING_JSON: u8 = b'J';

/// A 4-letter command verb (ASCII uppercase letters).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verb([u8; 4]);

macro_rules! verbs {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        impl Verb {
            $($(#[$doc])* pub const $name: Verb = Verb(*stringify!($name).as_bytes().first_chunk::<4>().unwrap());)*

            /// Every verb protocol v1 defines.
            pub const ALL: &'static [Verb] = &[$(Verb::$name),*];
        }
    };
}

verbs! {
    /// cell → transmitter: join.
    HELO,
    /// transmitter → cell: joined.
    WLCM,
    /// cell → transmitter: listen to a pattern.
    LSTN,
    /// cell → transmitter: stop listening to a pattern.
    UNLS,
    /// cell → transmitter: publish an event; transmitter → cell: a
    /// multicatch event.
    EVNT,
    /// transmitter → cell: an anycatch delivery.
    DLVR,
    /// cell → transmitter: acknowledge deliveries.
    ACKN,
    /// cell → transmitter: refuse deliveries (redeliver elsewhere).
    NACK,
    /// both ways: liveness probe.
    PING,
    /// both ways: answer to PING.
    PONG,
    /// both ways: leaving.
    GBYE,
    /// transmitter → cell: an error.
    ERRR,
    /// transmitter → cell: success.
    OKAY,
    /// cell → transmitter: change this cell's metadata.
    META,
    /// cell → transmitter: send to one or every cell of a service whose
    /// metadata matches a query.
    SEND,
    /// cell → transmitter: ask about the mesh (services, instances, ...).
    DISC,
    /// cell → transmitter: a request; transmitter → cell: a request to answer.
    RQST,
    /// cell → transmitter: the answer to a request; transmitter → cell: the
    /// answer to the cell's request.
    RPLY,
    /// transmitter → transmitter: deliver an anycatch event to a local cell.
    MDLV,
    /// transmitter → transmitter: a cell acked or refused a forwarded delivery.
    MACK,
    /// transmitter → transmitter: a multicatch event for the receiver's
    /// local listeners.
    MEVT,
    /// transmitter → transmitter: a cell answered a forwarded request.
    MRPL,
}

impl Verb {
    /// Wraps 4 bytes if they are ASCII uppercase letters.
    pub fn new(bytes: [u8; 4]) -> Option<Verb> {
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Verb(bytes))
    }

    /// The verb's 4 bytes.
    pub fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }

    /// The verb as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII uppercase letters are ever stored, see `Verb::new`.
        std::str::from_utf8(&self.0).unwrap_or("????")
    }

    /// Whether protocol v1 defines this verb.
    pub fn is_known(&self) -> bool {
        Verb::ALL.contains(self)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verb({})", self.as_str())
    }
}

/// A decoded command header with its body still raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The verb.
    pub verb: Verb,
    /// The body bytes (JSON); `{}` when the frame had none.
    pub body: &'a [u8],
}

/// Why a frame is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is empty.
    #[error("empty frame")]
    Empty,
    /// The frame does not start with `E VERB` or `VERB`.
    #[error("a frame starts with 'J VERB ' or 'VERB ': 4 uppercase letters")]
    BadHeader,
    /// The encoding character is not one this transmitter speaks.
    #[error("unsupported encoding '{0}', only 'J' (JSON)")]
    UnsupportedEncoding(char),
    /// The frame is larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

const EMPTY_BODY: &[u8] = b"{}";

/// Splits a command frame into verb and body. Never panics.
///
/// # Errors
/// [`FrameError`] when the frame is empty, has no valid header, or names an
/// encoding other than JSON.
pub fn decode(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    if frame.is_empty() {
        return Err(FrameError::Empty);
    }
    let (encoding, rest) = match frame {
        [e, b' ', rest @ ..] => (Some(*e), rest),
        _ => (None, frame),
    };
    let (verb, body) = match rest {
        [a, b, c, d] => ([*a, *b, *c, *d], &[][..]),
        [a, b, c, d, b' ', body @ ..] => ([*a, *b, *c, *d], body),
        _ => return Err(FrameError::BadHeader),
    };
    let verb = Verb::new(verb).ok_or(FrameError::BadHeader)?;
    if let Some(e) = encoding {
        if e != ENCODING_JSON {
            return Err(FrameError::UnsupportedEncoding(char::from(e)));
        }
    }
    let body = trim_ascii(body);
    Ok(Frame {
        verb,
        body: if body.is_empty() { EMPTY_BODY } else { body },
    })
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// Encodes a command frame `J VERB body` into `out` (cleared first), so a
/// caller can reuse one buffer.
pub fn encode_into(out: &mut Vec<u8>, verb: Verb, body: &[u8]) {
    out.clear();
    out.reserve(7 + body.len());
    out.extend_from_slice(b"J ");
    out.extend_from_slice(verb.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
}

/// Encodes a command frame `J VERB body`.
pub fn encode(verb: Verb, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, verb, body);
    out
}

/// Encodes a frame whose body is a serializable value.
pub fn encode_json<T: serde::Serialize>(verb: Verb, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"J ");
    out.extend_from_slice(verb.as_bytes());
    out.push(b' ');
    // Serializing our own body types into a Vec cannot fail: they hold only
    // strings, numbers, THIDs and JSON values.
    serde_json::to_writer(&mut out, body).expect("protocol bodies serialize");
    out
}

/// The topic prefix a cell subscribes to to learn that its (membership)
/// subscriptions have reached the transmitter: `SYNC <token>`.
pub const SYNC_TOPIC: &[u8] = b"SYNC ";

/// The topic prefix of membership events on the event socket:
/// `MEMB <service> {json}`.
pub const MEMBERSHIP_TOPIC: &[u8] = b"MEMB ";

/// How the binary frames after a batch's command frame (PROTOCOL.md §23)
/// belong to its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchFrames {
    /// No binary frame, or one per element, in order.
    OnePerElement,
    /// Packed: one frame, element `k`'s payload being its `k`-th range.
    Packed(Vec<std::ops::Range<usize>>),
}

/// Why a batch's binary frames do not fit its elements (answered with
/// `bad_multipart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchFramesError {
    /// A later element has `bin` while the first has none.
    #[error("an event has bin but the batch's first has none")]
    LateBin,
    /// Unpacked, and neither no binary frame nor one per element.
    #[error("a batch of {elements} events has no binary frame or one per event, got {frames}")]
    FrameCount {
        /// Elements of the batch.
        elements: usize,
        /// Binary frames after it.
        frames: usize,
    },
    /// Packed, and not exactly one binary frame.
    #[error("a packed batch has one binary frame, got {frames}")]
    PackedFrameCount {
        /// Binary frames after it.
        frames: usize,
    },
    /// Packed, and this element has no `bin`.
    #[error("event {element} of a packed batch has no bin")]
    MissingBin {
        /// The element's index.
        element: usize,
    },
    /// The `bin`s add up to more than the packed frame.
    #[error("the bins of a packed batch add up to more than its {frame} bytes")]
    PastFrame {
        /// The packed frame's length.
        frame: usize,
    },
    /// The `bin`s add up to less than the packed frame.
    #[error("the bins of a packed batch add up to {used} of its {frame} bytes")]
    ShortOfFrame {
        /// What the `bin`s add up to.
        used: usize,
        /// The packed frame's length.
        frame: usize,
    },
}

/// Matches a batch's binary frames (their lengths, in order) to its
/// elements (each one's `bin`, `None` without one), as PROTOCOL.md §23
/// says: a batch whose first element has `bin` is packed, and its one frame
/// is cut by the `bin`s; otherwise no element may have `bin`, and there is
/// no frame or one per element.
///
/// # Errors
/// [`BatchFramesError`] when the frames do not fit.
pub fn batch_frames(
    bins: &[Option<u64>],
    frames: &[usize],
) -> Result<BatchFrames, BatchFramesError> {
    if bins.first().is_none_or(Option::is_none) {
        if bins.iter().any(Option::is_some) {
            return Err(BatchFramesError::LateBin);
        }
        if !frames.is_empty() && frames.len() != bins.len() {
            return Err(BatchFramesError::FrameCount {
                elements: bins.len(),
                frames: frames.len(),
            });
        }
        return Ok(BatchFrames::OnePerElement);
    }
    let &[frame] = frames else {
        return Err(BatchFramesError::PackedFrameCount {
            frames: frames.len(),
        });
    };
    let mut ranges = Vec::with_capacity(bins.len());
    let mut end = 0usize;
    for (element, bin) in bins.iter().enumerate() {
        let bin = bin.ok_or(BatchFramesError::MissingBin { element })?;
        let start = end;
        end = usize::try_from(bin)
            .ok()
            .and_then(|b| start.checked_add(b))
            .filter(|&e| e <= frame)
            .ok_or(BatchFramesError::PastFrame { frame })?;
        ranges.push(start..end);
    }
    if end != frame {
        return Err(BatchFramesError::ShortOfFrame { used: end, frame });
    }
    Ok(BatchFrames::Packed(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_prefixed_form() {
        let f = decode(br#"J HELO {"id":"x"}"#).unwrap();
        assert_eq!(f.verb, Verb::HELO);
        assert_eq!(f.body, br#"{"id":"x"}"#);
    }

    #[test]
    fn decodes_the_unprefixed_prototype_form() {
        let f = decode(br#"LSTN {"pattern":"a"}"#).unwrap();
        assert_eq!(f.verb, Verb::LSTN);
        assert_eq!(f.body, br#"{"pattern":"a"}"#);
    }

    #[test]
    fn an_empty_body_reads_as_an_empty_object() {
        assert_eq!(decode(b"J PING").unwrap().body, b"{}");
        assert_eq!(decode(b"PING").unwrap().body, b"{}");
        assert_eq!(decode(b"J PING  ").unwrap().body, b"{}");
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(decode(b""), Err(FrameError::Empty));
        assert_eq!(decode(b"J helo {}"), Err(FrameError::BadHeader));
        assert_eq!(decode(b"J HEL"), Err(FrameError::BadHeader));
        assert_eq!(decode(b"HELOX {}"), Err(FrameError::BadHeader));
        assert_eq!(
            decode(b"X HELO {}"),
            Err(FrameError::UnsupportedEncoding('X'))
        );
    }

    #[test]
    fn unknown_verbs_decode_but_are_not_known() {
        let f = decode(b"J ABCD {}").unwrap();
        assert!(!f.verb.is_known());
        assert!(Verb::EVNT.is_known());
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn encode_then_decode_round_trips(v in "[A-Z]{4}", body in "\\{[ -~]{0,40}\\}") {
            let verb = Verb::new(v.as_bytes().try_into().unwrap()).unwrap();
            let frame = encode(verb, body.as_bytes());
            let f = decode(&frame).unwrap();
            prop_assert_eq!(f.verb, verb);
            prop_assert_eq!(f.body, body.trim().as_bytes());
        }
    }

    #[test]
    fn batch_frames_follow_section_23() {
        use BatchFramesError as E;
        assert_eq!(
            batch_frames(&[None, None], &[]),
            Ok(BatchFrames::OnePerElement)
        );
        assert_eq!(
            batch_frames(&[None, None], &[3, 4]),
            Ok(BatchFrames::OnePerElement)
        );
        assert_eq!(
            batch_frames(&[Some(2), Some(0), Some(3)], &[5]),
            Ok(BatchFrames::Packed(vec![0..2, 2..2, 2..5]))
        );
        assert_eq!(batch_frames(&[None, Some(1)], &[1]), Err(E::LateBin));
        assert_eq!(
            batch_frames(&[None, None], &[1]),
            Err(E::FrameCount {
                elements: 2,
                frames: 1
            })
        );
        assert_eq!(
            batch_frames(&[Some(1), Some(1)], &[1, 1]),
            Err(E::PackedFrameCount { frames: 2 })
        );
        assert_eq!(
            batch_frames(&[Some(1), None], &[2]),
            Err(E::MissingBin { element: 1 })
        );
        assert_eq!(
            batch_frames(&[Some(2), Some(2)], &[3]),
            Err(E::PastFrame { frame: 3 })
        );
        assert_eq!(
            batch_frames(&[Some(u64::MAX), Some(2)], &[3]),
            Err(E::PastFrame { frame: 3 })
        );
        assert_eq!(
            batch_frames(&[Some(1), Some(1)], &[3]),
            Err(E::ShortOfFrame { used: 2, frame: 3 })
        );
    }
}
