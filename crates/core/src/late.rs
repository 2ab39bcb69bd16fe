//! Late output (I8): the one place that decides whether something an agent
//! produced may still be stored or streamed.
//!
//! Output travels three hops, and each hop asks this module, in these words:
//! - **the agent session** ([`PromptGate`]): an update is attributed to a
//!   turn only while that turn's prompt is in flight on the agent session —
//!   its gate opened right before the prompt is sent, cancelled when
//!   `session/cancel` goes out, and gone when the response arrives or the
//!   turn is forced off the session. ACP updates carry no request id, but
//!   JSON-RPC on one pipe is ordered: every update sent before a prompt's
//!   response arrives before it, so anything that arrives once the gate is
//!   closed is late by protocol, not by timing;
//! - **the turn** (`turn::TurnMachine`): once the machine has ended or
//!   abandoned the turn, every further event is dropped
//!   ([`LateReason::TurnEnded`]);
//! - **the stream** ([`DeltaFilter`]): only deltas of a turn the subscriber
//!   knows to be running are delivered (the active turn when it opened, or
//!   one whose `turn_started` it delivered, until its `turn_ended`), and not
//!   from a worker whose lease epoch is older than one already seen on the
//!   session (a fenced worker).
//!
//! What is guaranteed: nothing of a turn is stored after its terminal entry
//! (the store's epoch and active-turn check is the backstop), no delta of an
//! ended turn or of a fenced worker reaches a stream, and an update that
//! arrives on an agent session with no prompt in flight is dropped and
//! counted, never given to the next turn. The one case the protocol cannot
//! order — an agent that keeps talking after it answered, while the next
//! prompt is already on its way — is covered by a quiet window (the ACP
//! driver's `quiet_after_answer`); that is the only timing rule.

use std::collections::HashSet;

use crate::{Entry, EntryType, Epoch, TurnId};

/// Why an agent's output was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LateReason {
    /// No prompt is in flight on the agent session (it already answered).
    NoPrompt,
    /// The turn asked the agent to cancel; what follows is not stored.
    AfterCancel,
    /// The turn was forced off the agent session.
    Abandoned,
    /// The turn has ended.
    TurnEnded,
    /// The delta comes from a worker whose lease was superseded.
    StaleEpoch,
}

impl LateReason {
    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPrompt => "no_prompt",
            Self::AfterCancel => "after_cancel",
            Self::Abandoned => "abandoned",
            Self::TurnEnded => "turn_ended",
            Self::StaleEpoch => "stale_epoch",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Open(u64),
    Cancelled(u64),
}

/// The prompt in flight on one agent session, while its updates are still
/// admitted. A session with no gate has no prompt in flight: the driver
/// drops the gate when the prompt's response arrives or the turn is forced
/// off, and answers [`LateReason::NoPrompt`] or [`LateReason::Abandoned`]
/// for what comes after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptGate(Gate);

impl PromptGate {
    /// Prompt `prompt` is about to be sent: its updates are admitted.
    pub fn open(prompt: u64) -> Self {
        Self(Gate::Open(prompt))
    }

    /// A cancel went out for `prompt`; returns whether this was the first.
    pub fn cancel(&mut self, prompt: u64) -> bool {
        if self.0 == Gate::Open(prompt) {
            self.0 = Gate::Cancelled(prompt);
            true
        } else {
            false
        }
    }

    /// The prompt an update arriving now belongs to, or why it is late.
    pub fn admit(&self) -> Result<u64, LateReason> {
        match self.0 {
            Gate::Open(p) => Ok(p),
            Gate::Cancelled(_) => Err(LateReason::AfterCancel),
        }
    }
}

/// A stream's view of which deltas it may still deliver: those of the turns
/// it knows to be running. It knows a turn runs from the session's active
/// turn when the stream opened, or from the turn's `turn_started` it
/// delivered; it stops at the turn's `turn_ended`. A delta of any other turn
/// is late: that turn ended at or before the stream's cursor (a stream
/// resumed past a turn's end never sees that end, yet the turn's last
/// deltas may still be on their way from another node).
#[derive(Debug, Default)]
pub struct DeltaFilter {
    epoch: Epoch,
    running: HashSet<TurnId>,
}

impl DeltaFilter {
    /// A stream opened while `active` was the session's running turn.
    pub fn opened(active: Option<TurnId>) -> Self {
        Self {
            epoch: Epoch::default(),
            running: active.into_iter().collect(),
        }
    }

    /// Notes a stored entry the stream delivered.
    pub fn entry(&mut self, e: &Entry) {
        let Some(t) = e.turn_id else {
            return;
        };
        match e.kind {
            EntryType::TurnStarted => {
                self.running.insert(t);
            }
            EntryType::TurnEnded => {
                self.running.remove(&t);
            }
            _ => {}
        }
    }

    /// Whether a delta of `turn` from a worker holding `epoch` may go out.
    pub fn admit(&mut self, turn: TurnId, epoch: Epoch) -> Result<(), LateReason> {
        if !self.running.contains(&turn) {
            return Err(LateReason::TurnEnded);
        }
        if epoch < self.epoch {
            return Err(LateReason::StaleEpoch);
        }
        self.epoch = epoch;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InputRange, NewEntry, SessionId, Timestamp, TurnStatus};

    #[test]
    fn a_gate_admits_its_prompt_until_the_cancel() {
        let mut g = PromptGate::open(1);
        assert_eq!(g.admit(), Ok(1));
        assert!(!g.cancel(2), "another prompt's cancel changes nothing");
        assert_eq!(g.admit(), Ok(1));
        assert!(g.cancel(1));
        assert!(!g.cancel(1), "a cancel is sent once");
        assert_eq!(g.admit(), Err(LateReason::AfterCancel));
    }

    #[test]
    fn a_stream_drops_deltas_of_ended_turns_and_older_epochs() {
        let (a, b) = (TurnId::new(), TurnId::new());
        let session = SessionId::new();
        let mut f = DeltaFilter::opened(Some(a));
        assert_eq!(f.admit(a, 2), Ok(()));
        assert_eq!(f.admit(a, 1), Err(LateReason::StaleEpoch));
        let ended = NewEntry::turn_ended(a, TurnStatus::Completed, None).committed(
            session,
            3,
            Timestamp(0),
        );
        f.entry(&ended);
        assert_eq!(f.admit(a, 2), Err(LateReason::TurnEnded));
        let started = NewEntry::turn_started(b, InputRange { from: 4, to: 4 }).committed(
            session,
            5,
            Timestamp(0),
        );
        f.entry(&started);
        assert_eq!(f.admit(b, 2), Ok(()));
    }

    #[test]
    fn a_stream_resumed_past_a_turns_end_drops_its_late_deltas() {
        // Resumed after the turn's `turn_ended` (the session idle, or on to
        // its next turn): the stream never delivers that end, but the
        // turn's last deltas may still arrive from another node's bus.
        // They were streamed; the chaos run on a PostgreSQL cluster found it.
        let (ended, next) = (TurnId::new(), TurnId::new());
        let mut idle = DeltaFilter::opened(None);
        assert_eq!(idle.admit(ended, 1), Err(LateReason::TurnEnded));
        let mut busy = DeltaFilter::opened(Some(next));
        assert_eq!(busy.admit(ended, 1), Err(LateReason::TurnEnded));
        assert_eq!(busy.admit(next, 2), Ok(()));
    }
}
