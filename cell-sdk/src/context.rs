//! The libzmq contexts the clients of a process share, for their SUBs (the
//! command socket's DEALER is the SDK's own, see `dealer`).
//!
//! Every context runs its own libzmq I/O thread (and reaper thread) once
//! it has a socket, so one per client would cost two threads and their
//! wake-ups per client. Clients share a few instead: each context serves
//! at most [`CLIENTS_PER_CONTEXT`] clients, well under libzmq's cap on the
//! sockets of one context (1023 by default), counting those of clients
//! that closed and whose sockets still linger. Contexts are never terminated: a closing
//! client waits for the transmitter to confirm its last frames instead
//! (`Conn::finish`).

use std::sync::{Mutex, PoisonError};

use crate::consts::CLIENTS_PER_CONTEXT;

/// Every context created, with how many clients use it now.
static CONTEXTS: Mutex<Vec<(zmq::Context, usize)>> = Mutex::new(Vec::new());

/// A client's place in a shared context, given back on drop.
pub(crate) struct ContextLease {
    /// The context.
    context: zmq::Context,
    /// Its index in [`CONTEXTS`].
    slot: usize,
}

impl ContextLease {
    /// A place in the first context with room, or in a new one.
    pub(crate) fn acquire() -> ContextLease {
        let mut contexts = CONTEXTS.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match contexts
            .iter()
            .position(|(_, clients)| *clients < CLIENTS_PER_CONTEXT)
        {
            Some(slot) => slot,
            None => {
                contexts.push((zmq::Context::new(), 0));
                contexts.len() - 1
            }
        };
        let (context, clients) = &mut contexts[slot];
        *clients += 1;
        ContextLease {
            context: context.clone(),
            slot,
        }
    }

    /// The context, to create sockets in.
    pub(crate) fn context(&self) -> &zmq::Context {
        &self.context
    }
}

impl Drop for ContextLease {
    fn drop(&mut self) {
        let mut contexts = CONTEXTS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, clients)) = contexts.get_mut(self.slot) {
            *clients = clients.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_share_a_context_until_it_is_full() {
        let first = ContextLease::acquire();
        let mut more: Vec<ContextLease> = (1..CLIENTS_PER_CONTEXT)
            .map(|_| ContextLease::acquire())
            .collect();
        // Other tests of this process may hold places too: at least one
        // further lease lands in another context.
        let extra: Vec<ContextLease> = (0..CLIENTS_PER_CONTEXT)
            .map(|_| ContextLease::acquire())
            .collect();
        assert!(extra.iter().any(|l| l.slot != first.slot));
        more.clear();
        drop(extra);
        // Places given back are taken again.
        let again = ContextLease::acquire();
        assert!(again.slot <= first.slot);
    }
}
