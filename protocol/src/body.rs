//! The JSON bodies of each verb.
//!
//! Field names are the wire names of PROTOCOL.md. `ref` is any JSON value a
//! sender chooses; replies and errors echo it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::Thid;

/// Listening mode of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// anycatch: exactly one cell of each listening service gets an event.
    #[serde(rename = "any")]
    Any,
    /// multicatch: every listening cell gets the event.
    #[serde(rename = "multi")]
    Multi,
}

/// `HELO`: a cell joins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The cell's THID.
    pub id: Thid,
    /// The service the cell belongs to.
    pub service: String,
    /// Free-form typed metadata (version, region, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    /// Whether the cell takes batches: one `DLVR` or `EVNT` frame whose
    /// body is a JSON array of several deliveries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch: bool,
    /// Whether the cell takes packed batches (with `batch`): the binary
    /// payloads of a batch in one frame, each element saying its `bin`
    /// length (PROTOCOL.md §23).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packed: bool,
    /// Echoed in the reply.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// Limits a transmitter announces in `WLCM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame accepted, in bytes (each frame of a message).
    pub max_frame: usize,
    /// Time to ACKN a delivery before it is redelivered.
    pub ack_timeout_ms: u64,
}

/// `WLCM`: the transmitter accepted a cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// The transmitter's THID.
    pub id: Thid,
    /// Endpoint of the transmitter's event socket.
    #[serde(rename = "pub")]
    pub event_endpoint: String,
    /// Interval at which the cell should PING when otherwise silent.
    pub heartbeat_ms: u64,
    /// The transmitter's limits.
    pub limits: Limits,
    /// Whether the transmitter takes batches: an `EVNT` whose body is a
    /// JSON array of events.
    #[serde(default)]
    pub batch: bool,
    /// Whether the transmitter takes packed batches: an `EVNT` batch whose
    /// binary payloads come in one frame, each element saying its `bin`
    /// length (PROTOCOL.md §23).
    #[serde(default)]
    pub packed: bool,
    /// Echo of the HELO's `ref`.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// `LSTN`: listen to a pattern.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listen {
    /// Channel pattern.
    pub pattern: String,
    /// anycatch or multicatch.
    pub mode: Mode,
    /// Whether anycatch deliveries wait for an ACKN (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<bool>,
    /// How many deliveries (events and requests) of this listen the cell
    /// takes at once; more wait at the transmitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Echoed in the reply.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// `UNLS`: stop listening to a pattern.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unlisten {
    /// The pattern, as given to LSTN.
    pub pattern: String,
    /// Echoed in the reply.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// `EVNT` from a cell: publish. Borrowed from the frame so the payload is
/// forwarded without re-serializing.
#[derive(Debug, Deserialize)]
pub struct Publish<'a> {
    /// The channel.
    #[serde(borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    /// The JSON payload, as raw text.
    #[serde(default, borrow)]
    pub payload: Option<&'a RawValue>,
    /// The event's THID; computed by the transmitter when absent.
    #[serde(default)]
    pub id: Option<Thid>,
    /// The publisher's sequence number of this event.
    #[serde(default)]
    pub seq: Option<u64>,
    /// Whether the sender wants an OKAY (or ERRR `no_listeners`).
    #[serde(default)]
    pub confirm: bool,
    /// Echoed in the reply.
    #[serde(default, rename = "ref")]
    pub reference: Option<Value>,
    /// In a packed batch: the length of this event's binary payload in
    /// the batch's one binary frame (PROTOCOL.md §23).
    #[serde(default)]
    pub bin: Option<u64>,
}

impl<'a> Publish<'a> {
    /// Reads a batch (a JSON array of `EVNT` bodies, PROTOCOL.md §23) whose
    /// every element has the shape clients write most,
    /// `{"channel":"<text>"[,"id":"<hex>"][,"seq":<n>][,"bin":<n>]}`, with no
    /// whitespace and nothing to unescape, without going through serde.
    ///
    /// `None` when the body or any element differs in any way (an empty
    /// array, a payload, another field, an escape, a bad THID or number):
    /// the caller then reads it the general way, which gives the same
    /// events for what this accepts, and the errors for the rest.
    pub fn canonical_batch(body: &'a [u8]) -> Option<Vec<Publish<'a>>> {
        canonical_array(body, Publish::canonical)
    }

    /// One canonical element at the start of `s`, and what follows it.
    fn canonical(s: &'a [u8]) -> Option<(Publish<'a>, &'a [u8])> {
        let s = s.strip_prefix(br#"{"channel":""#)?;
        let (channel, mut s) = canonical_text(s)?;
        let mut id = None;
        if let Some(after) = s.strip_prefix(br#","id":""#) {
            let (thid, after) = canonical_thid(after)?;
            id = Some(thid);
            s = after;
        }
        let (seq, s) = canonical_number(s, br#","seq":"#)?;
        let (bin, s) = canonical_number(s, br#","bin":"#)?;
        let s = s.strip_prefix(b"}")?;
        let event = Publish {
            channel: std::borrow::Cow::Borrowed(channel),
            payload: None,
            id,
            seq,
            confirm: false,
            reference: None,
            bin,
        };
        Some((event, s))
    }
}

/// The elements of a JSON array `body` read by `element` (which returns
/// each element and what follows it), with no whitespace; `None` when
/// `element` fails or the array is empty or malformed. For readers of the
/// canonical shapes (here and in the cell SDK) that fall back to serde on
/// `None`.
pub fn canonical_array<'a, T>(
    body: &'a [u8],
    mut element: impl FnMut(&'a [u8]) -> Option<(T, &'a [u8])>,
) -> Option<Vec<T>> {
    let mut rest = body.strip_prefix(b"[")?;
    let mut items = Vec::new();
    loop {
        let (item, after) = element(rest)?;
        items.push(item);
        match after {
            [b',', more @ ..] => rest = more,
            [b']'] => return Some(items),
            _ => return None,
        }
    }
}

/// A THID's 40 hex digits and closing quote at the start of `s`: the
/// digits (not parsed, for the callers that only need them well formed)
/// and what follows the quote.
fn canonical_hex(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let (hex, after) = s.split_at_checked(crate::thid::THID_LEN * 2)?;
    hex.iter()
        .all(u8::is_ascii_hexdigit)
        .then_some((hex, after.strip_prefix(b"\"")?))
}

/// A THID and its closing quote at the start of `s`, and what follows.
fn canonical_thid(s: &[u8]) -> Option<(Thid, &[u8])> {
    let (hex, after) = s.split_at_checked(crate::thid::THID_LEN * 2)?;
    Some((Thid::parse_hex(hex).ok()?, after.strip_prefix(b"\"")?))
}

/// What mesh deliveries and mesh events start with,
/// `{"id":"<hex>","channel":"<text>","from":"<hex>"`: the id's digits, the
/// channel, and what follows.
fn canonical_delivery_start(element: &[u8]) -> Option<(&[u8], &str, &[u8])> {
    let s = element.strip_prefix(br#"{"id":""#)?;
    let (id, s) = canonical_hex(s)?;
    let s = s.strip_prefix(br#","channel":""#)?;
    let (channel, s) = canonical_text(s)?;
    let s = s.strip_prefix(br#","from":""#)?;
    let (_, s) = canonical_hex(s)?;
    Some((id, channel, s))
}

/// A JSON string's text at the start of `s` (after its opening quote) with
/// nothing to unescape, and what follows its closing quote.
fn canonical_text(s: &[u8]) -> Option<(&str, &[u8])> {
    let end = s
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    let text = std::str::from_utf8(&s[..end]).ok()?;
    Some((text, s[end..].strip_prefix(b"\"")?))
}

/// `true` or `false` at the start of `s`, and what follows.
fn canonical_bool(s: &[u8]) -> Option<(bool, &[u8])> {
    match s.strip_prefix(b"true") {
        Some(after) => Some((true, after)),
        None => Some((false, s.strip_prefix(b"false")?)),
    }
}

/// A mesh delivery of a batch as [`MeshDelivery::canonical_batch`] reads
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalMeshDelivery<'a> {
    /// Its routing fields.
    pub delivery: MeshDelivery,
    /// Its body without `bin` and without the closing brace: what the
    /// cell's `DLVR` (or `RQST`) carries, once closed.
    pub head: &'a [u8],
    /// Its `bin`, in a packed batch.
    pub bin: Option<u64>,
}

impl MeshDelivery {
    /// Reads a batch of `MDLV` bodies (PROTOCOL.md §19, §23) whose every
    /// element has the shape transmitters write,
    /// `{"id":"<hex>","channel":"<text>","from":"<hex>","attempt":<n>,"cell":"<hex>","origin":"<hex>","ack":<bool>,"request":<bool>[,"bin":<n>]}`
    /// (no payload, no whitespace, nothing to unescape), without serde.
    /// `None` when anything differs: the caller then reads it the general
    /// way, which gives the same deliveries.
    pub fn canonical_batch(body: &[u8]) -> Option<Vec<CanonicalMeshDelivery<'_>>> {
        canonical_array(body, |element| {
            let (id, _, s) = canonical_delivery_start(element)?;
            let (attempt, s) = canonical_number::<u32>(s, br#","attempt":"#)?;
            attempt?;
            let s = s.strip_prefix(br#","cell":""#)?;
            let (cell, s) = canonical_thid(s)?;
            let s = s.strip_prefix(br#","origin":""#)?;
            let (origin, s) = canonical_thid(s)?;
            let s = s.strip_prefix(br#","ack":"#)?;
            let (ack, s) = canonical_bool(s)?;
            let s = s.strip_prefix(br#","request":"#)?;
            let (request, s) = canonical_bool(s)?;
            let head = &element[..element.len() - s.len()];
            let (bin, s) = canonical_number(s, br#","bin":"#)?;
            let s = s.strip_prefix(b"}")?;
            let delivery = MeshDelivery {
                id: Thid::parse_hex(id).ok()?,
                cell,
                origin,
                ack,
                request,
            };
            Some((
                CanonicalMeshDelivery {
                    delivery,
                    head,
                    bin,
                },
                s,
            ))
        })
    }
}

/// A mesh event (`MEVT`) of a batch as [`canonical_mesh_events`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalMeshEvent<'a> {
    /// Its channel.
    pub channel: &'a str,
    /// Its body without `bin` and without the closing brace: what the
    /// cells' multicatch `EVNT` carries, once closed.
    pub head: &'a [u8],
    /// Its `bin`, in a packed batch.
    pub bin: Option<u64>,
}

/// Reads a batch of `MEVT` bodies (PROTOCOL.md §19, §23) whose every
/// element has the shape transmitters write,
/// `{"id":"<hex>","channel":"<text>","from":"<hex>"[,"bin":<n>]}` (no
/// payload, no whitespace, nothing to unescape), without serde. `None`
/// when anything differs: the caller then reads it the general way.
pub fn canonical_mesh_events(body: &[u8]) -> Option<Vec<CanonicalMeshEvent<'_>>> {
    canonical_array(body, |element| {
        let (_, channel, s) = canonical_delivery_start(element)?;
        let head = &element[..element.len() - s.len()];
        let (bin, s) = canonical_number(s, br#","bin":"#)?;
        let s = s.strip_prefix(b"}")?;
        Some((CanonicalMeshEvent { channel, head, bin }, s))
    })
}

/// An optional `,"key":<n>` at the start of `s` (`key` given with its
/// punctuation), and what follows; `None` when it is there but is not a
/// plain JSON integer that fits `T`. For readers of the canonical shapes
/// (here and in the cell SDK) that fall back to serde on `None`.
pub fn canonical_number<'a, T: std::str::FromStr>(
    s: &'a [u8],
    key: &[u8],
) -> Option<(Option<T>, &'a [u8])> {
    let Some(after) = s.strip_prefix(key) else {
        return Some((None, s));
    };
    let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && after[0] == b'0') {
        return None;
    }
    let n = std::str::from_utf8(&after[..digits]).ok()?.parse().ok()?;
    Some((Some(n), &after[digits..]))
}

/// `DLVR` to a cell, and (without `attempt`) the body of a multicatch
/// `EVNT` to a cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// The event's THID.
    pub id: Thid,
    /// The channel it was published on.
    pub channel: String,
    /// The JSON payload (absent when the event carried only binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    /// The publishing cell's THID.
    pub from: Thid,
    /// 1 for the first delivery, +1 per redelivery (DLVR only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// `ACKN` / `NACK`: one delivery (`id`) or a batch (`ids`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ack {
    /// One delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Thid>,
    /// A batch of deliveries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<Thid>,
    /// The attempt being answered (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// `GBYE`: leaving.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `OKAY`, `PING`, `PONG`: a body with just a `ref`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ref {
    /// Echo of the command's `ref`.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// `OKAY` in answer to a confirmed `EVNT`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Confirm {
    /// Echo of the command's `ref`.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
    /// The event's THID.
    pub id: Option<Thid>,
    /// How many services (anycatch) and whether multicatch listeners got it.
    #[serde(default)]
    pub routed: u32,
}

/// `ERRR`: what went wrong.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// A stable code from [`ErrorCode`].
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The `ref` of the command, else the THID it concerned, else null.
    pub re: Option<Value>,
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $text:literal),* $(,)?) => {
        /// The stable error codes of `ERRR`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* #[serde(rename = $text)] $name,)*
        }

        impl ErrorCode {
            /// Every code.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The wire spelling.
            pub fn as_str(&self) -> &'static str {
                match self { $(ErrorCode::$name => $text,)* }
            }
        }
    };
}

error_codes! {
    /// The frame does not start with `J VERB` / `VERB`, or is not UTF-8.
    BadFrame = "bad_frame",
    /// A message with the wrong number of frames.
    BadMultipart = "bad_multipart",
    /// An encoding other than `J`.
    BadEncoding = "bad_encoding",
    /// A verb protocol v1 does not define, or one only the transmitter sends.
    UnknownVerb = "unknown_verb",
    /// The body is not JSON, or a field has the wrong type or is missing.
    BadJson = "bad_json",
    /// A command other than HELO/PING/GBYE before HELO.
    NotWelcomed = "not_welcomed",
    /// A HELO naming a THID that another live connection holds, or a
    /// second HELO with a different THID on one connection.
    ThidInUse = "thid_in_use",
    /// A service name that is empty, too long or has spaces.
    BadService = "bad_service",
    /// An invalid channel or pattern.
    BadPattern = "bad_pattern",
    /// UNLS of a pattern that is not listened to.
    NotListening = "not_listening",
    /// Too many patterns on one cell.
    TooManyListens = "too_many_listens",
    /// A confirmed EVNT that no cell listens to.
    NoListeners = "no_listeners",
    /// An ACKN/NACK for a delivery this cell does not hold.
    UnknownDelivery = "unknown_delivery",
    /// A message larger than the transmitter's limit.
    TooLarge = "too_large",
    /// The transmitter is shutting down.
    ShuttingDown = "shutting_down",
    /// Metadata with bad keys or values; the message names every one.
    BadMetadata = "bad_metadata",
    /// A query that does not parse.
    BadQuery = "bad_query",
    /// A targeted send that no cell matches (and that is not droppable).
    NoRoute = "no_route",
    /// A request that no cell listens to.
    NoResponders = "no_responders",
    /// A request whose reply did not come in time.
    TimedOut = "timed_out",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `META`: change the cell's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaUpdate {
    /// The keys to set.
    pub metadata: Map<String, Value>,
    /// Replace all metadata (true) or merge into it (false, the default).
    #[serde(default)]
    pub replace: bool,
    /// Echoed in the reply.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// `SEND`: a payload for one (or every) cell of a service whose metadata
/// matches a query. Borrowed from the frame so the payload is forwarded
/// without re-serializing.
#[derive(Debug, Deserialize)]
pub struct Targeted<'a> {
    /// The service whose cells are candidates.
    pub service: String,
    /// A selector string or a JSON query (see the query module); absent:
    /// every cell of the service matches.
    #[serde(default, rename = "where")]
    pub query: Option<Value>,
    /// Every matching cell (true) or one (false, the default).
    #[serde(default)]
    pub all: bool,
    /// The channel the cells see (default `send::<service>`).
    #[serde(default)]
    pub channel: Option<String>,
    /// The JSON payload, as raw text.
    #[serde(default, borrow)]
    pub payload: Option<&'a RawValue>,
    /// No match falls back to any cell of the service.
    #[serde(default)]
    pub optional: bool,
    /// No match is not an error: the send is dropped.
    #[serde(default)]
    pub droppable: bool,
    /// Consistent choice: the same key goes to the same cell.
    #[serde(default)]
    pub key: Option<Value>,
    /// Echoed in the reply.
    #[serde(default, rename = "ref")]
    pub reference: Option<Value>,
}

/// `DISC`: a question about the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discover {
    /// `services`, `instances`, `hosts`, `regions`, `versions` or `topology`.
    pub what: String,
    /// Only cells of this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Only cells whose metadata matches (selector string or JSON query).
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub query: Option<Value>,
    /// Echoed in the reply.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
}

/// `RQST` from a cell: a request for one cell listening to `channel`.
#[derive(Debug, Deserialize)]
pub struct Request<'a> {
    /// The channel responders listen to (anycatch).
    #[serde(borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    /// Only cells of this service answer.
    #[serde(default)]
    pub service: Option<String>,
    /// Only cells whose metadata matches answer.
    #[serde(default, rename = "where")]
    pub query: Option<Value>,
    /// The JSON payload, as raw text.
    #[serde(default, borrow)]
    pub payload: Option<&'a RawValue>,
    /// How long to wait for the reply (default 5000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Echoed in the reply.
    #[serde(default, rename = "ref")]
    pub reference: Option<Value>,
}

/// `RPLY` from a responder: the answer to request `id`; also the body of
/// `MRPL` between transmitters (with `cell`).
#[derive(Debug, Deserialize)]
pub struct Reply<'a> {
    /// The request's THID.
    pub id: Thid,
    /// The JSON result.
    #[serde(default, borrow)]
    pub payload: Option<&'a RawValue>,
    /// The handler's error message, instead of a result.
    #[serde(default)]
    pub error: Option<String>,
    /// The responding cell (`MRPL` only).
    #[serde(default)]
    pub cell: Option<Thid>,
}

/// `MACK`, transmitter → transmitter: the cell that got forwarded
/// deliveries acked them (`ok`) or refused them / is gone (`!ok`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshAck {
    /// The deliveries' event THIDs.
    pub ids: Vec<Thid>,
    /// The cell that got them.
    pub cell: Thid,
    /// Acked (true) or to be redelivered (false).
    pub ok: bool,
}

/// `MDLV`, transmitter → transmitter: the fields, beyond a DLVR's, that say
/// which local cell gets the delivery and who awaits its ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshDelivery {
    /// The event's THID.
    pub id: Thid,
    /// The cell of the receiving transmitter that gets it.
    pub cell: Thid,
    /// The transmitter that chose the cell and awaits the ack.
    pub origin: Thid,
    /// Whether the cell's listen wants ACKN.
    pub ack: bool,
    /// A request (delivered as `RQST`, answered by `RPLY`), not an event.
    #[serde(default)]
    pub request: bool,
}

/// Appends `s` as a JSON string: as is between quotes when nothing in it
/// needs escaping (channels never do), else through `serde_json`.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Serializing a &str into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Writes the JSON body of a delivery (`DLVR`, or an event-socket `EVNT`
/// when `attempt` is `None`) into `out`, copying the payload's raw JSON text
/// as it came: nothing is re-serialized.
pub fn write_delivery(
    out: &mut Vec<u8>,
    id: &Thid,
    channel: &str,
    payload: Option<&[u8]>,
    from: &Thid,
    attempt: Option<u32>,
) {
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(&id.hex());
    out.extend_from_slice(b"\",\"channel\":");
    write_json_str(out, channel);
    if let Some(p) = payload {
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b",\"from\":\"");
    out.extend_from_slice(&from.hex());
    out.push(b'"');
    if let Some(a) = attempt {
        out.extend_from_slice(b",\"attempt\":");
        out.extend_from_slice(crate::thid::decimal(u64::from(a), &mut [0u8; 20]));
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An event's channel, THID, sequence number and `bin`.
    type Read = (String, Option<Thid>, Option<u64>, Option<u64>);

    /// What serde reads from a batch, in the fields `canonical_batch` fills.
    fn by_serde(body: &[u8]) -> Option<Vec<Read>> {
        let items: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
        items
            .iter()
            .map(|i| {
                let p: Publish<'_> = serde_json::from_str(i.get()).ok()?;
                Some((p.channel.into_owned(), p.id, p.seq, p.bin))
            })
            .collect()
    }

    /// What `canonical_batch` reads from a batch.
    fn fast(body: &[u8]) -> Option<Vec<Read>> {
        Publish::canonical_batch(body).map(|events| {
            events
                .into_iter()
                .map(|p| {
                    assert!(p.payload.is_none() && !p.confirm && p.reference.is_none());
                    (p.channel.into_owned(), p.id, p.seq, p.bin)
                })
                .collect()
        })
    }

    #[test]
    fn canonical_batches_read_as_serde_reads_them() {
        let id = Thid::random();
        let hex = id.to_hex();
        let body = format!(
            r#"[{{"channel":"a::b","id":"{hex}","seq":7}},{{"channel":"é::c","bin":0}},{{"channel":"x","seq":0,"bin":128}}]"#
        );
        let read = fast(body.as_bytes()).expect("canonical");
        assert_eq!(read, by_serde(body.as_bytes()).unwrap());
        assert_eq!(read[0], ("a::b".to_owned(), Some(id), Some(7), None));
        assert_eq!(read[2], ("x".to_owned(), None, Some(0), Some(128)));
    }

    #[test]
    fn anything_else_is_left_to_serde() {
        let hex = Thid::random().to_hex();
        for body in [
            "[]".to_owned(),
            r#"{"channel":"a"}"#.to_owned(),
            r#"[{"channel":"a"} ]"#.to_owned(),
            r#"[ {"channel":"a"}]"#.to_owned(),
            r#"[{"channel":"a","payload":1}]"#.to_owned(),
            r#"[{"channel":"a","confirm":true}]"#.to_owned(),
            r#"[{"channel":"a\u003a"}]"#.to_owned(),
            r#"[{"channel":"a"},]"#.to_owned(),
            r#"[{"channel":"a"}"#.to_owned(),
            r#"[{"channel":"a","seq":01}]"#.to_owned(),
            r#"[{"channel":"a","seq":}]"#.to_owned(),
            r#"[{"channel":"a","seq":18446744073709551616}]"#.to_owned(),
            r#"[{"channel":"a","seq":1,"id":"00"}]"#.to_owned(),
            r#"[{"channel":"a","bin":1,"seq":1}]"#.to_owned(),
            r#"[{"channel":"a","bin":-1}]"#.to_owned(),
            format!(r#"[{{"channel":"a","id":"{}"}}]"#, &hex[1..]),
            format!(r#"[{{"channel":"a","id":"{}x"}}]"#, &hex[1..]),
            format!(r#"[{{"seq":1,"channel":"a","id":"{hex}"}}]"#),
            "[{\"channel\":\"a\tb\"}]".to_owned(),
        ] {
            assert!(fast(body.as_bytes()).is_none(), "{body}");
        }
    }

    /// An `MDLV` body as transmitters write it.
    fn mdlv(channel: &str, attempt: u32, ack: bool, request: bool, bin: Option<u64>) -> String {
        let (id, from, cell, origin) = (
            Thid::random(),
            Thid::random(),
            Thid::random(),
            Thid::random(),
        );
        let bin = bin.map_or(String::new(), |b| format!(r#","bin":{b}"#));
        format!(
            r#"{{"id":"{id}","channel":"{channel}","from":"{from}","attempt":{attempt},"cell":"{cell}","origin":"{origin}","ack":{ack},"request":{request}{bin}}}"#
        )
    }

    #[test]
    fn canonical_mesh_batches_read_as_serde_reads_them() {
        let elements = [
            mdlv("a::b", 1, true, false, None),
            mdlv("é", 7, false, true, Some(0)),
            mdlv("x", 4_000_000_000, false, false, Some(12)),
        ];
        let body = format!("[{}]", elements.join(","));
        let read = MeshDelivery::canonical_batch(body.as_bytes()).expect("canonical");
        let items: Vec<&RawValue> = serde_json::from_str(&body).unwrap();
        for ((fast, item), text) in read.iter().zip(items).zip(&elements) {
            let slow: MeshDelivery = serde_json::from_str(item.get()).unwrap();
            assert_eq!(fast.delivery, slow);
            let bin: Option<u64> =
                serde_json::from_str::<Value>(item.get()).unwrap()["bin"].as_u64();
            assert_eq!(fast.bin, bin);
            let head = text.split(r#","bin":"#).next().unwrap();
            let head = head.strip_suffix('}').unwrap_or(head);
            assert_eq!(fast.head, head.as_bytes());
        }
        for bad in [
            "[]".to_owned(),
            format!(
                "[{}]",
                mdlv("a", 1, true, false, None).replace(r#""attempt":1"#, r#""attempt":-1"#)
            ),
            format!(
                "[{}]",
                mdlv("a", 1, true, false, None).replace(r#""ack":true"#, r#""ack":1"#)
            ),
            format!(
                "[{}]",
                mdlv("a", 1, true, false, None).replace(r#""from""#, r#""payload":1,"from""#)
            ),
            format!("[{}]", mdlv(r"a\u0041", 1, true, false, None)),
            format!("[{} ]", mdlv("a", 1, true, false, None)),
        ] {
            assert!(
                MeshDelivery::canonical_batch(bad.as_bytes()).is_none(),
                "{bad}"
            );
        }
    }

    #[test]
    fn canonical_mesh_events_read_as_serde_reads_them() {
        let (id, from) = (Thid::random(), Thid::random());
        let body = format!(
            r#"[{{"id":"{id}","channel":"a::b","from":"{from}"}},{{"id":"{id}","channel":"é","from":"{from}","bin":3}}]"#
        );
        let read = canonical_mesh_events(body.as_bytes()).expect("canonical");
        let items: Vec<Value> = serde_json::from_str(&body).unwrap();
        for (fast, slow) in read.iter().zip(&items) {
            assert_eq!(fast.channel, slow["channel"]);
            assert_eq!(fast.bin, slow["bin"].as_u64());
        }
        assert_eq!(
            read[1].head,
            format!(r#"{{"id":"{id}","channel":"é","from":"{from}""#).as_bytes()
        );
        for bad in [
            format!(r#"[{{"id":"{id}","channel":"a","payload":1,"from":"{from}"}}]"#),
            format!(r#"[{{"id":"{id}","channel":"a\"b","from":"{from}"}}]"#),
            format!(r#"[{{"id":"{id}","channel":"a","from":"{from}","bin":x}}]"#),
            format!(r#"[{{"channel":"a","id":"{id}","from":"{from}"}}]"#),
        ] {
            assert!(canonical_mesh_events(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn whatever_it_accepts_serde_reads_the_same(
            elements in proptest::collection::vec(
                (
                    "[a-z:é\"\\\\\t]{0,6}",
                    proptest::option::of(any::<[u8; 20]>()),
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(any::<u64>()),
                ),
                1..5,
            ),
            noise in proptest::option::of((0usize..200, any::<u8>())),
        ) {
            let mut body = String::from("[");
            for (i, (channel, id, seq, bin)) in elements.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!(r#"{{"channel":"{channel}""#));
                if let Some(id) = id {
                    body.push_str(&format!(r#","id":"{}""#, Thid::from_bytes(*id).to_hex()));
                }
                if let Some(seq) = seq {
                    body.push_str(&format!(r#","seq":{seq}"#));
                }
                if let Some(bin) = bin {
                    body.push_str(&format!(r#","bin":{bin}"#));
                }
                body.push('}');
            }
            body.push(']');
            let mut bytes = body.into_bytes();
            if let Some((at, b)) = noise {
                let at = at % bytes.len();
                bytes[at] = b;
            }
            if let Some(read) = fast(&bytes) {
                prop_assert_eq!(Some(read), by_serde(&bytes));
            }
        }
    }

    #[test]
    fn written_deliveries_parse_back() {
        let id = Thid::random();
        let from = Thid::random();
        let mut out = Vec::new();
        write_delivery(
            &mut out,
            &id,
            "a::\"b",
            Some(br#"{"x":[1,2]}"#),
            &from,
            Some(3),
        );
        let d: Delivery = serde_json::from_slice(&out).unwrap();
        assert_eq!(d.id, id);
        assert_eq!(d.from, from);
        assert_eq!(d.channel, "a::\"b");
        assert_eq!(d.payload.unwrap().get(), r#"{"x":[1,2]}"#);
        assert_eq!(d.attempt, Some(3));

        // A channel that needs no escaping is copied as is.
        out.clear();
        write_delivery(&mut out, &id, "a::b", None, &from, Some(12_345));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains(r#""channel":"a::b","#), "{text}");
        assert!(text.ends_with(r#""attempt":12345}"#), "{text}");
        let d: Delivery = serde_json::from_slice(&out).unwrap();
        assert_eq!((d.channel.as_str(), d.attempt), ("a::b", Some(12_345)));
    }

    #[test]
    fn publish_borrows_its_payload() {
        let body = br#"{"channel":"a","payload":{"k":"v"},"seq":4}"#;
        let p: Publish<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(p.payload.unwrap().get(), r#"{"k":"v"}"#);
        assert_eq!(p.seq, Some(4));
        assert!(!p.confirm);
    }

    #[test]
    fn error_codes_have_stable_spellings() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn modes_use_their_wire_names() {
        let l: Listen = serde_json::from_str(r#"{"pattern":"a::*","mode":"multi"}"#).unwrap();
        assert_eq!(l.mode, Mode::Multi);
        assert!(serde_json::from_str::<Listen>(r#"{"pattern":"a","mode":"some"}"#).is_err());
    }
}
