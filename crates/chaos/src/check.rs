//! The checker: a pure function from a [`History`] to the [`Violations`] it
//! holds, one counter per way the contract (DESIGN.md, I1–I9) can break.
//!
//! - **Acknowledged messages (I2, I3):** every message that got a `2xx` is in
//!   the log exactly once, at the seq it was acknowledged with; every retry
//!   of its key answered that same seq.
//! - **Order (I1):** the log's seqs are 1, 2, 3 … with no gap or repeat.
//! - **Consumption (I6):** the user messages, in seq order, are consumed by
//!   the turns, in turn order, each exactly once: a turn's input starts at
//!   the first message no earlier turn took. A turn with several messages
//!   ends its input at a message whose policy gathers (`merge`, `interrupt`,
//!   `steer`); a `queue` message runs alone.
//! - **Turns (I4, I7, I8, I5):** turns never overlap, neither by their
//!   entries' seqs (each turn's entries lie between its `turn_started` and
//!   its `turn_ended`, and the next turn starts after) nor by their recorded
//!   times; each ends exactly once; nothing of a turn after its end; its
//!   first input precedes its start and it takes no input after its end.
//! - **Dispositions:** a `started` message is its turn's first input; a
//!   `steered` one is in its turn's input, or in the next turn's when the
//!   turn ended before taking it; an `interrupting` one is in the input of
//!   the turn after the one it cancelled.
//! - **Streams (I9, I8):** each connection received exactly the stored log
//!   from its cursor, and no delta of a turn whose end it had passed.
//! - **Isolation (I10):** every probe of another owner's session, or of a
//!   deleted one, was answered `404`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::history::{History, LogEntry, Range, SessionHistory, StreamEvent};

/// Counters of broken guarantees; all zero for a correct history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violations {
    /// Acknowledged messages absent from the log (or sessions that vanished).
    pub lost: u64,
    /// Extra copies of a message in the log, and retries of one key that
    /// were answered with different seqs.
    pub duplicated: u64,
    /// Acknowledged messages found at another seq than acknowledged.
    pub reordered: u64,
    /// Seqs missing from or repeated in a log.
    pub seq_gaps: u64,
    /// Messages skipped, consumed twice, out of FIFO order, or grouped into
    /// a turn against their policy.
    pub fifo: u64,
    /// Turns whose entries' seq ranges overlap another turn's.
    pub overlapping_turns: u64,
    /// Turns whose recorded times overlap the previous turn's.
    pub overlapping_turn_times: u64,
    /// Turns with no terminal entry (in a quiesced session).
    pub turns_without_end: u64,
    /// Turns with more than one terminal entry.
    pub turns_ended_twice: u64,
    /// Entries of a turn stored after its end, or before its start.
    pub leaked_entries: u64,
    /// Turns whose first input does not precede them, or that took input
    /// after they ended.
    pub causality: u64,
    /// Dispositions the runtime did not carry out.
    pub dispositions: u64,
    /// Entries a stream reader should have received but skipped.
    pub stream_gaps: u64,
    /// Entries a stream reader received twice.
    pub stream_duplicates: u64,
    /// Streamed entries that differ from the stored ones, or are not stored.
    pub stream_mismatches: u64,
    /// Deltas streamed for a turn after its end.
    pub leaked_deltas: u64,
    /// Another owner's (or a deleted) session answered other than `404`.
    pub isolation: u64,
}

impl Violations {
    /// The total; zero when every guarantee held.
    pub fn total(&self) -> u64 {
        self.lost
            + self.duplicated
            + self.reordered
            + self.seq_gaps
            + self.fifo
            + self.overlapping_turns
            + self.overlapping_turn_times
            + self.turns_without_end
            + self.turns_ended_twice
            + self.leaked_entries
            + self.causality
            + self.dispositions
            + self.stream_gaps
            + self.stream_duplicates
            + self.stream_mismatches
            + self.leaked_deltas
            + self.isolation
    }
}

/// The verdict: the counters and a description of each violation found
/// (at most [`Report::MAX_DETAILS`] of them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub violations: Violations,
    pub details: Vec<String>,
}

impl Report {
    pub const MAX_DETAILS: usize = 100;

    fn flag(&mut self, session: &str, what: String) {
        if self.details.len() < Self::MAX_DETAILS {
            self.details.push(format!("session {session}: {what}"));
        }
    }
}

/// Checks a whole history.
pub fn check(history: &History) -> Report {
    let mut report = Report::default();
    for s in &history.sessions {
        if !s.deleted {
            check_session(s, &mut report);
        }
    }
    for p in &history.probes {
        if p.got != p.expected {
            report.violations.isolation += 1;
            report.flag(
                "-",
                format!("{}: {} where {} was due", p.what, p.got, p.expected),
            );
        }
    }
    report
}

/// What the log says about one turn.
#[derive(Default)]
struct LoggedTurn {
    started: Option<u64>,
    input: Option<Range>,
    ends: Vec<u64>,
}

fn check_session(s: &SessionHistory, r: &mut Report) {
    let id = s.id.as_str();
    let v = &mut r.violations;
    let mut details: Vec<String> = Vec::new();

    // I1: seqs 1..=n, in order, once each.
    let mut expected = 1u64;
    for e in &s.log {
        if e.seq != expected {
            v.seq_gaps += 1;
            details.push(format!("seq {} where {expected} was due", e.seq));
        }
        expected = e.seq + 1;
    }
    let by_seq: HashMap<u64, &LogEntry> = s.log.iter().map(|e| (e.seq, e)).collect();

    // I2, I3: each acknowledged message exactly once, at its seq.
    let mut copies: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in s.log.iter().filter(|e| e.is_user_message()) {
        if let Some(c) = e.content.as_deref() {
            copies.entry(c).or_default().push(e.seq);
        }
    }
    for m in &s.messages {
        let found = copies.get(m.content.as_str()).cloned().unwrap_or_default();
        if found.len() > 1 {
            v.duplicated += found.len() as u64 - 1;
            details.push(format!("message {:?} stored at seqs {found:?}", m.key));
        }
        let Some(first) = m.acks.first() else {
            continue;
        };
        if m.acks.iter().any(|a| a.seq != first.seq) {
            v.duplicated += 1;
            let seqs: Vec<u64> = m.acks.iter().map(|a| a.seq).collect();
            details.push(format!(
                "retries of key {:?} were answered with seqs {seqs:?}",
                m.key
            ));
        }
        let at = by_seq.get(&first.seq);
        let there = at.is_some_and(|e| {
            e.is_user_message() && e.content.as_deref() == Some(m.content.as_str())
        });
        if !there {
            if found.is_empty() {
                v.lost += 1;
                details.push(format!(
                    "message {:?} acknowledged at seq {} is not in the log",
                    m.key, first.seq
                ));
            } else {
                v.reordered += 1;
                details.push(format!(
                    "message {:?} acknowledged at seq {} is stored at {found:?}",
                    m.key, first.seq
                ));
            }
        }
    }

    // Turns as the log tells them, in the order they started.
    let mut logged: HashMap<&str, LoggedTurn> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for e in &s.log {
        let Some(t) = e.turn_id.as_deref() else {
            continue;
        };
        let lt = logged.entry(t).or_default();
        match e.kind.as_str() {
            "turn_started" => {
                if lt.started.is_none() {
                    lt.started = Some(e.seq);
                    lt.input = e.input;
                    order.push(t);
                } else {
                    v.overlapping_turns += 1;
                    details.push(format!("turn {t} started twice (seq {})", e.seq));
                }
            }
            "turn_ended" => lt.ends.push(e.seq),
            _ => {}
        }
    }
    let records: HashMap<&str, &crate::history::TurnRecord> =
        s.turns.iter().map(|t| (t.id.as_str(), t)).collect();

    // I8, I5: every entry of a turn lies within its start and its end.
    for e in &s.log {
        let Some(t) = e.turn_id.as_deref() else {
            continue;
        };
        let Some(lt) = logged.get(t) else {
            continue;
        };
        match lt.started {
            Some(start) if e.seq < start => {
                v.leaked_entries += 1;
                details.push(format!("seq {} of turn {t} precedes its start", e.seq));
            }
            None => {
                v.leaked_entries += 1;
                details.push(format!("seq {} belongs to turn {t}, never started", e.seq));
            }
            _ => {}
        }
        if let Some(&end) = lt.ends.first() {
            if e.seq > end {
                v.leaked_entries += 1;
                details.push(format!(
                    "seq {} ({}) of turn {t} after its end at {end}",
                    e.seq, e.kind
                ));
            }
        }
    }

    // I7 and I4: each turn ends once; the next starts after it ended.
    for (i, t) in order.iter().enumerate() {
        let lt = &logged[t];
        let last = i + 1 == order.len();
        if lt.ends.is_empty() && (s.quiesced || !last) {
            v.turns_without_end += 1;
            details.push(format!("turn {t} never ended"));
        }
        if lt.ends.len() > 1 {
            v.turns_ended_twice += 1;
            details.push(format!("turn {t} ended at seqs {:?}", lt.ends));
        }
        if let Some(next) = order.get(i + 1) {
            let next_start = logged[next].started.unwrap_or(0);
            let open_past = lt.ends.first().is_none_or(|&end| end > next_start);
            if open_past {
                v.overlapping_turns += 1;
                details.push(format!(
                    "turn {next} started at seq {next_start} while turn {t} ran"
                ));
            }
            if let (Some(a), Some(b)) = (records.get(t), records.get(next)) {
                if a.ended_at
                    .as_deref()
                    .is_none_or(|end| b.started_at.as_str() < end)
                {
                    v.overlapping_turn_times += 1;
                    details.push(format!(
                        "turn {next} started at {} before turn {t} ended at {:?}",
                        b.started_at, a.ended_at
                    ));
                }
            }
        }
    }

    // I6: FIFO consumption, each user message by exactly one turn.
    let users: Vec<u64> = s
        .log
        .iter()
        .filter(|e| e.is_user_message())
        .map(|e| e.seq)
        .collect();
    let policy_of: HashMap<&str, &str> = s
        .messages
        .iter()
        .map(|m| (m.content.as_str(), m.policy.as_str()))
        .collect();
    let mut next = 0usize; // index into `users` of the first message not yet consumed
    let mut input_of: HashMap<&str, Range> = HashMap::new();
    for t in &order {
        let lt = &logged[t];
        // The record's input includes steered messages; the start entry's does not.
        let Some(input) = records.get(t).map(|rec| rec.input).or(lt.input) else {
            v.fifo += 1;
            details.push(format!("turn {t} has no input"));
            continue;
        };
        input_of.insert(t, input);
        if let (Some(rec), Some(start_input)) = (records.get(t), lt.input) {
            if rec.input.from != start_input.from {
                v.fifo += 1;
                details.push(format!(
                    "turn {t} recorded input {:?} but started with {start_input:?}",
                    rec.input
                ));
            }
        }
        match users.get(next) {
            Some(&due) if due == input.from => {}
            Some(&due) if due < input.from => {
                let skipped = users[next..]
                    .iter()
                    .take_while(|&&u| u < input.from)
                    .count();
                v.fifo += skipped as u64;
                details.push(format!(
                    "turn {t} took {input:?}; {skipped} message(s) from seq {due} skipped"
                ));
            }
            _ => {
                v.fifo += 1;
                details.push(format!(
                    "turn {t} took {input:?}, which an earlier turn consumed or which is no user message"
                ));
            }
        }
        let taken: Vec<u64> = users
            .iter()
            .copied()
            .filter(|&u| u >= input.from && u <= input.to)
            .collect();
        if !taken.contains(&input.from) || !taken.contains(&input.to) {
            v.fifo += 1;
            details.push(format!(
                "turn {t}'s input {input:?} does not start and end at user messages"
            ));
        }
        if taken.len() > 1 {
            let last = by_seq
                .get(&input.to)
                .and_then(|e| e.content.as_deref())
                .and_then(|c| policy_of.get(c));
            if let Some(&p) = last {
                if !matches!(p, "merge" | "interrupt" | "steer") {
                    v.fifo += 1;
                    details.push(format!(
                        "turn {t} took {} messages {input:?}, the last one under policy {p}",
                        taken.len()
                    ));
                }
            }
        }
        next = next.max(users.partition_point(|&u| u <= input.to));
        // I5: the first input precedes the start; nothing taken after the end.
        if let Some(start) = lt.started {
            if input.from >= start {
                v.causality += 1;
                details.push(format!(
                    "turn {t} started at seq {start}, before its input {input:?}"
                ));
            }
        }
        if let Some(&end) = lt.ends.first() {
            if input.to > end {
                v.causality += 1;
                details.push(format!(
                    "turn {t} ended at seq {end} but took input up to {}",
                    input.to
                ));
            }
        }
    }
    if s.quiesced && next < users.len() {
        let left = users.len() - next;
        v.fifo += left as u64;
        details.push(format!(
            "{left} message(s) from seq {} never consumed by a turn",
            users[next]
        ));
    }

    // The runtime did what each disposition said. A steered message the
    // turn ended without taking is handed to the next turn; an interrupting
    // one runs in the turn after the one it cancels.
    let next_turn: HashMap<&str, &str> = order.windows(2).map(|w| (w[0], w[1])).collect();
    let holds = |t: &str, seq: u64| {
        input_of
            .get(t)
            .is_some_and(|i| i.from <= seq && seq <= i.to)
    };
    for m in &s.messages {
        let Some(a) = m.acks.first() else {
            continue;
        };
        let Some(t) = a.turn_id.as_deref() else {
            continue;
        };
        let after = next_turn.get(t).copied();
        let ok = match a.disposition.as_str() {
            "started" => input_of.get(t).is_some_and(|i| i.from == a.seq),
            "steered" => holds(t, a.seq) || after.is_some_and(|n| holds(n, a.seq)),
            "interrupting" => after.is_some_and(|n| holds(n, a.seq)),
            _ => true,
        };
        // Before quiescence the turn that will take it may not exist yet.
        if !ok && (s.quiesced || input_of.contains_key(t) && after.is_some()) {
            v.dispositions += 1;
            details.push(format!(
                "message {:?} at seq {} was {} with turn {t}, which took {:?} (next turn: {:?})",
                m.key,
                a.seq,
                a.disposition,
                input_of.get(t),
                after.and_then(|n| input_of.get(n)),
            ));
        }
    }

    // I9, I8 on the wire: each connection saw the log from its cursor.
    let end_of: HashMap<&str, u64> = logged
        .iter()
        .filter_map(|(t, lt)| lt.ends.first().map(|&e| (*t, e)))
        .collect();
    for (n, read) in s.streams.iter().enumerate() {
        let mut due = read.after + 1;
        for ev in &read.events {
            match ev {
                StreamEvent::Entry(e) => {
                    if e.seq < due {
                        v.stream_duplicates += 1;
                        details.push(format!(
                            "stream {n} (after {}) repeated seq {} where {due} was due",
                            read.after, e.seq
                        ));
                        continue;
                    }
                    if e.seq > due {
                        v.stream_gaps += e.seq - due;
                        details.push(format!(
                            "stream {n} (after {}) skipped seqs {due}..{}",
                            read.after, e.seq
                        ));
                    }
                    if by_seq.get(&e.seq).is_none_or(|stored| *stored != e) {
                        v.stream_mismatches += 1;
                        details.push(format!(
                            "stream {n} carried seq {} unlike the stored entry: {e:?}",
                            e.seq
                        ));
                    }
                    due = e.seq + 1;
                }
                StreamEvent::Delta { turn_id } => {
                    if end_of.get(turn_id.as_str()).is_some_and(|&end| end < due) {
                        v.leaked_deltas += 1;
                        details.push(format!(
                            "stream {n} carried a delta of turn {turn_id} after its end"
                        ));
                    }
                }
            }
        }
    }

    for d in details {
        r.flag(id, d);
    }
}

#[cfg(test)]
mod tests;
