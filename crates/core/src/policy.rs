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

/// What a store keeps about a session's waiting messages so that deciding
/// on a new message, and starting the next turn, never reads the queue: it
/// is `plan_turns` folded into three numbers, updated as messages arrive and
/// turns consume them. Property tests check it against [`plan_turns`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSummary {
    /// Messages waiting for a turn.
    pub waiting: u64,
    /// The last waiting `merge` or `interrupt` message: the next turn takes
    /// everything up to it.
    pub last_gather: Option<Seq>,
    /// Waiting messages after `last_gather` (all of them if there is none);
    /// each runs in its own turn.
    pub after_gather: u64,
}

/// How far the next turn reaches into the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextTurn {
    /// Just the first waiting message.
    First,
    /// Every waiting message up to and including this seq.
    UpTo(Seq),
}

impl QueueSummary {
    /// A message with `policy` was stored at `seq` and waits.
    pub fn push(&mut self, seq: Seq, policy: Policy) {
        self.waiting += 1;
        if policy.gathers() {
            self.last_gather = Some(seq);
            self.after_gather = 0;
        } else {
            self.after_gather += 1;
        }
    }

    /// How many turns the waiting messages will take (`plan_turns(..).len()`).
    pub fn planned_turns(&self) -> u64 {
        u64::from(self.last_gather.is_some()) + self.after_gather
    }

    /// The next turn's reach, if anything waits.
    pub fn next(&self) -> Option<NextTurn> {
        match (self.waiting, self.last_gather) {
            (0, _) => None,
            (_, Some(to)) => Some(NextTurn::UpTo(to)),
            (_, None) => Some(NextTurn::First),
        }
    }

    /// The next turn took its messages.
    pub fn consume(&mut self, next: NextTurn) {
        match next {
            NextTurn::First => {
                self.waiting = self.waiting.saturating_sub(1);
                self.after_gather = self.after_gather.saturating_sub(1);
            }
            NextTurn::UpTo(_) => {
                self.waiting = self.after_gather;
                self.last_gather = None;
            }
        }
    }
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
    QueueFull { capacity: u64 },
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
/// (if any), a summary of the messages already waiting and the queue's
/// capacity. `turn_id` is the id to give a turn started now.
///
/// Callers keep "something waits ⇒ a turn is active" (a turn's end starts the
/// next one in the same transaction); a store that finds waiting messages and
/// no active turn starts the next planned turn first, then decides.
pub fn decide(
    active: Option<ActiveTurn>,
    queue: &QueueSummary,
    capacity: u64,
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
        _ if queue.waiting >= capacity => return Decision::QueueFull { capacity },
        Policy::Queue => Disposition {
            kind: DispositionType::Queued,
            turn_id: None,
            position: Some(queue.planned_turns() + 1),
        },
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

    fn policy() -> impl proptest::strategy::Strategy<Value = Policy> {
        proptest::prop_oneof![
            proptest::strategy::Just(Policy::Queue),
            proptest::strategy::Just(Policy::Merge),
            proptest::strategy::Just(Policy::Interrupt),
        ]
    }

    proptest::proptest! {
        /// The summary the stores keep answers exactly what `plan_turns`
        /// over the full queue answers, through arrivals and consumption.
        #[test]
        fn summary_agrees_with_plan_turns(steps in proptest::collection::vec(proptest::option::of(policy()), 0..60)) {
            let mut queue: Vec<Waiting> = Vec::new();
            let mut q = QueueSummary::default();
            let mut seq = 0;
            for step in steps {
                match step {
                    Some(p) => {
                        seq += 1;
                        queue.push(w(seq, p));
                        q.push(seq, p);
                    }
                    None => {
                        let expected = next_input(&queue);
                        let got = q.next();
                        match (expected, got) {
                            (None, None) => {}
                            (Some(r), Some(NextTurn::First)) => {
                                proptest::prop_assert_eq!(r.from, r.to);
                                proptest::prop_assert_eq!(r.from, queue[0].seq);
                            }
                            (Some(r), Some(NextTurn::UpTo(to))) => proptest::prop_assert_eq!(r.to, to),
                            (e, g) => proptest::prop_assert!(false, "plan {:?} vs summary {:?}", e, g),
                        }
                        if let Some(n) = got {
                            q.consume(n);
                        }
                        if let Some(r) = expected {
                            queue.retain(|m| m.seq > r.to);
                        }
                    }
                }
                proptest::prop_assert_eq!(q.waiting, queue.len() as u64);
                proptest::prop_assert_eq!(q.planned_turns(), plan_turns(&queue).len() as u64);
            }
        }
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
            let d = decide(None, &QueueSummary::default(), 10, p, t);
            assert!(matches!(
                d,
                Decision::Accept { start: true, disposition: Disposition { kind: DispositionType::Started, turn_id: Some(id), .. }, .. } if id == t
            ));
        }
    }

    fn summary(waiting: &[Waiting]) -> QueueSummary {
        let mut q = QueueSummary::default();
        for w in waiting {
            q.push(w.seq, w.policy);
        }
        q
    }

    #[test]
    fn busy_session_applies_the_policy() {
        let active = Some(ActiveTurn { id: TurnId::new() });
        let t = TurnId::new();
        let waiting = summary(&[w(3, Policy::Queue)]);
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
