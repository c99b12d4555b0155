//! Received events and their acknowledgement.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde_json::value::RawValue;
use thynapse_protocol::{Mode, Thid};

use crate::link::{Control, Link};

/// The payload accessors of a received message (an [`Event`], a
/// [`Request`](crate::Request), a [`Reply`](crate::Reply)), given the
/// paths of its `Option<Box<RawValue>>` payload and `Option<Frame>`
/// binary frame: `payload_accessors!("reply", payload; binary)`.
macro_rules! payload_accessors {
    ($what:literal, $($payload:ident).+; $($binary:ident).+) => {
        #[doc = concat!("The JSON payload as raw text, exactly as sent; `None` when the ", $what, " carried none (binary only, or no payload at all).")]
        pub fn payload_raw(&self) -> Option<&str> {
            self.$($payload).+.as_deref().map(serde_json::value::RawValue::get)
        }

        /// The JSON payload deserialized into `T`; a missing payload reads
        /// as `null`.
        ///
        /// # Errors
        /// The `serde_json` error when the payload does not fit `T`.
        pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
            serde_json::from_str(self.payload_raw().unwrap_or("null"))
        }

        /// The JSON payload as a [`Value`](serde_json::Value)
        /// (`Value::Null` when there is none).
        pub fn payload_value(&self) -> serde_json::Value {
            self.payload().unwrap_or(serde_json::Value::Null)
        }

        #[doc = concat!("The binary payload, if the ", $what, " carried bytes (a second frame).")]
        pub fn binary(&self) -> Option<&[u8]> {
            self.$($binary).+.as_deref()
        }

        #[doc = concat!("Takes the binary payload out of the ", $what, ".")]
        pub fn take_binary(&mut self) -> Option<Vec<u8>> {
            self.$($binary).+.take().map($crate::event::Frame::into_vec)
        }
    };
}
pub(crate) use payload_accessors;

/// The accessors of a delivered message (an [`Event`], a
/// [`Request`](crate::Request)) whose [`Delivered`] is its `delivered`
/// field.
macro_rules! delivery_accessors {
    ($what:literal) => {
        #[doc = concat!("The ", $what, "'s THID: the same for every redelivery of it.")]
        pub fn id(&self) -> thynapse_protocol::Thid {
            self.delivered.id
        }

        /// The channel it was sent on.
        pub fn channel(&self) -> &str {
            &self.delivered.channel
        }

        /// The THID of the cell that sent it (the wire's `from`).
        pub fn from(&self) -> thynapse_protocol::Thid {
            self.delivered.from
        }

        /// 1 for a first delivery, plus one per redelivery (to another
        /// cell, after a NACK, a missed deadline or a cell gone).
        pub fn attempt(&self) -> u32 {
            self.delivered.attempt
        }

        $crate::event::payload_accessors!($what, delivered.payload; delivered.binary);
    };
}
pub(crate) use delivery_accessors;

/// A received binary payload, kept in the buffer it was read into:
/// reading it through `binary()` copies nothing, and neither does taking
/// a frame of its own out as a `Vec`.
#[derive(Clone)]
pub(crate) enum Frame {
    /// A binary frame of its own.
    Whole(Vec<u8>),
    /// Element payload of a packed batch (PROTOCOL.md §23): a range of the
    /// batch's one binary frame, which its elements share.
    Packed(Arc<Vec<u8>>, Range<usize>),
}

impl Frame {
    /// The bytes as a `Vec` (a copy for an element of a packed batch).
    pub(crate) fn into_vec(self) -> Vec<u8> {
        match self {
            Frame::Whole(bytes) => bytes,
            Frame::Packed(joined, range) => joined[range].to_vec(),
        }
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Frame::Whole(m) => m,
            Frame::Packed(m, range) => &m[range.clone()],
        }
    }
}

/// What the transmitter delivered: the fields of a `DLVR`, an `EVNT` or a
/// `RQST`, and its binary frame.
#[derive(Clone)]
pub(crate) struct Delivered {
    /// Its THID: stable across redeliveries.
    pub(crate) id: Thid,
    /// The channel it was sent on, shared by the deliveries of a batch
    /// on the same channel.
    pub(crate) channel: Arc<str>,
    /// The JSON payload as it was sent.
    pub(crate) payload: Option<Box<RawValue>>,
    /// The binary payload frame, if the sender sent bytes.
    pub(crate) binary: Option<Frame>,
    /// The sending cell.
    pub(crate) from: Thid,
    /// 1, plus one per redelivery.
    pub(crate) attempt: u32,
}

impl fmt::Debug for Delivered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivered")
            .field("id", &self.id)
            .field("channel", &self.channel)
            .field("payload", &self.payload.as_deref().map(RawValue::get))
            .field("binary", &self.binary.as_deref().map(<[u8]>::len))
            .field("from", &self.from)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// An event received on a [`Subscription`](crate::Subscription).
///
/// # Acknowledgement
/// An anycatch delivery of a pattern listened to with `ack: true` is
/// acknowledged (`ACKN`) automatically when the `Event` is dropped, that
/// is once the handler is done with it, unless [`Event::nack`] was called,
/// which hands it back to the transmitter for redelivery to another cell of
/// the service. [`Event::ack`] acknowledges early. Acks are batched: a few
/// dozen per frame, sent within about a millisecond.
///
/// Events of other kinds (multicatch, anycatch without acks) carry no ack;
/// `ack` and `nack` do nothing for them.
pub struct Event {
    /// What was delivered.
    pub(crate) delivered: Delivered,
    /// How it reached this cell.
    pub(crate) mode: Mode,
    /// Present when the delivery awaits an ack.
    pub(crate) guard: Option<AckGuard>,
}

impl Event {
    // The THID is also the same for a publisher's retry of the event;
    // `attempt` is always 1 for multicatch.
    delivery_accessors!("event");

    /// anycatch or multicatch.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether this delivery awaits an acknowledgement that has not been
    /// given yet.
    pub fn needs_ack(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| !g.settled)
    }

    /// Acknowledges now rather than on drop. Idempotent.
    pub fn ack(&mut self) {
        if let Some(g) = &mut self.guard {
            g.settle(true);
        }
    }

    /// Refuses the delivery: the transmitter redelivers it to another cell
    /// of this service (`attempt` + 1) and no ack is sent on drop. Does
    /// nothing after [`Event::ack`].
    pub fn nack(&mut self) {
        if let Some(g) = &mut self.guard {
            g.settle(false);
        }
    }

    /// Marks the event as handed to user code: from now on dropping it
    /// acks it. Before, dropping it (say, with an unread subscription)
    /// hands it back.
    pub(crate) fn mark_yielded(&mut self) {
        if let Some(g) = &mut self.guard {
            g.yielded = true;
        }
    }

    /// A copy for another multicatch subscriber (multicatch events carry
    /// no ack guard).
    pub(crate) fn clone_unacked(&self) -> Event {
        Event {
            delivered: self.delivered.clone(),
            mode: self.mode,
            guard: None,
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("delivered", &self.delivered)
            .field("mode", &self.mode)
            .field("needs_ack", &self.needs_ack())
            .finish()
    }
}

/// Sends the ACKN or NACK of one delivery exactly once.
pub(crate) struct AckGuard {
    /// The delivery.
    id: Thid,
    /// Where acks go.
    link: Arc<Link>,
    /// Whether user code got the event (else drop means NACK).
    yielded: bool,
    /// Whether the ACKN or NACK was sent.
    settled: bool,
}

impl AckGuard {
    /// A guard for delivery `id`.
    pub(crate) fn new(id: Thid, link: Arc<Link>) -> AckGuard {
        AckGuard {
            id,
            link,
            yielded: false,
            settled: false,
        }
    }

    fn settle(&mut self, ack: bool) {
        if !self.settled {
            self.settled = true;
            let message = if ack {
                Control::Ack(self.id)
            } else {
                Control::Nack(self.id)
            };
            // If the connection is closed the transmitter redelivers anyway.
            self.link.control(message);
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        let ack = self.yielded;
        self.settle(ack);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkReceiver;

    fn event(link: &Arc<Link>, id: Thid) -> Event {
        Event {
            delivered: Delivered {
                id,
                channel: "a::b".into(),
                payload: Some(RawValue::from_string(r#"{"n":1}"#.into()).unwrap()),
                binary: None,
                from: Thid::random(),
                attempt: 1,
            },
            mode: Mode::Any,
            guard: Some(AckGuard::new(id, link.clone())),
        }
    }

    fn received(rx: &LinkReceiver) -> Vec<String> {
        rx.control.try_iter().map(|c| format!("{c:?}")).collect()
    }

    #[test]
    fn a_handled_event_is_acked_once_on_drop() {
        let (link, rx) = Link::new(4);
        let id = Thid::random();
        let mut e = event(&link, id);
        e.mark_yielded();
        assert!(e.needs_ack());
        assert_eq!(e.payload_value()["n"], 1);
        drop(e);
        assert_eq!(received(&rx), vec![format!("{:?}", Control::Ack(id))]);
    }

    #[test]
    fn an_event_never_handed_out_is_nacked_on_drop() {
        let (link, rx) = Link::new(4);
        let id = Thid::random();
        drop(event(&link, id));
        assert_eq!(received(&rx), vec![format!("{:?}", Control::Nack(id))]);
    }

    #[test]
    fn nack_suppresses_the_ack_and_explicit_ack_is_idempotent() {
        let (link, rx) = Link::new(4);
        let (a, b) = (Thid::random(), Thid::random());
        let mut e = event(&link, a);
        e.mark_yielded();
        e.nack();
        e.ack();
        assert!(!e.needs_ack());
        drop(e);
        let mut e = event(&link, b);
        e.mark_yielded();
        e.ack();
        e.ack();
        drop(e);
        assert_eq!(
            received(&rx),
            vec![
                format!("{:?}", Control::Nack(a)),
                format!("{:?}", Control::Ack(b))
            ]
        );
    }

    #[test]
    fn payload_accessors_read_missing_payloads_as_null() {
        let (link, _rx) = Link::new(4);
        let mut e = event(&link, Thid::random());
        e.delivered.payload = None;
        e.delivered.binary = Some(Frame::Whole(vec![1u8, 2]));
        assert_eq!(e.binary(), Some(&[1u8, 2][..]));
        assert_eq!(e.payload_raw(), None);
        assert_eq!(e.payload_value(), serde_json::Value::Null);
        assert_eq!(e.payload::<Option<u8>>().unwrap(), None);
        assert_eq!(e.take_binary(), Some(vec![1, 2]));
        e.nack();
    }
}
