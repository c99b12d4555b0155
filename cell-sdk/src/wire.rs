//! Building the frames the SDK sends and reading the ones it receives.
//! Pure functions over bytes, on top of `thynapse_protocol`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use thynapse_protocol::body::{
    canonical_array, canonical_number, write_json_str, Goodbye, Welcome,
};
use thynapse_protocol::frame::{self, MEMBERSHIP_TOPIC, SYNC_TOPIC};
use thynapse_protocol::{Mode, Thid, Verb};

use crate::error::Error;
use crate::event::{Delivered, Frame};
use crate::membership::{MembershipChange, MembershipEvent};
use crate::options::ListenOptions;
use crate::request::Reply;

// Outgoing bodies are local structs rather than the protocol crate's
// `body::*` literals, so that fields the protocol gains (with serde
// defaults) do not break the SDK's build; the wire names are the same.

/// `HELO` body.
#[derive(Serialize)]
struct HelloBody<'a> {
    id: Thid,
    service: &'a str,
    #[serde(skip_serializing_if = "Map::is_empty")]
    metadata: &'a Map<String, Value>,
    /// Always true: the SDK takes batched deliveries (PROTOCOL.md §23);
    /// transmitters that do not know the field ignore it.
    batch: bool,
    /// Always true: the SDK takes packed batches (§23), whose binary
    /// payloads share one frame; ignored by transmitters that do not know
    /// the field.
    packed: bool,
    #[serde(rename = "ref")]
    reference: u64,
}

/// `LSTN` body.
#[derive(Serialize)]
struct ListenBody<'a> {
    pattern: &'a str,
    mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<u32>,
    #[serde(rename = "ref")]
    reference: u64,
}

/// `UNLS` body.
#[derive(Serialize)]
struct UnlistenBody<'a> {
    pattern: &'a str,
    #[serde(rename = "ref")]
    reference: u64,
}

/// `PING` / `PONG` body.
#[derive(Serialize)]
struct RefBody<'a> {
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Value>,
}

/// `GBYE` body.
#[derive(Serialize)]
struct GoodbyeBody<'a> {
    reason: &'a str,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `RQST` body (cell → transmitter).
#[derive(Serialize)]
pub(crate) struct RequestBody<'a> {
    /// The channel responders listen to.
    pub(crate) channel: &'a str,
    /// Only cells of this service answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<&'a str>,
    /// Only cells whose metadata matches answer.
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub(crate) query: Option<&'a Value>,
    /// The JSON payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) payload: Option<&'a RawValue>,
    /// When the transmitter gives up (`ERRR timed_out`).
    pub(crate) timeout_ms: u64,
    /// Echoed in the `RPLY` or `ERRR`.
    #[serde(rename = "ref")]
    pub(crate) reference: u64,
}

/// `RPLY` body (responder → transmitter).
#[derive(Serialize)]
struct ReplyBody<'a> {
    id: Thid,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// `META` body.
#[derive(Serialize)]
struct MetaBody<'a> {
    metadata: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "is_false")]
    replace: bool,
    #[serde(rename = "ref")]
    reference: u64,
}

/// `SEND` body.
#[derive(Serialize)]
pub(crate) struct TargetedBody<'a> {
    /// The service whose cells are candidates.
    pub(crate) service: &'a str,
    /// Which of them: a selector string or a JSON query.
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub(crate) query: Option<&'a Value>,
    /// Every matching cell rather than one.
    #[serde(skip_serializing_if = "is_false")]
    pub(crate) all: bool,
    /// The channel the cells see (default `send::<service>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) channel: Option<&'a str>,
    /// The JSON payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) payload: Option<&'a RawValue>,
    /// No match falls back to any cell of the service.
    #[serde(skip_serializing_if = "is_false")]
    pub(crate) optional: bool,
    /// No match drops the send instead of failing it.
    #[serde(skip_serializing_if = "is_false")]
    pub(crate) droppable: bool,
    /// The same key goes to the same cell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<&'a Value>,
    /// Echoed in the `OKAY` or `ERRR`.
    #[serde(rename = "ref")]
    pub(crate) reference: u64,
}

/// `DISC` body.
#[derive(Serialize)]
pub(crate) struct DiscoverBody<'a> {
    /// The question.
    pub(crate) what: &'a str,
    /// Only cells of this service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<&'a str>,
    /// Only cells whose metadata matches.
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub(crate) query: Option<&'a Value>,
    /// Echoed in the `OKAY` or `ERRR`.
    #[serde(rename = "ref")]
    pub(crate) reference: u64,
}

/// `J HELO {...}`.
pub(crate) fn hello(
    id: Thid,
    service: &str,
    metadata: &Map<String, Value>,
    reference: u64,
) -> Vec<u8> {
    frame::encode_json(
        Verb::HELO,
        &HelloBody {
            id,
            service,
            metadata,
            batch: true,
            packed: true,
            reference,
        },
    )
}

/// `J LSTN {...}`.
pub(crate) fn listen(pattern: &str, options: &ListenOptions, reference: u64) -> Vec<u8> {
    let any = options.mode == Mode::Any;
    frame::encode_json(
        Verb::LSTN,
        &ListenBody {
            pattern,
            mode: options.mode,
            // `ack` and `concurrency` only mean something for anycatch.
            ack: any.then_some(options.ack),
            concurrency: options.concurrency.filter(|_| any),
            reference,
        },
    )
}

/// `J RQST {...}`.
pub(crate) fn request(body: &RequestBody<'_>) -> Vec<u8> {
    frame::encode_json(Verb::RQST, body)
}

/// `J RPLY {"id":..,"payload":..}`: a handler's result.
pub(crate) fn reply(id: Thid, payload: &RawValue) -> Vec<u8> {
    frame::encode_json(
        Verb::RPLY,
        &ReplyBody {
            id,
            payload: Some(payload),
            error: None,
        },
    )
}

/// `J RPLY {"id":..,"error":..}`: a handler's error.
pub(crate) fn reply_error(id: Thid, message: &str) -> Vec<u8> {
    frame::encode_json(
        Verb::RPLY,
        &ReplyBody {
            id,
            payload: None,
            error: Some(message),
        },
    )
}

/// `J META {...}`.
pub(crate) fn metadata(metadata: &Map<String, Value>, replace: bool, reference: u64) -> Vec<u8> {
    frame::encode_json(
        Verb::META,
        &MetaBody {
            metadata,
            replace,
            reference,
        },
    )
}

/// `J SEND {...}`.
pub(crate) fn targeted(body: &TargetedBody<'_>) -> Vec<u8> {
    frame::encode_json(Verb::SEND, body)
}

/// `J DISC {...}`.
pub(crate) fn discover(body: &DiscoverBody<'_>) -> Vec<u8> {
    frame::encode_json(Verb::DISC, body)
}

/// `J UNLS {...}`.
pub(crate) fn unlisten(pattern: &str, reference: u64) -> Vec<u8> {
    frame::encode_json(Verb::UNLS, &UnlistenBody { pattern, reference })
}

/// `J PING {}` or `J PING {"ref":n}`.
pub(crate) fn ping(reference: Option<u64>) -> Vec<u8> {
    let reference = reference.map(Value::from);
    frame::encode_json(
        Verb::PING,
        &RefBody {
            reference: reference.as_ref(),
        },
    )
}

/// `J PONG {...}` answering a transmitter's PING.
pub(crate) fn pong(reference: Option<Value>) -> Vec<u8> {
    frame::encode_json(
        Verb::PONG,
        &RefBody {
            reference: reference.as_ref(),
        },
    )
}

/// `J GBYE {"reason":...}`.
pub(crate) fn goodbye(reason: &str) -> Vec<u8> {
    frame::encode_json(Verb::GBYE, &GoodbyeBody { reason })
}

/// `J ACKN {"ids":[...]}` or `J NACK {"ids":[...]}`, written by hand: it is
/// the hottest frame the SDK sends.
pub(crate) fn ack_batch(verb: Verb, ids: &[Thid]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + ids.len() * 43);
    out.extend_from_slice(b"J ");
    out.extend_from_slice(verb.as_bytes());
    out.extend_from_slice(b" {\"ids\":[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        push_hex(&mut out, id);
        out.push(b'"');
    }
    out.extend_from_slice(b"]}");
    out
}

/// `J EVNT {"channel":..,"payload":..,"id":..,"seq":..[,"confirm":true,"ref":n]}`.
/// `payload` is raw JSON text, copied as is: the event THID was computed
/// over exactly these bytes.
pub(crate) fn publish(
    channel: &str,
    payload: Option<&[u8]>,
    id: &Thid,
    seq: u64,
    confirm_ref: Option<u64>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + channel.len() + payload.map_or(0, <[u8]>::len));
    out.extend_from_slice(b"J EVNT {\"channel\":");
    write_json_str(&mut out, channel);
    if let Some(p) = payload {
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b",\"id\":\"");
    push_hex(&mut out, id);
    out.extend_from_slice(b"\",\"seq\":");
    push_u64(&mut out, seq);
    if let Some(r) = confirm_ref {
        out.extend_from_slice(b",\"confirm\":true,\"ref\":");
        push_u64(&mut out, r);
    }
    out.push(b'}');
    out
}

/// Appends the 40 hex digits of `id`, without the intermediate `String`
/// of [`Thid::to_hex`] (this is per event and per ack).
pub(crate) fn push_hex(out: &mut Vec<u8>, id: &Thid) {
    out.extend_from_slice(&id.hex());
}

/// Appends `n` in decimal, without the `String` of `to_string`.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(thynapse_protocol::thid::decimal(n, &mut [0u8; 20]));
}

/// The topic of membership events of services starting with `prefix`.
pub(crate) fn membership_prefix(prefix: &str) -> Vec<u8> {
    let mut t = MEMBERSHIP_TOPIC.to_vec();
    t.extend_from_slice(prefix.as_bytes());
    t
}

/// The `SYNC <token>` topic.
pub(crate) fn sync_topic(token: &str) -> Vec<u8> {
    let mut t = SYNC_TOPIC.to_vec();
    t.extend_from_slice(token.as_bytes());
    t
}

/// A message from the command socket, decoded.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// `WLCM`.
    Welcome(Welcome),
    /// `OKAY`.
    Okay {
        /// Echo of our numeric ref.
        reference: Option<u64>,
        /// The whole JSON body, for the caller to read what it asked for.
        body: Vec<u8>,
    },
    /// `PONG`.
    Pong {
        /// Echo of our numeric ref.
        reference: Option<u64>,
        /// Whether the transmitter knows this connection as a welcomed
        /// cell (absent from transmitters that do not say).
        welcomed: Option<bool>,
    },
    /// `RPLY`: the answer to one of our requests.
    Reply {
        /// Echo of our numeric ref.
        reference: Option<u64>,
        /// The result, or the handler's error.
        reply: Result<Reply, Error>,
    },
    /// `ERRR`.
    Error {
        /// The code, as text (future codes stay readable).
        code: String,
        /// The explanation.
        message: String,
        /// `re` when it is one of our numeric refs.
        reference: Option<u64>,
    },
    /// `DLVR`: an anycatch delivery, with its binary frame.
    Deliver(Delivered),
    /// `DLVR` with an array body: several anycatch deliveries, in order,
    /// each with its binary frame (PROTOCOL.md §23).
    Delivers(Vec<Delivered>),
    /// `EVNT`: a multicatch event, this cell's own copy (a `DLVR`'s body
    /// without `attempt`; never acked), with its binary frame.
    Event(Delivered),
    /// `EVNT` with an array body: several multicatch events, in order,
    /// each with its binary frame (PROTOCOL.md §23).
    Events(Vec<Delivered>),
    /// `RQST`: a request for this cell to answer (a `DLVR`'s body), with
    /// its binary frame.
    Request(Delivered),
    /// `PING` from the transmitter.
    Ping {
        /// Its ref, echoed in our PONG.
        reference: Option<Value>,
    },
    /// `GBYE` from the transmitter.
    Goodbye {
        /// Why, if it said.
        reason: Option<String>,
    },
    /// A verb the SDK does not handle.
    Other(Verb),
}

/// The `OKAY` answering a confirmed `EVNT` or a `SEND`.
#[derive(Deserialize)]
pub(crate) struct ConfirmBody {
    /// The event's THID.
    #[serde(default)]
    pub(crate) id: Option<Thid>,
    /// Where it went.
    #[serde(default)]
    pub(crate) routed: u32,
}

/// The body of a `DLVR`, `EVNT` (T→C) or `RQST` (T→C), borrowed from the
/// frame: the hottest thing the SDK reads. The THIDs are decoded in place,
/// the channel is copied once (once per batch when its elements share it)
/// and the payload once.
#[derive(Deserialize)]
struct DeliveryIn<'a> {
    #[serde(deserialize_with = "thid")]
    id: Thid,
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(deserialize_with = "thid")]
    from: Thid,
    #[serde(default)]
    attempt: Option<u32>,
    /// In a packed batch: the length of its binary payload in the batch's
    /// one binary frame (PROTOCOL.md §23).
    #[serde(default)]
    bin: Option<u64>,
}

impl DeliveryIn<'_> {
    /// The delivery with its binary frame (attempt 1 when absent).
    /// `last` is the channel of the previous delivery of its batch, which
    /// it shares when it is the same (one allocation for the lot).
    fn into_delivered(self, binary: Option<Frame>, last: &mut Option<Arc<str>>) -> Delivered {
        let channel = match last {
            Some(c) if **c == *self.channel => Arc::clone(c),
            _ => Arc::clone(last.insert(Arc::from(&*self.channel))),
        };
        Delivered {
            id: self.id,
            channel,
            payload: self.payload.map(RawValue::to_owned),
            binary,
            from: self.from,
            attempt: self.attempt.unwrap_or(1),
        }
    }
}

impl<'a> DeliveryIn<'a> {
    /// Reads a body in the transmitter's own spelling (`write_delivery`):
    /// `{"id":"<hex>","channel":"<text>"[,"payload":<json>],"from":"<hex>"[,"attempt":<n>][,"bin":<n>]}`,
    /// with no JSON parser but for the payload. `None` for any other
    /// spelling (escapes in the channel, more fields, another order), which
    /// the general decoder then reads.
    fn parse_canonical(body: &'a [u8]) -> Option<DeliveryIn<'a>> {
        match DeliveryIn::parse_canonical_prefix(body, &mut Shared::default())? {
            (d, b"") => Some(d),
            _ => None,
        }
    }

    /// As [`DeliveryIn::parse_canonical`], for a body that starts `body`:
    /// the delivery and what follows its closing brace (the rest of a
    /// batch). `shared` is what the previous element of the batch read,
    /// updated with this one's.
    fn parse_canonical_prefix(
        body: &'a [u8],
        shared: &mut Shared<'a>,
    ) -> Option<(DeliveryIn<'a>, &'a [u8])> {
        let rest = body.strip_prefix(b"{\"id\":\"")?;
        let id = parse_thid(rest.get(..40)?)?;
        let rest = rest[40..].strip_prefix(b"\",\"channel\":\"")?;
        let end = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[end] != b'"' {
            return None;
        }
        if rest[..end] != *shared.channel.as_bytes() {
            shared.channel = std::str::from_utf8(&rest[..end]).ok()?;
        }
        let channel = shared.channel;
        let mut rest = &rest[end + 1..];
        let mut payload = None;
        if let Some(json) = rest.strip_prefix(b",\"payload\":") {
            // Only the value is read: what follows it stays for us.
            let mut de = serde_json::Deserializer::from_slice(json);
            let raw = <&RawValue>::deserialize(&mut de).ok()?;
            let text = raw.get();
            let start = (text.as_ptr() as usize).checked_sub(json.as_ptr() as usize)?;
            rest = json.get(start + text.len()..)?;
            // As serde reads an `Option`: `null` is no payload.
            payload = Some(raw).filter(|r| r.get() != "null");
        }
        let rest = rest.strip_prefix(b",\"from\":\"")?;
        let hex = rest.get(..40)?;
        let from = match shared.from {
            Some((seen, from)) if seen == hex => from,
            _ => shared.from.insert((hex, parse_thid(hex)?)).1,
        };
        let rest = rest[40..].strip_prefix(b"\"")?;
        let (attempt, rest) = canonical_number(rest, b",\"attempt\":")?;
        let rest = if rest.starts_with(b",\"cell\":") {
            skip_mesh_fields(rest)?
        } else {
            rest
        };
        let (bin, rest) = canonical_number(rest, b",\"bin\":")?;
        let rest = rest.strip_prefix(b"}")?;
        Some((
            DeliveryIn {
                id,
                channel: Cow::Borrowed(channel),
                payload,
                from,
                attempt,
                bin,
            },
            rest,
        ))
    }

    /// Reads a batch in the transmitter's own spelling: `[` canonical
    /// bodies separated by `,` `]`. `None` for any other spelling.
    fn parse_canonical_batch(body: &'a [u8]) -> Option<Vec<DeliveryIn<'a>>> {
        let mut shared = Shared::default();
        canonical_array(body, |rest| {
            DeliveryIn::parse_canonical_prefix(rest, &mut shared)
        })
    }

    /// Reads a batch body (a JSON array of delivery bodies): the
    /// transmitter's own spelling directly, any other through
    /// `serde_json`, element by element.
    fn parse_batch(body: &'a [u8]) -> Result<Vec<DeliveryIn<'a>>, serde_json::Error> {
        if let Some(items) = DeliveryIn::parse_canonical_batch(body) {
            return Ok(items);
        }
        let raw: Vec<&'a RawValue> = serde_json::from_slice(body)?;
        raw.into_iter()
            .map(|item| DeliveryIn::parse(item.get().as_bytes()))
            .collect()
    }

    /// Reads a body: the transmitter's own spelling directly, any other
    /// through `serde_json`.
    fn parse(body: &'a [u8]) -> Result<DeliveryIn<'a>, serde_json::Error> {
        match DeliveryIn::parse_canonical(body) {
            Some(d) => Ok(d),
            None => serde_json::from_slice(body),
        }
    }
}

/// What the canonical reader last read in a batch, for the next element
/// to reuse rather than check or decode again: the elements of a batch
/// mostly share their channel and their sender.
#[derive(Default)]
struct Shared<'a> {
    /// The last channel, valid UTF-8.
    channel: &'a str,
    /// The last `from`: its hex digits and its THID.
    from: Option<(&'a [u8], Thid)>,
}

/// Splits the binary frames of a batch among its elements, given each
/// element's `bin`, as [`frame::batch_frames`] matches them (PROTOCOL.md
/// §23): the frames, one per element, or none.
fn element_binaries(
    bins: &[Option<u64>],
    binaries: Vec<Vec<u8>>,
) -> Result<Vec<Frame>, frame::BatchFramesError> {
    let lengths: Vec<usize> = binaries.iter().map(|b| b.len()).collect();
    Ok(match frame::batch_frames(bins, &lengths)? {
        frame::BatchFrames::OnePerElement => binaries.into_iter().map(Frame::Whole).collect(),
        frame::BatchFrames::Packed(ranges) => {
            let joined = Arc::new(binaries.into_iter().next().expect("one packed frame"));
            ranges
                .into_iter()
                .map(|r| Frame::Packed(Arc::clone(&joined), r))
                .collect()
        }
    })
}

/// Reads a THID from a JSON string without an intermediate `String`, one
/// table lookup per hex digit (either case, as PROTOCOL.md §1 requires).
fn thid<'de, D: Deserializer<'de>>(d: D) -> Result<Thid, D::Error> {
    struct ThidVisitor;
    impl Visitor<'_> for ThidVisitor {
        type Value = Thid;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a THID: 40 hex characters")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Thid, E> {
            parse_thid(s.as_bytes()).ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
        }
    }
    d.deserialize_str(ThidVisitor)
}

/// 40 hex characters (either case) as a THID.
/// Skips what a transmitter adds to a delivery handed over by another one
/// of the mesh (`MDLV`, PROTOCOL.md §19), in the order it writes them:
/// `,"cell":"<THID>","origin":"<THID>","ack":<bool>,"request":<bool>`.
/// The cell needs none of it; any other shape is left to serde_json.
fn skip_mesh_fields(rest: &[u8]) -> Option<&[u8]> {
    fn thid(r: &[u8]) -> Option<&[u8]> {
        let (hex, rest) = r.split_at_checked(40)?;
        hex.iter().all(u8::is_ascii_hexdigit).then_some(rest)
    }
    fn boolean(r: &[u8]) -> Option<&[u8]> {
        r.strip_prefix(b"true").or_else(|| r.strip_prefix(b"false"))
    }
    let rest = thid(rest.strip_prefix(b",\"cell\":\"")?)?;
    let rest = thid(rest.strip_prefix(b"\",\"origin\":\"")?)?;
    let rest = boolean(rest.strip_prefix(b"\",\"ack\":")?)?;
    boolean(rest.strip_prefix(b",\"request\":")?)
}

pub(crate) fn parse_thid(hex: &[u8]) -> Option<Thid> {
    Thid::parse_hex(hex).ok()
}

#[derive(Deserialize)]
struct PongBody {
    #[serde(default, rename = "ref")]
    reference: Option<Value>,
    #[serde(default)]
    welcomed: Option<bool>,
}

#[derive(Deserialize)]
struct ReplyIn {
    #[serde(default, rename = "ref")]
    reference: Option<Value>,
    #[serde(deserialize_with = "thid")]
    id: Thid,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    re: Option<Value>,
}

#[derive(Deserialize)]
struct RefReply {
    #[serde(default, rename = "ref")]
    reference: Option<Value>,
}

/// Decodes a command-socket message: its first frame and the binary
/// frames after it. A `DLVR` or `EVNT` whose body is a JSON array is a
/// batch (PROTOCOL.md §23), with no binary frame or one per element, or
/// packed: one frame that its elements' `bin`s cut; every other message
/// has at most one.
pub(crate) fn decode_command(first: &[u8], binaries: Vec<Vec<u8>>) -> Result<Incoming, String> {
    let f = frame::decode(first).map_err(|e| e.to_string())?;
    let bad = |e: serde_json::Error| format!("{} body: {e}", f.verb);
    if matches!(f.verb, Verb::DLVR | Verb::EVNT) && f.body.trim_ascii_start().starts_with(b"[") {
        let items = DeliveryIn::parse_batch(f.body.trim_ascii()).map_err(bad)?;
        let bins: Vec<Option<u64>> = items.iter().map(|d| d.bin).collect();
        let binaries = element_binaries(&bins, binaries).map_err(|e| format!("{}: {e}", f.verb))?;
        let mut binaries = binaries.into_iter();
        let mut channel = None;
        let delivered = items
            .into_iter()
            .map(|d| d.into_delivered(binaries.next(), &mut channel))
            .collect();
        return Ok(match f.verb {
            Verb::DLVR => Incoming::Delivers(delivered),
            _ => Incoming::Events(delivered),
        });
    }
    if binaries.len() > 1 {
        return Err(format!(
            "a {} message of {} frames",
            f.verb,
            binaries.len() + 1
        ));
    }
    let binary = binaries.into_iter().next().map(Frame::Whole);
    let delivered = |binary| {
        DeliveryIn::parse(f.body)
            .map(|d| d.into_delivered(binary, &mut None))
            .map_err(bad)
    };
    Ok(match f.verb {
        Verb::WLCM => Incoming::Welcome(serde_json::from_slice(f.body).map_err(bad)?),
        Verb::OKAY => {
            let b: RefReply = serde_json::from_slice(f.body).map_err(bad)?;
            Incoming::Okay {
                reference: b.reference.as_ref().and_then(Value::as_u64),
                body: f.body.to_vec(),
            }
        }
        Verb::PONG => {
            let b: PongBody = serde_json::from_slice(f.body).map_err(bad)?;
            Incoming::Pong {
                reference: b.reference.as_ref().and_then(Value::as_u64),
                welcomed: b.welcomed,
            }
        }
        Verb::RPLY => {
            let b: ReplyIn = serde_json::from_slice(f.body).map_err(bad)?;
            Incoming::Reply {
                reference: b.reference.as_ref().and_then(Value::as_u64),
                reply: match b.error {
                    Some(message) => Err(Error::handler(message)),
                    None => Ok(Reply {
                        id: b.id,
                        payload: b.payload,
                        binary,
                    }),
                },
            }
        }
        Verb::RQST => Incoming::Request(delivered(binary)?),
        Verb::ERRR => {
            let b: ErrorBody = serde_json::from_slice(f.body).map_err(bad)?;
            Incoming::Error {
                code: b.code,
                message: b.message,
                reference: b.re.as_ref().and_then(Value::as_u64),
            }
        }
        Verb::DLVR => Incoming::Deliver(delivered(binary)?),
        Verb::EVNT => Incoming::Event(delivered(binary)?),
        Verb::PING => {
            let b: RefReply = serde_json::from_slice(f.body).map_err(bad)?;
            Incoming::Ping {
                reference: b.reference,
            }
        }
        Verb::GBYE => {
            let b: Goodbye = serde_json::from_slice(f.body).unwrap_or_default();
            Incoming::Goodbye { reason: b.reason }
        }
        other => Incoming::Other(other),
    })
}

/// A message from the event socket, decoded.
#[derive(Debug)]
pub(crate) enum Published {
    /// The answer to a `SYNC <token>` subscription: the whole frame.
    Sync(Vec<u8>),
    /// A membership event.
    Membership(MembershipEvent),
}

#[derive(Deserialize)]
struct MembershipBody {
    event: String,
    cell: MemberCell,
}

#[derive(Deserialize)]
struct MemberCell {
    id: Thid,
    service: String,
    #[serde(default)]
    metadata: Map<String, Value>,
    transmitter: Thid,
}

/// Reads the body of a `MEMB <service> {json}` frame.
fn decode_membership(frame: &[u8]) -> Result<MembershipEvent, String> {
    let rest = &frame[MEMBERSHIP_TOPIC.len()..];
    let space = rest
        .iter()
        .position(|b| *b == b' ')
        .ok_or("a MEMB frame without a body")?;
    let b: MembershipBody =
        serde_json::from_slice(&rest[space + 1..]).map_err(|e| format!("MEMB body: {e}"))?;
    let change = match b.event.as_str() {
        "joined" => MembershipChange::Joined,
        "left" => MembershipChange::Left,
        "updated" => MembershipChange::Updated,
        other => return Err(format!("unknown membership event {other:?}")),
    };
    Ok(MembershipEvent {
        change,
        cell: b.cell.id,
        service: b.cell.service,
        metadata: b.cell.metadata,
        transmitter: b.cell.transmitter,
    })
}

/// Decodes an event-socket message: membership events and `SYNC`
/// markers, one frame each.
pub(crate) fn decode_published(mut frames: Vec<Vec<u8>>) -> Result<Published, String> {
    if frames.len() != 1 {
        return Err(format!("a message of {} frames", frames.len()));
    }
    let first = frames.swap_remove(0);
    if first.starts_with(SYNC_TOPIC) {
        return Ok(Published::Sync(first));
    }
    if first.starts_with(MEMBERSHIP_TOPIC) {
        return decode_membership(&first).map(Published::Membership);
    }
    Err("not a MEMB or SYNC frame".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::body::Publish;

    #[test]
    fn publish_frames_parse_as_the_protocol_reads_them() {
        let id = Thid::random();
        let f = publish("a::\"b", Some(br#"{"x":1}"#), &id, 7, Some(3));
        let decoded = frame::decode(&f).unwrap();
        assert_eq!(decoded.verb, Verb::EVNT);
        let p: Publish<'_> = serde_json::from_slice(decoded.body).unwrap();
        assert_eq!(p.channel, "a::\"b");
        assert_eq!(p.payload.unwrap().get(), r#"{"x":1}"#);
        assert_eq!(p.id, Some(id));
        assert_eq!(p.seq, Some(7));
        assert!(p.confirm);
        assert_eq!(p.reference, Some(Value::from(3)));

        let f = publish("c", None, &id, 1, None);
        let p: Publish<'_> = serde_json::from_slice(frame::decode(&f).unwrap().body).unwrap();
        assert!(p.payload.is_none());
        assert!(!p.confirm);
    }

    #[test]
    fn numbers_and_strings_are_written_as_json() {
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for s in ["a::b", "", "q\"uote", "back\\slash", "tab\t", "é::ü"] {
            let mut out = Vec::new();
            write_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn hex_matches_the_protocol_spelling() {
        let id = Thid::random();
        let mut out = Vec::new();
        push_hex(&mut out, &id);
        assert_eq!(out, id.to_hex().as_bytes());
    }

    #[test]
    fn ack_batches_are_valid_json() {
        let ids = [Thid::from_bytes([1; 20]), Thid::from_bytes([2; 20])];
        let f = ack_batch(Verb::ACKN, &ids);
        let decoded = frame::decode(&f).unwrap();
        assert_eq!(decoded.verb, Verb::ACKN);
        let a: thynapse_protocol::body::Ack = serde_json::from_slice(decoded.body).unwrap();
        assert_eq!(a.ids, ids);
        assert!(frame::decode(&ack_batch(Verb::NACK, &[])).is_ok());
    }

    #[test]
    fn commands_parse_as_the_protocol_reads_them() {
        use thynapse_protocol::body::{Hello, Listen, Unlisten};
        let id = Thid::random();
        let mut metadata = Map::new();
        metadata.insert("v".into(), Value::from(2));
        let f = hello(id, "svc", &metadata, 4);
        let h: Hello = serde_json::from_slice(frame::decode(&f).unwrap().body).unwrap();
        assert_eq!((h.id, h.service.as_str()), (id, "svc"));
        assert_eq!(h.metadata, metadata);
        assert!(h.batch && h.packed, "the SDK takes packed batches");
        assert_eq!(h.reference, Some(Value::from(4)));
        let l: Listen = serde_json::from_slice(
            frame::decode(&listen("a::*", &ListenOptions::any(), 5))
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(
            (l.pattern.as_str(), l.mode, l.ack),
            ("a::*", Mode::Any, Some(true))
        );
        let u: Unlisten =
            serde_json::from_slice(frame::decode(&unlisten("a::*", 6)).unwrap().body).unwrap();
        assert_eq!(u.pattern, "a::*");
        assert_eq!(ping(None), b"J PING {}");
        assert_eq!(ping(Some(7)), br#"J PING {"ref":7}"#);
        assert_eq!(goodbye("close"), br#"J GBYE {"reason":"close"}"#);
        let _: Goodbye =
            serde_json::from_slice(frame::decode(&goodbye("x")).unwrap().body).unwrap();
    }

    #[test]
    fn listen_frames_carry_ack_only_for_anycatch() {
        let f = listen("a::*", &ListenOptions::multi().concurrency(3), 1);
        assert_eq!(f, br#"J LSTN {"pattern":"a::*","mode":"multi","ref":1}"#);
        let f = listen("a::*", &ListenOptions::any_unacked(), 2);
        assert_eq!(
            f,
            br#"J LSTN {"pattern":"a::*","mode":"any","ack":false,"ref":2}"#
        );
        let f = listen("a::*", &ListenOptions::any().concurrency(5), 3);
        assert_eq!(
            f,
            br#"J LSTN {"pattern":"a::*","mode":"any","ack":true,"concurrency":5,"ref":3}"#
        );
        let l: thynapse_protocol::body::Listen =
            serde_json::from_slice(frame::decode(&f).unwrap().body).unwrap();
        assert_eq!(l.concurrency, Some(5));
    }

    #[test]
    fn replies_decode() {
        let m = decode_command(
            br#"J OKAY {"ref":5,"id":"0000000000000000000000000000000000000001","routed":2}"#,
            Vec::new(),
        )
        .unwrap();
        match m {
            Incoming::Okay { reference, body } => {
                assert_eq!(reference, Some(5));
                let c: ConfirmBody = serde_json::from_slice(&body).unwrap();
                assert!(c.id.is_some());
                assert_eq!(c.routed, 2);
            }
            other => panic!("{other:?}"),
        }
        let m = decode_command(
            br#"J ERRR {"code":"no_listeners","message":"none","re":9}"#,
            Vec::new(),
        )
        .unwrap();
        assert!(
            matches!(m, Incoming::Error { ref code, reference: Some(9), .. } if code == "no_listeners")
        );
        let m = decode_command(b"J GBYE", Vec::new()).unwrap();
        assert!(matches!(m, Incoming::Goodbye { reason: None }));
        assert!(decode_command(b"", Vec::new()).is_err());
        assert!(decode_command(b"x", Vec::new()).is_err());
    }

    #[test]
    fn thids_parse_in_either_case_and_reject_anything_else() {
        let id = Thid::random();
        let hex = id.to_hex();
        assert_eq!(parse_thid(hex.as_bytes()), Some(id));
        assert_eq!(parse_thid(hex.to_uppercase().as_bytes()), Some(id));
        assert_eq!(parse_thid(&hex.as_bytes()[1..]), None);
        let mut bad = hex.into_bytes();
        bad[7] = b'g';
        assert_eq!(parse_thid(&bad), None);
        let escaped = format!(
            r#"J DLVR {{"id":"{}","channel":"a\u003ab","from":"{}"}}"#,
            id, id
        );
        match decode_command(escaped.as_bytes(), Vec::new()).unwrap() {
            Incoming::Deliver(d) => assert_eq!((d.id, &*d.channel), (id, "a:b")),
            other => panic!("{other:?}"),
        }
        let bad = format!(r#"J DLVR {{"id":"{}","channel":"a","from":"xyz"}}"#, id);
        assert!(decode_command(bad.as_bytes(), Vec::new()).is_err());
    }

    #[test]
    fn the_canonical_reader_agrees_with_serde_and_leaves_the_rest_to_it() {
        let id = Thid::random();
        let from = Thid::random();
        let payloads: [Option<&[u8]>; 6] = [
            None,
            Some(b"1"),
            Some(br#"{"a":[1,2,{"b":"}\"]"}]}"#),
            Some(b"\"text, with \\\" quote\""),
            Some(b"null"),
            Some(b"[]"),
        ];
        for payload in payloads {
            for attempt in [None, Some(1), Some(4_000_000_000)] {
                for channel in ["a::b", "a::\"q\"", "é::x"] {
                    let mut body = Vec::new();
                    thynapse_protocol::body::write_delivery(
                        &mut body, &id, channel, payload, &from, attempt,
                    );
                    let general: DeliveryIn<'_> = serde_json::from_slice(&body).unwrap();
                    let fast = DeliveryIn::parse_canonical(&body);
                    // Escaped channels are left to serde_json.
                    assert_eq!(fast.is_some(), !channel.contains('"'), "{channel}");
                    let read = DeliveryIn::parse(&body).unwrap();
                    for d in fast.iter().chain([&read]) {
                        assert_eq!(
                            (d.id, d.from, d.attempt),
                            (general.id, general.from, attempt)
                        );
                        assert_eq!(d.channel, general.channel);
                        assert_eq!(d.channel, channel);
                        assert_eq!(
                            d.payload.map(RawValue::get),
                            general.payload.map(RawValue::get)
                        );
                        assert_eq!(
                            d.payload.map(RawValue::get),
                            payload
                                .filter(|p| *p != b"null")
                                .map(|p| std::str::from_utf8(p).unwrap())
                        );
                    }
                }
            }
        }
        let mut body = Vec::new();
        thynapse_protocol::body::write_delivery(&mut body, &id, "a", Some(b"2"), &from, Some(1));
        // A mesh hand-over carries more fields: in the transmitter's shape
        // (with or without a packed batch's `bin`) they are skipped, in any
        // other shape the body is read by serde_json.
        let head = &body[..body.len() - 1];
        let tail = format!(
            r#","cell":"{}","origin":"{}","ack":true,"request":false"#,
            Thid::random(),
            Thid::random()
        );
        for end in ["}", r#","bin":3}"#] {
            let mesh = [head, tail.as_bytes(), end.as_bytes()].concat();
            let fast = DeliveryIn::parse_canonical(&mesh).expect("the transmitter's shape");
            let general: DeliveryIn<'_> = serde_json::from_slice(&mesh).unwrap();
            assert_eq!(
                (fast.id, fast.from, fast.attempt, fast.bin),
                (general.id, general.from, general.attempt, general.bin)
            );
            assert_eq!(fast.payload.map(RawValue::get), Some("2"));
        }
        let mut mesh = head.to_vec();
        mesh.extend_from_slice(br#","cell":"x","ack":true}"#);
        assert!(DeliveryIn::parse_canonical(&mesh).is_none());
        assert_eq!(DeliveryIn::parse(&mesh).unwrap().attempt, Some(1));
        for bad in [&body[..body.len() - 1], b"{}", br#"{"id":"00"}"#] {
            assert!(DeliveryIn::parse_canonical(bad).is_none());
        }
        // An attempt beyond u32 is no canonical body, and no body at all.
        let mut big = body[..body.len() - 2].to_vec();
        big.extend_from_slice(b"99999999999}");
        assert!(DeliveryIn::parse_canonical(&big).is_none());
        assert!(DeliveryIn::parse(&big).is_err());
    }

    #[test]
    fn deliveries_keep_their_binary_frame() {
        let from = Thid::random();
        let id = Thid::random();
        let mut body = b"J DLVR ".to_vec();
        thynapse_protocol::body::write_delivery(&mut body, &id, "a", None, &from, Some(2));
        match decode_command(&body, vec![vec![0, 1, 2]]).unwrap() {
            Incoming::Deliver(d) => {
                assert_eq!((d.id, d.from), (id, from));
                assert_eq!(d.attempt, 2);
                assert_eq!(d.binary.as_deref(), Some(&[0u8, 1, 2][..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn new_commands_parse_as_the_protocol_reads_them() {
        use thynapse_protocol::body::{Discover, MetaUpdate, Reply as ReplyIn, Request, Targeted};
        let raw = RawValue::from_string(r#"{"a":1}"#.into()).unwrap();
        let query = Value::from("version>=2.0.0");
        let f = request(&RequestBody {
            channel: "calc::add",
            service: Some("calc"),
            query: Some(&query),
            payload: Some(&raw),
            timeout_ms: 250,
            reference: 9,
        });
        let decoded = frame::decode(&f).unwrap();
        assert_eq!(decoded.verb, Verb::RQST);
        let r: Request<'_> = serde_json::from_slice(decoded.body).unwrap();
        assert_eq!(r.channel, "calc::add");
        assert_eq!(r.service.as_deref(), Some("calc"));
        assert_eq!(r.query, Some(query.clone()));
        assert_eq!(r.payload.unwrap().get(), r#"{"a":1}"#);
        assert_eq!(
            (r.timeout_ms, r.reference),
            (Some(250), Some(Value::from(9)))
        );

        let id = Thid::random();
        let ok = reply(id, &raw);
        let r: ReplyIn<'_> = serde_json::from_slice(frame::decode(&ok).unwrap().body).unwrap();
        assert_eq!(
            (r.id, r.payload.unwrap().get(), r.error),
            (id, r#"{"a":1}"#, None)
        );
        let err = reply_error(id, "no");
        let r: ReplyIn<'_> = serde_json::from_slice(frame::decode(&err).unwrap().body).unwrap();
        assert!(r.payload.is_none());
        assert_eq!(r.error.as_deref(), Some("no"));

        let mut m = Map::new();
        m.insert("version".into(), Value::from("2.0.0"));
        let u: MetaUpdate =
            serde_json::from_slice(frame::decode(&metadata(&m, true, 3)).unwrap().body).unwrap();
        assert_eq!((u.metadata, u.replace), (m, true));

        let key = Value::from("user-1");
        let f = targeted(&TargetedBody {
            service: "workers",
            query: Some(&query),
            all: true,
            channel: Some("jobs::x"),
            payload: None,
            optional: false,
            droppable: true,
            key: Some(&key),
            reference: 4,
        });
        let t: Targeted<'_> = serde_json::from_slice(frame::decode(&f).unwrap().body).unwrap();
        assert_eq!(t.service, "workers");
        assert!(t.all && t.droppable && !t.optional);
        assert_eq!((t.channel.as_deref(), t.key), (Some("jobs::x"), Some(key)));

        let f = discover(&DiscoverBody {
            what: "versions",
            service: None,
            query: None,
            reference: 5,
        });
        assert_eq!(f, br#"J DISC {"what":"versions","ref":5}"#);
        let _: Discover = serde_json::from_slice(frame::decode(&f).unwrap().body).unwrap();
    }

    #[test]
    fn replies_requests_and_pongs_decode() {
        let id = Thid::random();
        let body = format!(r#"J RPLY {{"ref":3,"id":"{id}","payload":{{"sum":3}}}}"#);
        match decode_command(body.as_bytes(), vec![vec![9]]).unwrap() {
            Incoming::Reply {
                reference: Some(3),
                reply: Ok(r),
            } => {
                assert_eq!((r.id, r.payload_raw()), (id, Some(r#"{"sum":3}"#)));
                assert_eq!(r.binary(), Some(&[9u8][..]));
            }
            other => panic!("{other:?}"),
        }
        let body = format!(r#"J RPLY {{"ref":4,"id":"{id}","error":"overflow"}}"#);
        match decode_command(body.as_bytes(), Vec::new()).unwrap() {
            Incoming::Reply {
                reply: Err(e),
                reference: Some(4),
            } => assert_eq!(e.message(), "overflow"),
            other => panic!("{other:?}"),
        }
        let mut body = b"J RQST ".to_vec();
        thynapse_protocol::body::write_delivery(&mut body, &id, "a", Some(b"1"), &id, Some(1));
        assert!(matches!(
            decode_command(&body, Vec::new()).unwrap(),
            Incoming::Request(d) if d.id == id && d.binary.is_none()
        ));
        assert!(matches!(
            decode_command(br#"J PONG {"welcomed":false}"#, Vec::new()).unwrap(),
            Incoming::Pong {
                reference: None,
                welcomed: Some(false)
            }
        ));
        assert!(matches!(
            decode_command(b"J PONG {}", Vec::new()).unwrap(),
            Incoming::Pong { welcomed: None, .. }
        ));
    }

    #[test]
    fn membership_frames_decode() {
        let id = Thid::random();
        let t = Thid::random();
        let f = format!(
            r#"MEMB billing {{"event":"left","cell":{{"id":"{id}","service":"billing","metadata":{{"v":1}},"transmitter":"{t}"}}}}"#
        );
        match decode_published(vec![f.into_bytes()]).unwrap() {
            Published::Membership(e) => {
                assert_eq!(e.change, MembershipChange::Left);
                assert_eq!((e.cell, e.transmitter), (id, t));
                assert_eq!(
                    (e.service.as_str(), &e.metadata["v"]),
                    ("billing", &Value::from(1))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(decode_published(vec![b"MEMB billing".to_vec()]).is_err());
        assert!(decode_published(vec![b"MEMB b {\"event\":\"moved\"}".to_vec()]).is_err());
        assert_eq!(membership_prefix("bill"), b"MEMB bill");
    }

    #[test]
    fn multicatch_events_decode_from_the_command_socket() {
        let id = Thid::random();
        let mut body = b"J EVNT ".to_vec();
        thynapse_protocol::body::write_delivery(&mut body, &id, "a::b", Some(b"[1]"), &id, None);
        match decode_command(&body, Vec::new()).unwrap() {
            Incoming::Event(d) => {
                assert_eq!((d.id, d.from), (id, id));
                assert_eq!(&*d.channel, "a::b");
                assert_eq!(d.payload.unwrap().get(), "[1]");
                // Multicatch bodies carry no `attempt`: it reads as 1.
                assert_eq!(d.attempt, 1);
                assert!(d.binary.is_none());
            }
            other => panic!("{other:?}"),
        }
        match decode_command(&body, vec![vec![7, 8]]).unwrap() {
            Incoming::Event(d) => assert_eq!(d.binary.as_deref(), Some(&[7u8, 8][..])),
            other => panic!("{other:?}"),
        }
        assert!(decode_command(b"J EVNT {\"channel\":1}", Vec::new()).is_err());
    }

    #[test]
    fn batches_decode_into_deliveries_in_order_with_their_binary_frames() {
        let from = Thid::random();
        let ids = [Thid::random(), Thid::random(), Thid::random()];
        let payloads: [Option<&[u8]>; 3] = [Some(br#"{"n":[1,"]"]}"#), None, Some(b"3")];
        for verb in ["DLVR", "EVNT"] {
            let mut frame = format!("J {verb} [").into_bytes();
            for (i, (id, payload)) in ids.iter().zip(payloads).enumerate() {
                if i > 0 {
                    frame.push(b',');
                }
                let attempt = (verb == "DLVR").then_some(1);
                thynapse_protocol::body::write_delivery(
                    &mut frame, id, "a::b", payload, &from, attempt,
                );
            }
            frame.push(b']');
            // The canonical reader and serde_json (spaces, another
            // spelling) read the same.
            let spaced = String::from_utf8(frame.clone())
                .unwrap()
                .replacen('[', "[ ", 1)
                .replace(",{", " , {");
            for f in [frame.clone(), spaced.into_bytes()] {
                let batch = |m| match m {
                    Incoming::Delivers(v) if verb == "DLVR" => v,
                    Incoming::Events(v) if verb == "EVNT" => v,
                    other => panic!("{other:?}"),
                };
                let plain = batch(decode_command(&f, Vec::new()).unwrap());
                assert_eq!(plain.iter().map(|d| d.id).collect::<Vec<_>>(), ids);
                assert_eq!(
                    plain
                        .iter()
                        .map(|d| d.payload.as_deref().map(RawValue::get))
                        .collect::<Vec<_>>(),
                    [Some(r#"{"n":[1,"]"]}"#), None, Some("3")]
                );
                assert!(plain.iter().all(|d| d.binary.is_none() && d.from == from));
                let binaries = vec![vec![1], vec![], vec![3, 3]];
                let with = batch(decode_command(&f, binaries.clone()).unwrap());
                assert_eq!(
                    with.into_iter()
                        .map(|d| d.binary.unwrap().into_vec())
                        .collect::<Vec<_>>(),
                    binaries
                );
                assert!(decode_command(&f, vec![vec![1], vec![2]]).is_err());
            }
            let bad = format!(r#"J {verb} [{{"id":"{}","channel":"a"}}]"#, ids[0]);
            assert!(decode_command(bad.as_bytes(), Vec::new()).is_err());
            assert!(decode_command(format!("J {verb} [1]").as_bytes(), Vec::new()).is_err());
            assert!(decode_command(format!("J {verb} [").as_bytes(), Vec::new()).is_err());
        }
        // Only DLVR and EVNT come in batches; no other message has more
        // than one binary frame.
        let mut rqst = b"J RQST ".to_vec();
        thynapse_protocol::body::write_delivery(&mut rqst, &ids[0], "a", None, &from, Some(1));
        assert!(decode_command(&rqst, vec![vec![1], vec![2]]).is_err());
    }

    /// A `J <verb> [...]` batch in the transmitter's spelling, each
    /// element ending in `"bin":<n>` when `bins` says.
    fn packed_batch(verb: &str, ids: &[Thid], from: &Thid, bins: &[Option<u64>]) -> Vec<u8> {
        let mut frame = format!("J {verb} [").into_bytes();
        for (i, (id, bin)) in ids.iter().zip(bins).enumerate() {
            if i > 0 {
                frame.push(b',');
            }
            let attempt = (verb == "DLVR").then_some(1);
            thynapse_protocol::body::write_delivery(&mut frame, id, "a::b", None, from, attempt);
            if let Some(n) = bin {
                frame.pop();
                frame.extend_from_slice(format!(r#","bin":{n}}}"#).as_bytes());
            }
        }
        frame.push(b']');
        frame
    }

    #[test]
    fn packed_batches_cut_their_one_binary_frame_among_their_elements() {
        let from = Thid::random();
        let ids = [
            Thid::random(),
            Thid::random(),
            Thid::random(),
            Thid::random(),
        ];
        let payloads: [&[u8]; 4] = [b"abc", b"", b"0123456789", b"z"];
        let joined = payloads.concat();
        let bins = payloads.map(|p| Some(p.len() as u64));
        for verb in ["DLVR", "EVNT"] {
            let frame = packed_batch(verb, &ids, &from, &bins);
            // The canonical reader and serde_json read `bin` alike.
            let body = &frame[7..];
            let fast = DeliveryIn::parse_canonical_batch(body).expect("canonical");
            let raw: Vec<&RawValue> = serde_json::from_slice(body).unwrap();
            let general: Vec<Option<u64>> = raw
                .iter()
                .map(|r| serde_json::from_str::<DeliveryIn<'_>>(r.get()).unwrap().bin)
                .collect();
            assert_eq!(fast.iter().map(|d| d.bin).collect::<Vec<_>>(), general);
            let spaced = String::from_utf8(frame.clone())
                .unwrap()
                .replace(",{", " , {");
            for f in [frame.clone(), spaced.into_bytes()] {
                let delivered = match decode_command(&f, vec![joined.clone()]).unwrap() {
                    Incoming::Delivers(v) if verb == "DLVR" => v,
                    Incoming::Events(v) if verb == "EVNT" => v,
                    other => panic!("{other:?}"),
                };
                assert_eq!(delivered.iter().map(|d| d.id).collect::<Vec<_>>(), ids);
                let read: Vec<&[u8]> = delivered
                    .iter()
                    .map(|d| d.binary.as_deref().unwrap())
                    .collect();
                assert_eq!(read, payloads);
                // A clone shares the frame; taking one out copies its part.
                let copy = delivered[2].clone();
                let whole = delivered.into_iter().nth(2).unwrap().binary.unwrap();
                assert_eq!(whole.into_vec(), payloads[2]);
                assert_eq!(copy.binary.as_deref(), Some(payloads[2]));
            }
            // Refused without a panic: a wrong total, a frame count other
            // than one, an element without `bin`, `bin` after a first
            // element without, a `bin` that is no length.
            let short = joined[1..].to_vec();
            let long = [&joined[..], b"!"].concat();
            for binaries in [
                vec![short],
                vec![long],
                vec![],
                vec![joined.clone(), vec![]],
            ] {
                assert!(decode_command(&frame, binaries).is_err());
            }
            let mut missing = bins;
            missing[2] = None;
            let f = packed_batch(verb, &ids, &from, &missing);
            assert!(decode_command(&f, vec![joined.clone()]).is_err());
            let mut late = [None; 4];
            late[1] = Some(0);
            let f = packed_batch(verb, &ids, &from, &late);
            assert!(decode_command(&f, Vec::new()).is_err());
            assert!(decode_command(&f, vec![vec![]; 4]).is_err());
            let huge = [Some(u64::MAX), Some(2), Some(0), Some(0)];
            let f = packed_batch(verb, &ids, &from, &huge);
            assert!(decode_command(&f, vec![joined.clone()]).is_err());
            let text = String::from_utf8(frame.clone()).unwrap();
            for odd in [r#""bin":-3"#, r#""bin":"3""#, r#""bin":3.0"#] {
                let f = text.replacen(r#""bin":3"#, odd, 1);
                assert!(decode_command(f.as_bytes(), vec![joined.clone()]).is_err());
            }
        }
        // Outside a batch `bin` means nothing.
        let batch = packed_batch("DLVR", &ids[..1], &from, &[Some(9)]);
        // `J DLVR [{...}]` without its brackets.
        let body = [b"J DLVR ", &batch[8..batch.len() - 1]].concat();
        match decode_command(&body, vec![vec![1, 2]]).unwrap() {
            Incoming::Deliver(d) => assert_eq!(d.binary.as_deref(), Some(&[1u8, 2][..])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn event_socket_frames_decode() {
        assert!(matches!(
            decode_published(vec![sync_topic("t1")]).unwrap(),
            Published::Sync(t) if t == b"SYNC t1"
        ));
        assert!(decode_published(vec![b"JUNK".to_vec()]).is_err());
        // Events no longer travel there.
        let id = Thid::random();
        let mut body = Vec::new();
        thynapse_protocol::body::write_delivery(&mut body, &id, "a::b", None, &id, None);
        let mut f = b"EVNT a::b ".to_vec();
        f.extend_from_slice(&body);
        assert!(decode_published(vec![f]).is_err());
        assert!(decode_published(vec![sync_topic("t2"), vec![0]]).is_err());
    }
}
