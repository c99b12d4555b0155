//! Received events and their acknowledgement.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::Value;
use thynapse_protocol::{Mode, Thid};

use crate::link::{Control, Link};

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
    /// The event's THID: stable across redeliveries.
    pub(crate) id: Thid,
    /// The channel it was published on.
    pub(crate) channel: String,
    /// The JSON payload as it was published.
    pub(crate) payload: Option<Box<RawValue>>,
    /// The binary payload frame, if the publisher sent bytes.
    pub(crate) binary: Option<Vec<u8>>,
    /// The publishing cell.
    pub(crate) from: Thid,
    /// 1, plus one per redelivery.
    pub(crate) attempt: u32,
    /// How it reached this cell.
    pub(crate) mode: Mode,
    /// Present when the delivery awaits an ack.
    pub(crate) guard: Option<AckGuard>,
}

impl Event {
    /// The event's THID: the same for every redelivery of one event (and
    /// for a publisher's retry of it).
    pub fn id(&self) -> Thid {
        self.id
    }

    /// The channel it was published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The THID of the cell that published it (the wire's `from`).
    pub fn from(&self) -> Thid {
        self.from
    }

    /// 1 for a first delivery, plus one per redelivery (anycatch); always 1
    /// for multicatch.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// anycatch or multicatch.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The JSON payload as raw text, exactly as published; `None` when the
    /// event carried none (a binary event, or no payload at all).
    pub fn payload_raw(&self) -> Option<&str> {
        self.payload.as_deref().map(RawValue::get)
    }

    /// The JSON payload deserialized into `T`; a missing payload reads as
    /// `null`.
    ///
    /// # Errors
    /// The `serde_json` error when the payload does not fit `T`.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.payload_raw().unwrap_or("null"))
    }

    /// The JSON payload as a [`Value`] (`Value::Null` when there is none).
    pub fn payload_value(&self) -> Value {
        self.payload().unwrap_or(Value::Null)
    }

    /// The binary payload, if the publisher sent bytes.
    pub fn binary(&self) -> Option<&[u8]> {
        self.binary.as_deref()
    }

    /// Takes the binary payload out of the event.
    pub fn take_binary(&mut self) -> Option<Vec<u8>> {
        self.binary.take()
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
            id: self.id,
            channel: self.channel.clone(),
            payload: self.payload.clone(),
            binary: self.binary.clone(),
            from: self.from,
            attempt: self.attempt,
            mode: self.mode,
            guard: None,
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id)
            .field("channel", &self.channel)
            .field("payload", &self.payload_raw())
            .field("binary", &self.binary.as_ref().map(Vec::len))
            .field("from", &self.from)
            .field("attempt", &self.attempt)
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
            id,
            channel: "a::b".into(),
            payload: Some(RawValue::from_string(r#"{"n":1}"#.into()).unwrap()),
            binary: None,
            from: Thid::random(),
            attempt: 1,
            mode: Mode::Any,
            guard: Some(AckGuard::new(id, link.clone())),
        }
    }

    fn received(rx: &LinkReceiver) -> Vec<String> {
        rx.control.try_iter().map(|c| format!("{c:?}")).collect()
    }

    #[test]
    fn a_handled_event_is_acked_once_on_drop() {
        let (link, rx) = Link::new(4).unwrap();
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
        let (link, rx) = Link::new(4).unwrap();
        let id = Thid::random();
        drop(event(&link, id));
        assert_eq!(received(&rx), vec![format!("{:?}", Control::Nack(id))]);
    }

    #[test]
    fn nack_suppresses_the_ack_and_explicit_ack_is_idempotent() {
        let (link, rx) = Link::new(4).unwrap();
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
        let (link, _rx) = Link::new(4).unwrap();
        let mut e = event(&link, Thid::random());
        e.payload = None;
        e.binary = Some(vec![1, 2]);
        assert_eq!(e.payload_raw(), None);
        assert_eq!(e.payload_value(), Value::Null);
        assert_eq!(e.payload::<Option<u8>>().unwrap(), None);
        assert_eq!(e.take_binary(), Some(vec![1, 2]));
        e.nack();
    }
}
