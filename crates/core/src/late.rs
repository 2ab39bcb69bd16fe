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
//! - **the stream** ([`DeltaFilter`]): a delta of a turn whose `turn_ended`
//!   the subscriber has seen, or of a worker whose lease epoch is older than
//!   one already seen on the session (a fenced worker), is not delivered.
//!
//! What is guaranteed: nothing of a turn is stored after its terminal entry
//! (the store's epoch and active-turn check is the backstop), no delta of an
//! ended turn or of a fenced worker reaches a stream, and an update that
//! arrives on an agent session with no prompt in flight is dropped and
//! counted, never given to the next turn. The one case the protocol cannot
//! order — an agent that keeps talking after it answered, while the next
//! prompt is already on its way — is covered by a quiet window (the ACP
//! driver's `quiet_after_answer`); that is the only timing rule.

use std::collections::{HashSet, VecDeque};

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

/// How many ended turns a stream remembers (older ones ended long before
/// anything it could still receive).
const ENDED_MEMORY: usize = 64;

/// A stream's view of which deltas it may still deliver.
#[derive(Debug, Default)]
pub struct DeltaFilter {
    epoch: Epoch,
    ended: HashSet<TurnId>,
    order: VecDeque<TurnId>,
}

impl DeltaFilter {
    /// Notes a stored entry the stream delivered.
    pub fn entry(&mut self, e: &Entry) {
        if e.kind == EntryType::TurnEnded {
            if let Some(t) = e.turn_id {
                if self.ended.insert(t) {
                    self.order.push_back(t);
                    if self.order.len() > ENDED_MEMORY {
                        if let Some(old) = self.order.pop_front() {
                            self.ended.remove(&old);
                        }
                    }
                }
            }
        }
    }

    /// Whether a delta of `turn` from a worker holding `epoch` may go out.
    pub fn admit(&mut self, turn: TurnId, epoch: Epoch) -> Result<(), LateReason> {
        if self.ended.contains(&turn) {
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
    use crate::{NewEntry, SessionId, Timestamp, TurnStatus};

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
        let mut f = DeltaFilter::default();
        assert_eq!(f.admit(a, 2), Ok(()));
        assert_eq!(f.admit(a, 1), Err(LateReason::StaleEpoch));
        let ended = NewEntry::turn_ended(a, TurnStatus::Completed, None).committed(
            SessionId::new(),
            3,
            Timestamp(0),
        );
        f.entry(&ended);
        assert_eq!(f.admit(a, 2), Err(LateReason::TurnEnded));
        assert_eq!(f.admit(b, 2), Ok(()));
    }
}
