//! Ack batching and redelivery de-duplication: pure data structures the
//! background thread drives with its clock, tested without sockets.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

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
