//! The lifecycle of one turn, sans I/O: events in, actions out.
//!
//! The engine's session actor feeds every event (the store marked the turn
//! running, agent output, cancel requests, timers, lease loss) into a
//! [`TurnMachine`] and performs exactly the returned [`Action`]s. The machine
//! guarantees, whatever the interleaving:
//! - the prompt is sent at most once, and never after a cancel that arrived
//!   while the turn was still `starting` (a cancelled turn never runs);
//! - exactly one [`Action::End`] or [`Action::Abandon`] (I7), after which
//!   every event is dropped, so nothing of the turn is stored or streamed
//!   after its terminal entry (I8);
//! - a cancel is idempotent and wins over a late completion (ended is
//!   absorbing);
//! - tool calls still open at the end get a synthetic result carrying the
//!   turn's status and reason, in the transaction of its `turn_ended`, so the
//!   transcript replays validly to a model;
//! - output is stored in the order the agent produced it: deltas are the
//!   agent's text, and each run of text between two other outputs (a tool
//!   call, a result, a note) is stored as one assistant message, before the
//!   output that ended it. A trailing run is stored only when the turn
//!   completes (a cancelled or failed turn's half-sentence is not a reply);
//!   thought chunks form runs the same way, stored as `thought` entries (a
//!   trailing one whatever the end), never streamed as deltas;
//! - no stored message, tool result or run of text exceeds the output cap:
//!   past it the turn is cancelled, drained and ended `failed`, and nothing
//!   partial is stored;
//! - steered input is offered to the agent only while the turn runs (not
//!   before its prompt, not once a cancel is under way), and what the agent
//!   says it took is recorded as the turn's input until the turn ends, never
//!   after (whatever it did not take is the next turn's).
//!
//! Events after the end are dropped here ([`crate::late::LateReason::TurnEnded`]).

use crate::{NewEntry, PermissionInfo, Seq, ToolInfo, TurnId, TurnStatus};

/// What the agent produced that is stored (deltas are not).
#[derive(Clone, Debug, PartialEq)]
pub enum AgentOutput {
    Message(String),
    /// A note for the transcript (a plan), stored as a `system` message of
    /// the turn.
    System(String),
    ToolCall(ToolInfo),
    ToolResult {
        id: String,
        content: String,
    },
    /// The agent asked permission (stored as `permission_request`).
    PermissionRequest(PermissionInfo),
    /// A permission request was answered (stored as `permission_decision`).
    PermissionDecision(PermissionInfo),
}

/// Why the agent says it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Completed,
    Cancelled,
    Failed(String),
}

/// An input to the machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The store moved the turn `starting → running`: the prompt may go out.
    Started,
    /// Someone asked to end the turn (user cancel, interrupt, shutdown,
    /// delete). `reason` is recorded on the terminal entry.
    CancelRequested { reason: String },
    /// A transient chunk of output.
    AgentDelta(String),
    /// A chunk of the agent's reasoning: stored (a run of them as one
    /// `thought` entry), never streamed as a delta.
    AgentThought(String),
    /// Output to store.
    AgentOutput(AgentOutput),
    /// The agent finished the prompt.
    AgentStopped(StopReason),
    /// The turn's time budget ran out.
    TurnDeadline,
    /// The agent did not stop within the drain deadline after a cancel.
    DrainDeadline,
    /// The lease could not be renewed: another worker may own the session.
    LeaseLost,
    /// The turn cannot go on (its output could not be stored, …): it is
    /// cancelled, drained and ended `failed` with `reason`.
    Failure { reason: String },
    /// Steered messages wait for this turn.
    InputWaiting,
    /// The agent took the waiting messages up to this seq mid-turn.
    AgentTookInput(Seq),
}

/// An effect for the engine to perform, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send the turn's input to the agent.
    SendPrompt,
    /// Arm the turn-timeout timer.
    ArmTurnDeadline,
    /// Ask the agent to stop.
    SendCancel,
    /// Arm the drain-deadline timer.
    ArmDrainDeadline,
    /// Stream a delta to subscribers (never stored, I9).
    PublishDelta(String),
    /// Store an entry of this turn (boxed: entries are large, other
    /// actions small).
    Append(Box<NewEntry>),
    /// Kill the agent's work on this turn without waiting.
    ForceStop,
    /// Store `entries` (synthetic tool results, then the single `turn_ended`)
    /// and end the turn with `status`.
    End {
        status: TurnStatus,
        reason: Option<String>,
        entries: Vec<NewEntry>,
    },
    /// Stop without writing: the lease is gone, so the new owner records the
    /// end (`lost`).
    Abandon,
    /// Hand the steered messages waiting to the agent.
    OfferInput,
    /// Record that this turn consumed the waiting messages up to this seq.
    TakeInput(Seq),
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Starting {
        pending: Option<(TurnStatus, String)>,
    },
    Running,
    Draining {
        status: TurnStatus,
        reason: String,
    },
    Ended,
}

/// The default cap on one stored message, tool result or run of text.
pub const DEFAULT_MAX_OUTPUT: usize = 1 << 20;

/// One turn's state.
#[derive(Clone, Debug)]
pub struct TurnMachine {
    turn: TurnId,
    state: State,
    open_tools: Vec<String>,
    /// The run of text (or of thought) since the last other output.
    run: String,
    /// Whether `run` is thought rather than text.
    thinking: bool,
    /// How many assistant messages this turn has asked to store (runs of
    /// text and whole messages): the current run of text, once stored, is
    /// message number `messages + 1`. Deltas carry that number, so a reader
    /// that has seen the turn's first `messages` assistant messages knows
    /// which deltas are already part of them.
    messages: u32,
    max_output: usize,
    /// Output passed the cap: nothing more of it is streamed or stored.
    overflowed: bool,
    /// Steered input was announced before the prompt went out: it is
    /// offered right after the prompt.
    input_waiting: bool,
}

impl TurnMachine {
    /// A turn in `starting`, with the default output cap.
    pub fn new(turn: TurnId) -> Self {
        Self::with_max_output(turn, DEFAULT_MAX_OUTPUT)
    }

    /// A turn in `starting` whose stored outputs are at most `max_output`
    /// bytes each.
    pub fn with_max_output(turn: TurnId, max_output: usize) -> Self {
        Self {
            turn,
            state: State::Starting { pending: None },
            open_tools: Vec::new(),
            run: String::new(),
            thinking: false,
            messages: 0,
            max_output,
            overflowed: false,
            input_waiting: false,
        }
    }

    /// Whether the machine has ended or abandoned the turn.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// The run of text being streamed, if any: its number among the turn's
    /// assistant messages (from 1) and its text so far. A delta just
    /// published is the end of this text.
    pub fn text_run(&self) -> Option<(u32, &str)> {
        (!self.thinking && !self.run.is_empty()).then(|| (self.messages + 1, self.run.as_str()))
    }

    /// Whether a cancel is under way (the agent was told to stop).
    pub fn is_draining(&self) -> bool {
        matches!(self.state, State::Draining { .. })
    }

    /// Feeds one event; returns the actions to perform, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match (&mut self.state, event) {
            (State::Ended, _) => Vec::new(),
            (_, Event::LeaseLost) => {
                self.state = State::Ended;
                vec![Action::ForceStop, Action::Abandon]
            }
            (State::Starting { pending }, Event::Started) => match pending.take() {
                Some((status, reason)) => self.end(status, Some(reason)),
                None => {
                    self.state = State::Running;
                    let mut actions = vec![Action::SendPrompt, Action::ArmTurnDeadline];
                    if std::mem::take(&mut self.input_waiting) {
                        actions.push(Action::OfferInput);
                    }
                    actions
                }
            },
            (State::Starting { .. }, Event::InputWaiting) => {
                self.input_waiting = true;
                Vec::new()
            }
            (State::Starting { pending }, Event::CancelRequested { reason }) => {
                pending.get_or_insert((TurnStatus::Cancelled, reason));
                Vec::new()
            }
            (State::Starting { pending }, Event::Failure { reason }) => {
                pending.get_or_insert((TurnStatus::Failed, reason));
                Vec::new()
            }
            // Nothing reaches an agent before the prompt; anything else that
            // arrives in `starting` is stale and dropped.
            (State::Starting { .. }, _) => Vec::new(),
            (State::Running, Event::CancelRequested { reason }) => {
                self.drain(TurnStatus::Cancelled, reason)
            }
            (State::Running, Event::InputWaiting) => vec![Action::OfferInput],
            // The agent saw the input before it stopped: it is this turn's,
            // even while a cancel drains it.
            (State::Running | State::Draining { .. }, Event::AgentTookInput(seq)) => {
                vec![Action::TakeInput(seq)]
            }
            (State::Running, Event::TurnDeadline) => {
                self.drain(TurnStatus::TimedOut, "turn timed out".to_owned())
            }
            (State::Running, Event::Failure { reason }) => self.drain(TurnStatus::Failed, reason),
            (State::Running | State::Draining { .. }, Event::AgentDelta(text)) => {
                if self.overflowed {
                    return Vec::new();
                }
                // A change of kind ends the run before it.
                let mut actions = if self.thinking {
                    self.flush()
                } else {
                    Vec::new()
                };
                if self.run.len() + text.len() > self.max_output {
                    actions.extend(self.overflow());
                    return actions;
                }
                self.run.push_str(&text);
                actions.push(Action::PublishDelta(text));
                actions
            }
            (State::Running | State::Draining { .. }, Event::AgentThought(text)) => {
                if self.overflowed {
                    return Vec::new();
                }
                let mut actions = if self.thinking {
                    Vec::new()
                } else {
                    self.flush()
                };
                if self.run.len() + text.len() > self.max_output {
                    actions.extend(self.overflow());
                    return actions;
                }
                self.thinking = true;
                self.run.push_str(&text);
                actions
            }
            (State::Running | State::Draining { .. }, Event::AgentOutput(out)) => {
                if self.overflowed {
                    return Vec::new();
                }
                if output_len(&out) > self.max_output {
                    return self.overflow();
                }
                let mut actions = self.flush();
                actions.push(Action::Append(Box::new(self.record(out))));
                actions
            }
            (State::Running, Event::AgentStopped(stop)) => match stop {
                StopReason::Completed => {
                    let mut actions = self.flush();
                    actions.extend(self.end(TurnStatus::Completed, None));
                    actions
                }
                // An agent that cancels on its own (no cancel was asked for).
                StopReason::Cancelled => self.end(
                    TurnStatus::Cancelled,
                    Some("agent cancelled the turn".into()),
                ),
                StopReason::Failed(why) => self.end(TurnStatus::Failed, Some(why)),
            },
            (State::Draining { status, reason }, Event::AgentStopped(_)) => {
                // The cancel wins over whatever the agent says it did.
                let (status, reason) = (*status, std::mem::take(reason));
                self.end(status, Some(reason))
            }
            (State::Draining { status, reason }, Event::DrainDeadline) => {
                let (status, reason) = (*status, std::mem::take(reason));
                let mut actions = vec![Action::ForceStop];
                actions.extend(self.end(
                    status,
                    Some(format!(
                        "{reason}; forced: the agent did not stop within the drain deadline"
                    )),
                ));
                actions
            }
            // Idempotent cancel; stale timers; a second `Started`.
            (State::Running | State::Draining { .. }, _) => Vec::new(),
        }
    }

    fn drain(&mut self, status: TurnStatus, reason: String) -> Vec<Action> {
        self.state = State::Draining { status, reason };
        vec![Action::SendCancel, Action::ArmDrainDeadline]
    }

    /// Output past the cap: nothing of it is stored, the turn stops `failed`.
    fn overflow(&mut self) -> Vec<Action> {
        self.run.clear();
        self.thinking = false;
        self.overflowed = true;
        match self.state {
            State::Running => self.drain(
                TurnStatus::Failed,
                format!(
                    "the agent's output exceeded the limit of {} bytes per message",
                    self.max_output
                ),
            ),
            _ => Vec::new(),
        }
    }

    /// The run of text so far, as a message to store before what ends it.
    fn flush(&mut self) -> Vec<Action> {
        if self.run.is_empty() {
            return Vec::new();
        }
        let text = std::mem::take(&mut self.run);
        let entry = if std::mem::take(&mut self.thinking) {
            NewEntry::thought(self.turn, text)
        } else {
            self.messages += 1;
            NewEntry::assistant_message(self.turn, text)
        };
        vec![Action::Append(Box::new(entry))]
    }

    fn record(&mut self, out: AgentOutput) -> NewEntry {
        match out {
            AgentOutput::Message(text) => {
                self.messages += 1;
                NewEntry::assistant_message(self.turn, text)
            }
            AgentOutput::System(text) => NewEntry::system_message(self.turn, text),
            AgentOutput::ToolCall(tool) => {
                self.open_tools.push(tool.id.clone());
                NewEntry::tool_call(self.turn, tool)
            }
            AgentOutput::ToolResult { id, content } => {
                self.open_tools.retain(|open| *open != id);
                NewEntry::tool_result(self.turn, id, content)
            }
            AgentOutput::PermissionRequest(p) => NewEntry::permission_request(self.turn, p),
            AgentOutput::PermissionDecision(p) => NewEntry::permission_decision(self.turn, p),
        }
    }

    fn end(&mut self, status: TurnStatus, reason: Option<String>) -> Vec<Action> {
        self.state = State::Ended;
        // A trailing run of thought is kept whatever the end (it is what the
        // agent did); a trailing run of text only when the turn completes
        // (flushed before this), as a half-sentence is not a reply.
        let mut entries: Vec<NewEntry> = Vec::new();
        if self.thinking && !self.run.is_empty() {
            entries.push(NewEntry::thought(self.turn, std::mem::take(&mut self.run)));
        }
        self.run.clear();
        self.thinking = false;
        entries.extend(
            std::mem::take(&mut self.open_tools)
                .into_iter()
                .map(|id| NewEntry::tool_closed(self.turn, id, status, reason.as_deref())),
        );
        entries.push(NewEntry::turn_ended(self.turn, status, reason.clone()));
        vec![Action::End {
            status,
            reason,
            entries,
        }]
    }
}

/// The stored size of an output.
fn output_len(out: &AgentOutput) -> usize {
    match out {
        AgentOutput::Message(t) | AgentOutput::System(t) => t.len(),
        AgentOutput::ToolResult { content, .. } => content.len(),
        AgentOutput::PermissionRequest(p) | AgentOutput::PermissionDecision(p) => {
            serde_json::to_string(p).map_or(0, |s| s.len())
        }
        AgentOutput::ToolCall(tool) => {
            tool.id.len()
                + tool.name.as_ref().map_or(0, String::len)
                + tool.arguments.as_ref().map_or(0, |a| a.to_string().len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EntryType as EntryKind;
    use proptest::prelude::*;

    fn ends(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::End { .. } | Action::Abandon))
            .count()
    }

    #[test]
    fn cancel_while_starting_means_the_turn_never_runs() {
        let mut m = TurnMachine::new(TurnId::new());
        assert!(m
            .handle(Event::CancelRequested {
                reason: "user".into()
            })
            .is_empty());
        let actions = m.handle(Event::Started);
        assert!(!actions.contains(&Action::SendPrompt));
        assert!(matches!(
            actions.as_slice(),
            [Action::End {
                status: TurnStatus::Cancelled,
                ..
            }]
        ));
    }

    #[test]
    fn cancel_wins_over_a_late_completion() {
        let mut m = TurnMachine::new(TurnId::new());
        m.handle(Event::Started);
        assert_eq!(
            m.handle(Event::CancelRequested {
                reason: "user".into()
            }),
            vec![Action::SendCancel, Action::ArmDrainDeadline]
        );
        assert!(m
            .handle(Event::CancelRequested {
                reason: "again".into()
            })
            .is_empty());
        let actions = m.handle(Event::AgentStopped(StopReason::Completed));
        assert!(matches!(
            actions.as_slice(),
            [Action::End { status: TurnStatus::Cancelled, reason: Some(r), .. }] if r == "user"
        ));
        assert!(m.handle(Event::AgentDelta("late".into())).is_empty());
        assert!(m.handle(Event::DrainDeadline).is_empty());
    }

    #[test]
    fn a_stubborn_agent_is_forced_at_the_drain_deadline() {
        let mut m = TurnMachine::new(TurnId::new());
        m.handle(Event::Started);
        m.handle(Event::CancelRequested {
            reason: "user".into(),
        });
        let actions = m.handle(Event::DrainDeadline);
        assert_eq!(actions.first(), Some(&Action::ForceStop));
        assert!(matches!(
            actions.get(1),
            Some(Action::End { status: TurnStatus::Cancelled, reason: Some(r), .. }) if r.contains("forced")
        ));
    }

    #[test]
    fn open_tool_calls_get_synthetic_results() {
        let t = TurnId::new();
        let mut m = TurnMachine::new(t);
        m.handle(Event::Started);
        for id in ["a", "b"] {
            m.handle(Event::AgentOutput(AgentOutput::ToolCall(ToolInfo {
                id: id.into(),
                name: Some("grep".into()),
                arguments: None,
            })));
        }
        m.handle(Event::AgentOutput(AgentOutput::ToolResult {
            id: "a".into(),
            content: "ok".into(),
        }));
        let actions = m.handle(Event::AgentStopped(StopReason::Failed("boom".into())));
        let [Action::End { entries, .. }] = actions.as_slice() else {
            panic!("one end: {actions:?}");
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].tool.as_ref().map(|t| t.id.as_str()), Some("b"));
        assert_eq!(
            entries[1],
            NewEntry::turn_ended(t, TurnStatus::Failed, Some("boom".into()))
        );
    }

    fn appended(actions: &[Action]) -> Vec<NewEntry> {
        actions
            .iter()
            .flat_map(|a| match a {
                Action::Append(e) => vec![(**e).clone()],
                Action::End { entries, .. } => entries.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// A run of text is numbered by the assistant message it becomes: a
    /// whole message or an earlier run counts, a thought does not.
    #[test]
    fn a_run_of_text_is_numbered_by_the_assistant_message_it_becomes() {
        let t = TurnId::new();
        let mut m = TurnMachine::new(t);
        m.handle(Event::Started);
        assert_eq!(m.text_run(), None);
        m.handle(Event::AgentThought("hmm".into()));
        assert_eq!(m.text_run(), None, "a thought is not text");
        m.handle(Event::AgentDelta("Let me ".into()));
        m.handle(Event::AgentDelta("look.".into()));
        assert_eq!(m.text_run(), Some((1, "Let me look.")));
        m.handle(Event::AgentOutput(AgentOutput::ToolCall(ToolInfo {
            id: "c1".into(),
            name: None,
            arguments: None,
        })));
        assert_eq!(m.text_run(), None, "the run was stored as message 1");
        m.handle(Event::AgentOutput(AgentOutput::Message("whole".into())));
        m.handle(Event::AgentDelta("Found".into()));
        assert_eq!(m.text_run(), Some((3, "Found")));
    }

    #[test]
    fn text_runs_are_stored_in_order_around_tool_calls() {
        let t = TurnId::new();
        let mut m = TurnMachine::new(t);
        let mut stored = appended(&m.handle(Event::Started));
        let script = [
            Event::AgentDelta("Let me ".into()),
            Event::AgentDelta("look.".into()),
            Event::AgentOutput(AgentOutput::ToolCall(ToolInfo {
                id: "c1".into(),
                name: Some("grep".into()),
                arguments: None,
            })),
            Event::AgentOutput(AgentOutput::ToolResult {
                id: "c1".into(),
                content: "3 matches".into(),
            }),
            Event::AgentDelta("Found them.".into()),
            Event::AgentStopped(StopReason::Completed),
        ];
        for e in script {
            stored.extend(appended(&m.handle(e)));
        }
        let shape: Vec<(EntryKind, String)> = stored
            .iter()
            .map(|e| {
                (
                    e.kind,
                    e.content
                        .clone()
                        .or_else(|| e.tool.as_ref().map(|t| t.id.clone()))
                        .unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (EntryKind::Message, "Let me look.".to_owned()),
                (EntryKind::ToolCall, "c1".to_owned()),
                (EntryKind::ToolResult, "3 matches".to_owned()),
                (EntryKind::Message, "Found them.".to_owned()),
                (EntryKind::TurnEnded, String::new()),
            ]
        );
    }

    #[test]
    fn thoughts_are_runs_of_their_own_and_a_trailing_one_is_kept() {
        let t = TurnId::new();
        let mut m = TurnMachine::new(t);
        m.handle(Event::Started);
        let mut stored = Vec::new();
        let mut published = Vec::new();
        for e in [
            Event::AgentThought("hm, ".into()),
            Event::AgentThought("grep it".into()),
            Event::AgentDelta("Looking.".into()),
            Event::AgentThought("found?".into()),
            Event::AgentOutput(AgentOutput::ToolCall(ToolInfo {
                id: "c".into(),
                name: None,
                arguments: None,
            })),
            Event::AgentThought("waiting".into()),
            Event::CancelRequested {
                reason: "user".into(),
            },
            Event::AgentStopped(StopReason::Cancelled),
        ] {
            let actions = m.handle(e);
            published.extend(actions.iter().filter_map(|a| match a {
                Action::PublishDelta(d) => Some(d.clone()),
                _ => None,
            }));
            stored.extend(appended(&actions));
        }
        assert_eq!(published, ["Looking."], "thoughts are not deltas");
        let shape: Vec<(EntryKind, Option<&str>)> = stored
            .iter()
            .map(|e| (e.kind, e.content.as_deref()))
            .collect();
        assert_eq!(
            shape,
            [
                (EntryKind::Thought, Some("hm, grep it")),
                (EntryKind::Message, Some("Looking.")),
                (EntryKind::Thought, Some("found?")),
                (EntryKind::ToolCall, None),
                (EntryKind::Thought, Some("waiting")),
                (
                    EntryKind::ToolResult,
                    Some("tool call not completed: the turn ended cancelled (user)")
                ),
                (EntryKind::TurnEnded, None),
            ]
        );
        let closed = &stored[5];
        assert_eq!(
            (closed.status, closed.reason.as_deref()),
            (Some(TurnStatus::Cancelled), Some("user")),
            "the closing result carries the turn's status and reason"
        );
    }

    #[test]
    fn a_cancelled_turns_trailing_text_is_not_stored() {
        let mut m = TurnMachine::new(TurnId::new());
        m.handle(Event::Started);
        m.handle(Event::AgentDelta("half a sen".into()));
        m.handle(Event::CancelRequested {
            reason: "user".into(),
        });
        let stored = appended(&m.handle(Event::AgentStopped(StopReason::Cancelled)));
        assert_eq!(
            stored.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [EntryKind::TurnEnded]
        );
    }

    #[test]
    fn output_past_the_cap_fails_the_turn_and_stores_nothing_of_it() {
        let mut m = TurnMachine::with_max_output(TurnId::new(), 10);
        m.handle(Event::Started);
        assert_eq!(
            m.handle(Event::AgentDelta("0123456".into())),
            vec![Action::PublishDelta("0123456".into())]
        );
        assert_eq!(
            m.handle(Event::AgentDelta("789ab".into())),
            vec![Action::SendCancel, Action::ArmDrainDeadline],
            "the run would pass the cap: cancel, drain"
        );
        assert!(m.handle(Event::AgentDelta("more".into())).is_empty());
        let actions = m.handle(Event::AgentStopped(StopReason::Completed));
        let stored = appended(&actions);
        assert_eq!(stored.len(), 1, "only turn_ended: {stored:?}");
        assert_eq!(stored[0].status, Some(TurnStatus::Failed));
        assert!(stored[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("exceeded the limit of 10 bytes")));
        let mut m = TurnMachine::with_max_output(TurnId::new(), 10);
        m.handle(Event::Started);
        assert_eq!(
            m.handle(Event::AgentOutput(AgentOutput::ToolResult {
                id: "x".into(),
                content: "far too long a result".into(),
            })),
            vec![Action::SendCancel, Action::ArmDrainDeadline]
        );
    }

    #[test]
    fn a_failure_drains_then_ends_failed() {
        let mut m = TurnMachine::new(TurnId::new());
        m.handle(Event::Started);
        assert_eq!(
            m.handle(Event::Failure {
                reason: "store refused".into()
            }),
            vec![Action::SendCancel, Action::ArmDrainDeadline]
        );
        let actions = m.handle(Event::DrainDeadline);
        assert_eq!(actions.first(), Some(&Action::ForceStop));
        assert!(matches!(
            actions.get(1),
            Some(Action::End { status: TurnStatus::Failed, reason: Some(r), .. }) if r.starts_with("store refused")
        ));
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Started),
            Just(Event::CancelRequested {
                reason: "user".into()
            }),
            Just(Event::AgentDelta("tok".into())),
            Just(Event::AgentThought("hm".into())),
            Just(Event::AgentOutput(AgentOutput::Message("hi".into()))),
            Just(Event::AgentOutput(AgentOutput::ToolCall(ToolInfo {
                id: "t".into(),
                name: None,
                arguments: None
            }))),
            Just(Event::AgentStopped(StopReason::Completed)),
            Just(Event::AgentStopped(StopReason::Cancelled)),
            Just(Event::AgentStopped(StopReason::Failed("x".into()))),
            Just(Event::TurnDeadline),
            Just(Event::DrainDeadline),
            Just(Event::LeaseLost),
            Just(Event::Failure {
                reason: "store".into()
            }),
            Just(Event::InputWaiting),
            Just(Event::AgentTookInput(7)),
        ]
    }

    #[test]
    fn steered_input_is_offered_only_while_running_and_taken_until_the_end() {
        let mut m = TurnMachine::new(TurnId::new());
        assert!(
            m.handle(Event::InputWaiting).is_empty(),
            "no prompt yet: nothing to hand input to"
        );
        assert_eq!(
            m.handle(Event::Started),
            vec![
                Action::SendPrompt,
                Action::ArmTurnDeadline,
                Action::OfferInput
            ],
            "input announced while starting is offered once the prompt is out"
        );
        assert_eq!(m.handle(Event::InputWaiting), vec![Action::OfferInput]);
        assert_eq!(
            m.handle(Event::AgentTookInput(5)),
            vec![Action::TakeInput(5)]
        );
        m.handle(Event::CancelRequested {
            reason: "user".into(),
        });
        assert!(
            m.handle(Event::InputWaiting).is_empty(),
            "a turn being cancelled is not handed more input"
        );
        assert_eq!(
            m.handle(Event::AgentTookInput(6)),
            vec![Action::TakeInput(6)],
            "input the agent took before it stopped is the turn's"
        );
        m.handle(Event::AgentStopped(StopReason::Cancelled));
        assert!(
            m.handle(Event::AgentTookInput(8)).is_empty(),
            "after the end, input is the next turn's"
        );
    }

    proptest! {
        #[test]
        fn every_turn_ends_once_and_nothing_follows(events in proptest::collection::vec(event(), 0..40)) {
            let mut m = TurnMachine::new(TurnId::new());
            let mut ended = 0;
            let mut prompts = 0;
            let mut cancelled_before_start = false;
            for e in events.into_iter().chain([
                // Whatever happened, a cancel followed by the drain deadline
                // must bring the turn to its end.
                Event::Started,
                Event::CancelRequested { reason: "finish".into() },
                Event::DrainDeadline,
            ]) {
                let was_starting = matches!(m.state, State::Starting { .. });
                let was_running = m.state == State::Running;
                if was_starting && matches!(e, Event::CancelRequested { .. }) {
                    cancelled_before_start = true;
                }
                let actions = m.handle(e);
                if ended > 0 {
                    prop_assert!(actions.is_empty(), "actions after the end: {actions:?}");
                }
                prompts += actions.iter().filter(|a| **a == Action::SendPrompt).count();
                if actions.contains(&Action::OfferInput) {
                    prop_assert!(
                        was_running || (was_starting && actions.contains(&Action::SendPrompt)),
                        "input offered outside a running turn"
                    );
                }
                ended += ends(&actions);
            }
            prop_assert_eq!(ended, 1);
            prop_assert!(prompts <= 1);
            if cancelled_before_start {
                prop_assert_eq!(prompts, 0);
            }
        }
    }
}
