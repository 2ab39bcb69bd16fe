//! Hand-made histories: a correct one passes, and each planted violation is
//! flagged by its own counter.

use super::*;
use crate::history::{Ack, MessageHistory, StreamRead, TurnRecord};

fn user(seq: u64, content: &str) -> LogEntry {
    LogEntry {
        seq,
        kind: "message".into(),
        role: Some("user".into()),
        turn_id: None,
        content: Some(content.into()),
        status: None,
        input: None,
    }
}

fn started(seq: u64, turn: &str, from: u64, to: u64) -> LogEntry {
    LogEntry {
        seq,
        kind: "turn_started".into(),
        role: None,
        turn_id: Some(turn.into()),
        content: None,
        status: None,
        input: Some(Range { from, to }),
    }
}

fn reply(seq: u64, turn: &str) -> LogEntry {
    LogEntry {
        seq,
        kind: "message".into(),
        role: Some("assistant".into()),
        turn_id: Some(turn.into()),
        content: Some(format!("echo of {turn}")),
        status: None,
        input: None,
    }
}

fn ended(seq: u64, turn: &str) -> LogEntry {
    LogEntry {
        seq,
        kind: "turn_ended".into(),
        role: None,
        turn_id: Some(turn.into()),
        content: None,
        status: Some("completed".into()),
        input: None,
    }
}

fn record(id: &str, from: u64, to: u64, start: u32, end: u32) -> TurnRecord {
    TurnRecord {
        id: id.into(),
        status: "completed".into(),
        input: Range { from, to },
        started_at: format!("2026-12-05T12:00:{start:02}.000000Z"),
        ended_at: Some(format!("2026-12-05T12:00:{end:02}.000000Z")),
    }
}

fn message(
    key: &str,
    seq: u64,
    policy: &str,
    disposition: &str,
    turn: Option<&str>,
) -> MessageHistory {
    MessageHistory {
        key: key.into(),
        content: key.into(),
        policy: policy.into(),
        acks: vec![Ack {
            status: 201,
            seq,
            disposition: disposition.into(),
            turn_id: turn.map(Into::into),
        }],
    }
}

/// Two queued messages, one turn each; a stream read the whole log.
fn good() -> SessionHistory {
    let log = vec![
        user(1, "m1"),
        started(2, "t1", 1, 1),
        reply(3, "t1"),
        user(4, "m2"),
        ended(5, "t1"),
        started(6, "t2", 4, 4),
        reply(7, "t2"),
        ended(8, "t2"),
    ];
    let mut events: Vec<StreamEvent> = log.iter().cloned().map(StreamEvent::Entry).collect();
    events.insert(
        2,
        StreamEvent::Delta {
            turn_id: "t1".into(),
        },
    );
    SessionHistory {
        id: "s".into(),
        deleted: false,
        quiesced: true,
        debounce_until: None,
        turns: vec![record("t1", 1, 1, 1, 2), record("t2", 4, 4, 2, 3)],
        messages: vec![
            message("m1", 1, "queue", "started", Some("t1")),
            message("m2", 4, "queue", "queued", None),
        ],
        streams: vec![StreamRead { after: 0, events }],
        log,
    }
}

fn verdict(s: SessionHistory) -> Report {
    check(&History {
        sessions: vec![s],
        probes: Vec::new(),
    })
}

/// Asserts the report flags exactly `n` on the one counter `pick` reads.
fn flags(s: SessionHistory, pick: fn(&Violations) -> u64, n: u64) {
    let report = verdict(s);
    assert_eq!(pick(&report.violations), n, "{report:#?}");
    assert!(!report.details.is_empty(), "a violation is described");
}

#[test]
fn a_correct_history_has_no_violation() {
    let report = verdict(good());
    assert_eq!(report.violations, Violations::default(), "{report:#?}");
    assert_eq!(report.violations.total(), 0);
    assert!(report.details.is_empty());
}

#[test]
fn merged_and_steered_turns_are_correct() {
    // m1 starts t1, m2 is steered into it; m3 (queue) and m4 (merge) go
    // together into t2.
    let log = vec![
        user(1, "m1"),
        started(2, "t1", 1, 1),
        user(3, "m2"),
        reply(4, "t1"),
        user(5, "m3"),
        user(6, "m4"),
        ended(7, "t1"),
        started(8, "t2", 5, 6),
        ended(9, "t2"),
    ];
    let s = SessionHistory {
        id: "s".into(),
        quiesced: true,
        turns: vec![record("t1", 1, 3, 1, 2), record("t2", 5, 6, 2, 3)],
        messages: vec![
            message("m1", 1, "queue", "started", Some("t1")),
            message("m2", 3, "steer", "steered", Some("t1")),
            message("m3", 5, "queue", "queued", None),
            message("m4", 6, "merge", "merged", None),
        ],
        log,
        ..Default::default()
    };
    let report = verdict(s);
    assert_eq!(report.violations.total(), 0, "{report:#?}");
}

#[test]
fn a_lost_message_is_flagged() {
    let mut s = good();
    s.messages.push(message("m3", 9, "queue", "started", None));
    flags(s, |v| v.lost, 1);
}

#[test]
fn a_vanished_entry_is_lost_and_a_gap() {
    let mut s = good();
    s.log.remove(3); // m2
    s.streams.clear();
    let report = verdict(s);
    assert_eq!(report.violations.lost, 1, "{report:#?}");
    assert_eq!(report.violations.seq_gaps, 1, "{report:#?}");
}

#[test]
fn a_duplicate_is_flagged() {
    let mut s = good();
    // m2 stored a second time, and consumed by a turn of its own.
    s.log.push(user(9, "m2"));
    s.log.push(started(10, "t3", 9, 9));
    s.log.push(ended(11, "t3"));
    s.turns.push(record("t3", 9, 9, 4, 5));
    flags(s, |v| v.duplicated, 1);
}

#[test]
fn a_retry_answered_with_another_seq_is_a_duplicate() {
    let mut s = good();
    s.messages[1].acks.push(Ack {
        status: 200,
        seq: 7,
        disposition: "queued".into(),
        turn_id: None,
    });
    flags(s, |v| v.duplicated, 1);
}

#[test]
fn a_message_at_another_seq_than_acknowledged_is_reordered() {
    let mut s = good();
    s.messages[1].acks[0].seq = 3;
    flags(s, |v| v.reordered, 1);
}

#[test]
fn a_gap_is_flagged() {
    let mut s = good();
    s.log.remove(2); // t1's reply
    s.streams.clear();
    flags(s, |v| v.seq_gaps, 1);
}

#[test]
fn a_repeated_seq_is_flagged() {
    let mut s = good();
    let copy = s.log[2].clone();
    s.log.insert(3, copy);
    s.streams.clear();
    flags(s, |v| v.seq_gaps, 1);
}

#[test]
fn overlapping_turns_are_flagged() {
    // t2 starts before t1 ended.
    let log = vec![
        user(1, "m1"),
        started(2, "t1", 1, 1),
        user(3, "m2"),
        started(4, "t2", 3, 3),
        ended(5, "t1"),
        ended(6, "t2"),
    ];
    let s = SessionHistory {
        id: "s".into(),
        quiesced: true,
        turns: vec![record("t1", 1, 1, 1, 2), record("t2", 3, 3, 2, 3)],
        messages: vec![
            message("m1", 1, "queue", "started", Some("t1")),
            message("m2", 3, "queue", "queued", None),
        ],
        log,
        ..Default::default()
    };
    flags(s, |v| v.overlapping_turns, 1);
}

#[test]
fn turns_overlapping_in_time_are_flagged() {
    let mut s = good();
    s.turns[1] = record("t2", 4, 4, 1, 3); // started before t1 ended at :02
    flags(s, |v| v.overlapping_turn_times, 1);
}

#[test]
fn a_turn_without_end_is_flagged() {
    let mut s = good();
    s.log.pop();
    s.streams.clear();
    flags(s, |v| v.turns_without_end, 1);
}

#[test]
fn a_running_last_turn_is_no_violation_before_quiescence() {
    let mut s = good();
    s.log.pop();
    s.streams.clear();
    s.quiesced = false;
    assert_eq!(verdict(s).violations.total(), 0);
}

#[test]
fn a_turn_ended_twice_is_flagged() {
    let mut s = good();
    s.log.push(ended(9, "t2"));
    flags(s, |v| v.turns_ended_twice, 1);
}

#[test]
fn a_leak_after_turn_ended_is_flagged() {
    let mut s = good();
    s.log.push(reply(9, "t1"));
    flags(s, |v| v.leaked_entries, 1);
}

#[test]
fn a_fifo_violation_is_flagged() {
    // t1 consumes m2 before t2 consumes m1.
    let log = vec![
        user(1, "m1"),
        user(2, "m2"),
        started(3, "t1", 2, 2),
        ended(4, "t1"),
        started(5, "t2", 1, 1),
        ended(6, "t2"),
    ];
    let s = SessionHistory {
        id: "s".into(),
        quiesced: true,
        turns: vec![record("t1", 2, 2, 1, 2), record("t2", 1, 1, 2, 3)],
        messages: vec![
            message("m1", 1, "queue", "queued", None),
            message("m2", 2, "queue", "queued", None),
        ],
        log,
        ..Default::default()
    };
    let report = verdict(s);
    assert!(report.violations.fifo >= 2, "skip and replay: {report:#?}");
}

#[test]
fn a_message_never_consumed_is_flagged() {
    let mut s = good();
    s.log.push(user(9, "m3"));
    s.messages.push(message("m3", 9, "queue", "queued", None));
    flags(s, |v| v.fifo, 1);
}

#[test]
fn a_message_consumed_twice_is_flagged() {
    let mut s = good();
    s.log.push(started(9, "t3", 4, 4));
    s.log.push(ended(10, "t3"));
    s.turns.push(record("t3", 4, 4, 4, 5));
    flags(s, |v| v.fifo, 1);
}

#[test]
fn queue_messages_merged_into_one_turn_are_flagged() {
    let log = vec![
        user(1, "m1"),
        user(2, "m2"),
        started(3, "t1", 1, 2),
        ended(4, "t1"),
    ];
    let s = SessionHistory {
        id: "s".into(),
        quiesced: true,
        turns: vec![record("t1", 1, 2, 1, 2)],
        messages: vec![
            message("m1", 1, "queue", "queued", None),
            message("m2", 2, "queue", "queued", None),
        ],
        log,
        ..Default::default()
    };
    flags(s, |v| v.fifo, 1);
}

#[test]
fn a_turn_started_before_its_input_breaks_causality() {
    let log = vec![started(1, "t1", 2, 2), user(2, "m1"), ended(3, "t1")];
    let s = SessionHistory {
        id: "s".into(),
        quiesced: true,
        turns: vec![record("t1", 2, 2, 1, 2)],
        messages: vec![message("m1", 2, "queue", "started", Some("t1"))],
        log,
        ..Default::default()
    };
    flags(s, |v| v.causality, 1);
}

#[test]
fn a_disposition_not_carried_out_is_flagged() {
    let mut s = good();
    s.messages[1].acks[0].disposition = "started".into();
    s.messages[1].acks[0].turn_id = Some("t1".into());
    flags(s, |v| v.dispositions, 1);
}

/// m1 starts t1; m2 arrives while it runs, with `disposition` naming t1;
/// t2 takes m2.
fn handed_on(disposition: &str) -> SessionHistory {
    let log = vec![
        user(1, "m1"),
        started(2, "t1", 1, 1),
        user(3, "m2"),
        ended(4, "t1"),
        started(5, "t2", 3, 3),
        ended(6, "t2"),
    ];
    SessionHistory {
        id: "s".into(),
        quiesced: true,
        turns: vec![record("t1", 1, 1, 1, 2), record("t2", 3, 3, 2, 3)],
        messages: vec![
            message("m1", 1, "queue", "started", Some("t1")),
            message("m2", 3, "interrupt", disposition, Some("t1")),
        ],
        log,
        ..Default::default()
    }
}

#[test]
fn interrupting_and_untaken_steered_messages_run_in_the_next_turn() {
    assert_eq!(verdict(handed_on("interrupting")).violations.total(), 0);
    let mut steered = handed_on("steered");
    steered.messages[1].policy = "steer".into();
    assert_eq!(verdict(steered).violations.total(), 0);
}

#[test]
fn an_interrupting_message_that_did_not_run_next_is_flagged() {
    // m2 interrupted t1 but t2 ran m1's queue-mate first; m2 only in t3.
    let mut s = handed_on("interrupting");
    s.log.truncate(3);
    s.log.extend([
        user(4, "m3"),
        ended(5, "t1"),
        started(6, "t2", 4, 4),
        ended(7, "t2"),
        started(8, "t3", 3, 3),
        ended(9, "t3"),
    ]);
    s.turns = vec![
        record("t1", 1, 1, 1, 2),
        record("t2", 4, 4, 2, 3),
        record("t3", 3, 3, 3, 4),
    ];
    s.messages.push(message("m3", 4, "queue", "queued", None));
    flags(s, |v| v.dispositions, 1);
}

#[test]
fn a_stream_that_skipped_an_entry_is_flagged() {
    let mut s = good();
    s.streams[0].events.remove(4); // seq 4
    flags(s, |v| v.stream_gaps, 1);
}

#[test]
fn a_stream_that_repeated_an_entry_is_flagged() {
    let mut s = good();
    let again = s.streams[0].events[3].clone();
    s.streams[0].events.insert(4, again);
    flags(s, |v| v.stream_duplicates, 1);
}

#[test]
fn a_resumed_stream_starts_after_its_cursor() {
    let mut s = good();
    let tail: Vec<StreamEvent> = s.log[5..].iter().cloned().map(StreamEvent::Entry).collect();
    s.streams.push(StreamRead {
        after: 5,
        events: tail.clone(),
    });
    assert_eq!(verdict(s.clone()).violations.total(), 0);
    // Resuming after 4 but starting at 6 skipped seq 5.
    s.streams[1].after = 4;
    flags(s, |v| v.stream_gaps, 1);
}

#[test]
fn a_streamed_entry_unlike_the_stored_one_is_flagged() {
    let mut s = good();
    if let StreamEvent::Entry(e) = &mut s.streams[0].events[4] {
        e.content = Some("changed".into());
    }
    flags(s, |v| v.stream_mismatches, 1);
}

#[test]
fn a_delta_after_its_turn_ended_is_flagged() {
    let mut s = good();
    s.streams[0].events.push(StreamEvent::Delta {
        turn_id: "t1".into(),
    });
    flags(s, |v| v.leaked_deltas, 1);
}

#[test]
fn another_owners_session_answering_is_flagged() {
    let probe = |got| crate::history::Probe {
        what: "GET another owner's session".into(),
        expected: 404,
        got,
    };
    let mut h = History {
        sessions: vec![good()],
        probes: vec![probe(404)],
    };
    assert_eq!(check(&h).violations.total(), 0);
    h.probes.push(probe(200));
    assert_eq!(check(&h).violations.isolation, 1);
}

#[test]
fn deleted_sessions_are_not_checked() {
    let mut s = good();
    s.log.clear();
    s.deleted = true;
    assert_eq!(verdict(s).violations.total(), 0);
}
