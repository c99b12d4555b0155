//! [`Subscription`]: the stream of events of one listened pattern.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use thynapse_protocol::Mode;
use tokio::sync::mpsc;

use crate::event::Event;
use crate::link::{Control, Link};
use crate::options::ListenOptions;

/// The events of one pattern, from [`Client::listen`](crate::Client::listen).
///
/// A `Stream<Item = Event>`; [`Subscription::next_event`] reads it without
/// any extra crate. The stream ends when the connection closes (after
/// [`Client::close`](crate::Client::close), when the last
/// [`Client`](crate::Client) is dropped, or when the transmitter says
/// `GBYE` and there is no failover endpoint). Dropping the subscription
/// stops listening (`UNLS`, unless
/// another subscription of this client listens to the same pattern), and
/// anycatch deliveries still queued in it, never handed out, are handed back
/// to the transmitter (`NACK`) for redelivery.
pub struct Subscription {
    /// Identifies it to the connection task.
    pub(crate) id: u64,
    /// The pattern, as given.
    pub(crate) pattern: String,
    /// Mode and ack.
    pub(crate) options: ListenOptions,
    /// Events routed to it by the connection task, in batches.
    pub(crate) events: mpsc::UnboundedReceiver<Vec<Event>>,
    /// The rest of the batch being read.
    pub(crate) ready: std::vec::IntoIter<Event>,
    /// To unlisten on drop.
    pub(crate) link: Arc<Link>,
}

impl Subscription {
    /// The pattern listened to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// anycatch or multicatch.
    pub fn mode(&self) -> Mode {
        self.options.mode
    }

    /// The listen options.
    pub fn options(&self) -> ListenOptions {
        self.options
    }

    /// The next event; `None` once the connection is closed.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is removed from the queue only when this
    /// future completes.
    pub async fn next_event(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// An event if one is queued right now, without waiting.
    pub fn try_next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.next_ready() {
                return Some(event);
            }
            self.ready = self.events.try_recv().ok()?.into_iter();
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            if let Some(event) = self.next_ready() {
                return Poll::Ready(Some(event));
            }
            match std::task::ready!(self.events.poll_recv(cx)) {
                Some(batch) => self.ready = batch.into_iter(),
                None => return Poll::Ready(None),
            }
        }
    }

    /// The next event of the current batch, handed to user code.
    fn next_ready(&mut self) -> Option<Event> {
        let mut event = self.ready.next()?;
        event.mark_yielded();
        Some(event)
    }
}

impl futures_core::Stream for Subscription {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Stop the routing first, then the queued events drop with
        // `events` and `ready` and hand their deliveries back.
        self.link.control(Control::Unlisten { sub: self.id });
        self.events.close();
    }
}
