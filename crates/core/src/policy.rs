//! Busy policies: what happens to a user message that arrives while a turn
//! runs, and how waiting messages are grouped into turns.
//!
//! Both stores call [`decide`] and [`plan_turns`] inside the transaction that
//! stores the message, with the session row locked, so the decision and the
//! write are one atomic step (no check-then-act across an await).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{InputRange, Seq, TurnId};

/// What to do with a message that arrives while a turn runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Run after the current turn; one turn per message, FIFO.
    #[default]
    Queue,
    /// Run after the current turn, together with every message waiting then.
    Merge,
    /// Cancel the current turn, then run with every message waiting.
    Interrupt,
    /// Refuse with `409 session_busy`; nothing is stored.
    Reject,
}

impl Policy {
    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Merge => "merge",
            Self::Interrupt => "interrupt",
            Self::Reject => "reject",
        }
    }

    /// Whether a waiting message with this policy pulls every message before
    /// it into its own turn.
    fn gathers(self) -> bool {
        matches!(self, Self::Merge | Self::Interrupt)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown policy {0:?}: expected queue, merge, interrupt or reject")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        Ok(match s {
            "queue" => Self::Queue,
            "merge" => Self::Merge,
            "interrupt" => Self::Interrupt,
            "reject" => Self::Reject,
            _ => return Err(UnknownPolicy(s.to_owned())),
        })
    }
}

/// A user message stored and waiting for a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub seq: Seq,
    pub policy: Policy,
}

/// Splits the waiting messages (in `seq` order) into the turns that will
/// consume them, in order.
///
/// A `merge` or `interrupt` message takes every message waiting before it
/// into its own turn ("all messages waiting at that moment go together");
/// `queue` messages after the last such message get one turn each. Messages
/// are never reordered and each lands in exactly one turn (I6).
pub fn plan_turns(waiting: &[Waiting]) -> Vec<InputRange> {
    let mut turns = Vec::new();
    let mut rest = waiting;
    while let Some(first) = rest.first() {
        let take = rest
            .iter()
            .rposition(|w| w.policy.gathers())
            .map_or(1, |last| last + 1);
        turns.push(InputRange {
            from: first.seq,
            to: rest[take - 1].seq,
        });
        rest = &rest[take..];
    }
    turns
}

/// The input of the next turn, if anything is waiting.
pub fn next_input(waiting: &[Waiting]) -> Option<InputRange> {
    plan_turns(waiting).into_iter().next()
}

/// What the `201` for a message says happened to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DispositionType {
    Started,
    Queued,
    Merged,
    Interrupting,
}

/// A message's disposition: `started` (with the turn it began), `queued`
/// (with its position: 1 runs next), `merged` (into the next turn), or
/// `interrupting` (with the turn being cancelled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Disposition {
    #[serde(rename = "type")]
    pub kind: DispositionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
}

/// The turn that is starting or running, as the deciding transaction sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveTurn {
    pub id: TurnId,
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Refuse: the session is busy (`409 session_busy`); store nothing.
    Reject { turn_id: TurnId },
    /// Refuse: the queue is at capacity (`429 queue_full`); store nothing.
    QueueFull { capacity: usize },
    /// Store the message. If `start` is set the session was idle and a turn
    /// consuming just this message begins in the same transaction; if
    /// `cancel_active` is set the running turn must be cancelled.
    Accept {
        disposition: Disposition,
        start: bool,
        cancel_active: bool,
    },
}

/// Decides what happens to a new message with `policy`, given the active turn
/// (if any), the messages already waiting (in seq order) and the queue's
/// capacity. `turn_id` is the id to give a turn started now.
///
/// Callers keep "something waits ⇒ a turn is active" (a turn's end starts the
/// next one in the same transaction); a store that finds waiting messages and
/// no active turn starts the next planned turn first, then decides.
pub fn decide(
    active: Option<ActiveTurn>,
    waiting: &[Waiting],
    capacity: usize,
    policy: Policy,
    turn_id: TurnId,
) -> Decision {
    let Some(active) = active else {
        return Decision::Accept {
            disposition: Disposition {
                kind: DispositionType::Started,
                turn_id: Some(turn_id),
                position: None,
            },
            start: true,
            cancel_active: false,
        };
    };
    let disposition = match policy {
        Policy::Reject => return Decision::Reject { turn_id: active.id },
        _ if waiting.len() >= capacity => return Decision::QueueFull { capacity },
        Policy::Queue => {
            let mut all = waiting.to_vec();
            all.push(Waiting {
                seq: Seq::MAX,
                policy,
            });
            Disposition {
                kind: DispositionType::Queued,
                turn_id: None,
                position: Some(plan_turns(&all).len() as u64),
            }
        }
        Policy::Merge => Disposition {
            kind: DispositionType::Merged,
            turn_id: None,
            position: Some(1),
        },
        Policy::Interrupt => Disposition {
            kind: DispositionType::Interrupting,
            turn_id: Some(active.id),
            position: None,
        },
    };
    Decision::Accept {
        disposition,
        start: false,
        cancel_active: policy == Policy::Interrupt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: Seq, policy: Policy) -> Waiting {
        Waiting { seq, policy }
    }

    fn r(from: Seq, to: Seq) -> InputRange {
        InputRange { from, to }
    }

    #[test]
    fn queue_messages_get_one_turn_each() {
        let plan = plan_turns(&[w(3, Policy::Queue), w(5, Policy::Queue)]);
        assert_eq!(plan, vec![r(3, 3), r(5, 5)]);
    }

    #[test]
    fn merge_gathers_everything_before_it() {
        let plan = plan_turns(&[
            w(3, Policy::Queue),
            w(4, Policy::Merge),
            w(6, Policy::Queue),
        ]);
        assert_eq!(plan, vec![r(3, 4), r(6, 6)]);
        let plan = plan_turns(&[w(3, Policy::Merge), w(4, Policy::Interrupt)]);
        assert_eq!(plan, vec![r(3, 4)]);
    }

    #[test]
    fn idle_session_starts_a_turn_whatever_the_policy() {
        let t = TurnId::new();
        for p in [
            Policy::Queue,
            Policy::Merge,
            Policy::Interrupt,
            Policy::Reject,
        ] {
            let d = decide(None, &[], 10, p, t);
            assert!(matches!(
                d,
                Decision::Accept { start: true, disposition: Disposition { kind: DispositionType::Started, turn_id: Some(id), .. }, .. } if id == t
            ));
        }
    }

    #[test]
    fn busy_session_applies_the_policy() {
        let active = Some(ActiveTurn { id: TurnId::new() });
        let t = TurnId::new();
        let waiting = [w(3, Policy::Queue)];
        assert_eq!(
            decide(active, &waiting, 10, Policy::Reject, t),
            Decision::Reject {
                turn_id: active.map(|a| a.id).unwrap_or_default()
            }
        );
        let Decision::Accept { disposition, .. } = decide(active, &waiting, 10, Policy::Queue, t)
        else {
            panic!("queue accepts");
        };
        assert_eq!(disposition.position, Some(2));
        let Decision::Accept { cancel_active, .. } =
            decide(active, &waiting, 10, Policy::Interrupt, t)
        else {
            panic!("interrupt accepts");
        };
        assert!(cancel_active);
        assert_eq!(
            decide(active, &waiting, 1, Policy::Queue, t),
            Decision::QueueFull { capacity: 1 }
        );
    }
}
