//! Membership events: which cells join, leave or change their metadata,
//! anywhere in the mesh.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde_json::{Map, Value};
use thynapse_protocol::Thid;
use tokio::sync::mpsc;

use crate::link::{Control, Link};

/// What happened to a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MembershipChange {
    /// It joined (said `HELO` at some transmitter of the mesh).
    Joined,
    /// It left: said `GBYE`, expired, or its transmitter left the mesh.
    Left,
    /// Its metadata changed (`META`, or `HELO` again).
    Updated,
}

/// One membership event, from a [`MembershipStream`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MembershipEvent {
    /// What happened.
    pub change: MembershipChange,
    /// The cell's THID.
    pub cell: Thid,
    /// Its service.
    pub service: String,
    /// Its metadata (as it was when it left, for [`MembershipChange::Left`]),
    /// with the keys the transmitter sets (`host`, `transmitter`).
    pub metadata: Map<String, Value>,
    /// The transmitter it is connected to.
    pub transmitter: Thid,
}

/// The membership events of the services whose name starts with a prefix,
/// from [`Client::membership`](crate::Client::membership).
///
/// A `Stream<Item = MembershipEvent>`; [`MembershipStream::next_event`]
/// reads it without any extra crate. It ends when the connection closes,
/// and unsubscribes when dropped. Membership events travel on the event
/// socket, at most once (a subscriber that falls behind loses them
/// silently); a client's first stream connects it to that socket.
pub struct MembershipStream {
    /// Identifies it to the connection task.
    id: u64,
    /// The events.
    events: mpsc::UnboundedReceiver<MembershipEvent>,
    /// To unsubscribe on drop.
    link: Arc<Link>,
}

impl MembershipStream {
    pub(crate) fn new(
        id: u64,
        events: mpsc::UnboundedReceiver<MembershipEvent>,
        link: Arc<Link>,
    ) -> MembershipStream {
        MembershipStream { id, events, link }
    }

    /// The next event; `None` once the connection is closed.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next_event(&mut self) -> Option<MembershipEvent> {
        self.events.recv().await
    }
}

impl futures_core::Stream for MembershipStream {
    type Item = MembershipEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<MembershipEvent>> {
        self.get_mut().events.poll_recv(cx)
    }
}

impl fmt::Debug for MembershipStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembershipStream").finish_non_exhaustive()
    }
}

impl Drop for MembershipStream {
    fn drop(&mut self) {
        self.link.control(Control::StopMembership { sub: self.id });
    }
}
