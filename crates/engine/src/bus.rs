//! Live fan-out of committed entries and transient deltas to subscribers.
//!
//! The bus is best-effort by design: a subscriber that lags or misses an
//! event recovers from the store, because every stored entry has a `seq` and
//! the stream reader fills gaps from the log (I9). Deltas are never stored;
//! a missed delta is superseded by the stored message that ends it.
//!
//! One node: an in-process broadcast channel per session. Several nodes: a
//! [`Relay`] forwards every local publish to the other nodes and feeds theirs
//! back in with [`Bus::deliver`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baton_core::{Entry, SessionId, TurnId};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Something subscribers of a session see live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusEvent {
    /// A committed entry.
    Entry(Box<Entry>),
    /// A transient chunk of a turn's output, from the worker holding the
    /// lease of `epoch` (streams drop deltas of superseded epochs).
    Delta {
        turn_id: TurnId,
        #[serde(default)]
        epoch: baton_core::Epoch,
        text: String,
        /// Which of the turn's assistant messages this text will be part
        /// of once stored (from 1; see `TurnMachine::text_run`).
        #[serde(default)]
        run: u32,
        /// Where `text` starts in that run, in bytes.
        #[serde(default)]
        offset: u64,
    },
    /// Someone resuming a turn's stream asks the worker running it for the
    /// run of text streamed so far (deltas are not stored, so only the
    /// worker has it).
    TextWanted { turn_id: TurnId },
    /// The worker's answer to `TextWanted`: the current run of text from
    /// `offset` (0, or more when the relay split it). Plain streams ignore
    /// it: their clients already have, or never need, that text.
    TextSoFar {
        turn_id: TurnId,
        epoch: baton_core::Epoch,
        run: u32,
        offset: u64,
        text: String,
    },
    /// An entry was committed; fetch it from the store (used across nodes
    /// when the entry is too large to travel on the bus).
    Committed { seq: baton_core::Seq },
    /// A cancel was requested for a turn (wakes the node running it).
    Cancel { turn_id: TurnId, reason: String },
    /// A message was steered to a turn (wakes the node running it, which
    /// reads the message from the store and hands it to the agent).
    Steer { turn_id: TurnId },
    /// A node gave the session's lease up with work waiting (it is shutting
    /// down): any node may take it over now, without waiting for a sweep.
    Released,
}

/// Forwards local events to other nodes.
pub trait Relay: Send + Sync + 'static {
    /// Sends `event` of `session` to the other nodes (best effort).
    fn forward(&self, session: SessionId, event: &BusEvent);
}

/// Capacity of a session's channel; a slower subscriber lags and refills
/// from the store.
const CHANNEL_CAPACITY: usize = 1024;

/// The bus. Cheap to clone.
#[derive(Clone, Default)]
pub struct Bus {
    // A std mutex: held only to look up or insert a sender, never across an
    // await.
    channels: Arc<Mutex<HashMap<SessionId, broadcast::Sender<BusEvent>>>>,
    relay: Option<Arc<dyn Relay>>,
    /// Wakes this node's sweeper when a session's lease was released with
    /// work waiting, here or on another node.
    released: Arc<tokio::sync::Notify>,
}

impl Bus {
    /// A bus that also forwards to other nodes through `relay`.
    pub fn with_relay(relay: Arc<dyn Relay>) -> Self {
        Self {
            channels: Arc::default(),
            relay: Some(relay),
            released: Arc::default(),
        }
    }

    /// Resolves when a session's lease was released with work waiting.
    pub async fn released(&self) {
        self.released.notified().await;
    }

    /// Forgets a session's channel once nobody listens to it (no stream and
    /// no actor), so the map holds only live sessions.
    pub fn prune(&self, session: SessionId) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if channels
            .get(&session)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            channels.remove(&session);
        }
    }

    /// How many sessions have a channel (for tests and metrics).
    pub fn channels(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Subscribes to a session's live events.
    pub fn subscribe(&self, session: SessionId) -> broadcast::Receiver<BusEvent> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(session)
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe()
    }

    /// Publishes a local event: to local subscribers and other nodes.
    pub fn publish(&self, session: SessionId, event: BusEvent) {
        if let Some(relay) = &self.relay {
            relay.forward(session, &event);
        }
        self.deliver(session, event);
    }

    /// Publishes committed entries in order.
    pub fn publish_entries(&self, entries: &[Entry]) {
        for e in entries {
            self.publish(e.session_id, BusEvent::Entry(Box::new(e.clone())));
        }
    }

    /// Delivers an event to local subscribers only (events from other nodes).
    pub fn deliver(&self, session: SessionId, event: BusEvent) {
        if event == BusEvent::Released {
            self.released.notify_one();
            return;
        }
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = channels.get(&session) {
            if tx.send(event).is_err() {
                // Nobody listens any more: forget the channel.
                channels.remove(&session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's channel is forgotten once nobody listens, and not before.
    #[test]
    fn prune_forgets_only_channels_nobody_listens_to() {
        let bus = Bus::default();
        let (a, b) = (SessionId::new(), SessionId::new());
        let rx_a = bus.subscribe(a);
        let rx_b = bus.subscribe(b);
        assert_eq!(bus.channels(), 2);
        bus.prune(a);
        assert_eq!(bus.channels(), 2, "a still has a subscriber");
        drop(rx_a);
        bus.prune(a);
        assert_eq!(bus.channels(), 1);
        drop(rx_b);
        bus.prune(b);
        assert_eq!(bus.channels(), 0);
    }
}
