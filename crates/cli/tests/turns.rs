//! End-to-end tests of the turn engine over real HTTP: real concurrency,
//! real processes (SIGKILL, SIGTERM) and injected faults (the demo agent's
//! `/sleep`, `/fail`, `/hang`, `/stubborn`; stolen and expired leases).
//!
//! Every test ends by running [`check_transcript`] over the whole session
//! log, which checks the contract (I1, I4–I8) independently of the test's
//! own scenario.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use baton_core::{NewEntry, Policy, TurnStatus};
use baton_store::{Begin, CreateSession, SqlStore, Store, StoreConfig, StoreError};
use common::{spawn_app, spawn_binary, Client, Sse, PATIENCE};
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// The shared checker

const TERMINAL: [&str; 5] = ["completed", "cancelled", "failed", "timed_out", "lost"];

fn seq_of(e: &Value) -> u64 {
    e["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("entry without seq: {e}"))
}

fn is_user(e: &Value) -> bool {
    e["type"] == "message" && e["role"] == "user"
}

/// Asserts the contract over a whole (quiescent) session log and its turns:
/// - I1: `seq` is 1..n without gap or duplicate;
/// - I4: turn intervals never overlap (each `turn_started` is followed by
///   exactly one `turn_ended` of that turn before the next `turn_started`);
/// - I5: a turn's input messages precede its `turn_started`, and steered
///   messages it took (its `/turns` input reaching past its `turn_started`'s)
///   precede its `turn_ended`;
/// - I6: every user message is consumed by exactly one turn, FIFO (steered
///   ones included);
/// - I7: every turn ended, once, with a terminal status;
/// - I8: nothing of a turn appears after its `turn_ended`, and a turn's
///   output lies inside its interval;
/// - `/turns` agrees with the log, every turn is terminal with
///   `ended_at >= started_at`, and each turn starts no earlier than the
///   previous one ended.
fn check_transcript(entries: &[Value], turns: &[Value]) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "I1: seq gap or duplicate at position {i}: {e}"
        );
    }
    let users: Vec<u64> = entries.iter().filter(|e| is_user(e)).map(seq_of).collect();
    let mut running: Option<String> = None;
    let mut ended: HashSet<String> = HashSet::new();
    // In log order: (turn id, input from, input to).
    let mut started: Vec<(String, u64, u64)> = Vec::new();
    // Turn id → (status, reason) of its `turn_ended`.
    let mut ends: HashMap<String, (String, Value)> = HashMap::new();
    let mut consumed: Vec<u64> = Vec::new();
    // Turn id → the last input it took (its record's, steered ones included).
    let took: HashMap<String, u64> = turns
        .iter()
        .filter_map(|t| Some((t["id"].as_str()?.to_owned(), t["input"]["to"].as_u64()?)))
        .collect();
    for e in entries {
        let seq = seq_of(e);
        let turn = e["turn_id"].as_str().map(str::to_owned);
        if let Some(t) = &turn {
            assert!(
                !ended.contains(t),
                "I8: seq {seq} belongs to turn {t}, which already ended: {e}"
            );
        }
        match e["type"].as_str() {
            Some("turn_started") => {
                let t = turn.unwrap_or_else(|| panic!("turn_started without turn_id: {e}"));
                assert!(
                    running.is_none(),
                    "I4: turn {t} started at seq {seq} while {running:?} runs"
                );
                assert!(
                    started.iter().all(|(s, _, _)| *s != t),
                    "turn {t} started twice"
                );
                let from = e["input"]["from"].as_u64().unwrap();
                let to = e["input"]["to"].as_u64().unwrap();
                assert!(from <= to, "empty input range at seq {seq}: {e}");
                assert!(
                    to < seq,
                    "I5: turn_started at seq {seq} consumes a later message {to}"
                );
                let last = took.get(&t).copied().unwrap_or(to);
                assert!(last >= to, "turn {t}'s record lost input: {last} < {to}");
                let mine: Vec<u64> = users
                    .iter()
                    .copied()
                    .filter(|s| (from..=last).contains(s))
                    .collect();
                assert!(
                    mine.first() == Some(&from) && mine.contains(&to) && mine.last() == Some(&last),
                    "input {from}..={to} (took up to {last}) of turn {t} is not bounded by user messages"
                );
                // FIFO, nothing skipped, nothing replayed: the turn takes the
                // next user messages not consumed yet, in order.
                let next = &users[consumed.len().min(users.len())..];
                assert!(
                    next.starts_with(&mine),
                    "I6: turn {t} consumes {mine:?} but the next unconsumed messages are {next:?}"
                );
                consumed.extend(&mine);
                started.push((t.clone(), from, to));
                running = Some(t);
            }
            Some("turn_ended") => {
                let t = turn.unwrap_or_else(|| panic!("turn_ended without turn_id: {e}"));
                assert_eq!(
                    running.as_deref(),
                    Some(t.as_str()),
                    "I7: turn_ended at seq {seq} for a turn that is not running"
                );
                let status = e["status"].as_str().unwrap_or_default().to_owned();
                assert!(
                    TERMINAL.contains(&status.as_str()),
                    "turn_ended with a non-terminal status: {e}"
                );
                let last = took.get(&t).copied().unwrap_or(0);
                assert!(
                    last < seq,
                    "I5: turn {t} ended at seq {seq} but took input {last} after it"
                );
                ends.insert(t.clone(), (status, e["reason"].clone()));
                ended.insert(t);
                running = None;
            }
            Some(
                "message"
                | "thought"
                | "tool_call"
                | "tool_result"
                | "permission_request"
                | "permission_decision",
            ) => match &turn {
                Some(t) => assert_eq!(
                    running.as_deref(),
                    Some(t.as_str()),
                    "I8: output of turn {t} at seq {seq} lies outside its turn"
                ),
                None => assert!(is_user(e), "an agent entry without a turn: {e}"),
            },
            other => panic!("unknown entry type {other:?}: {e}"),
        }
    }
    assert!(running.is_none(), "I7: turn {running:?} never ended");
    assert_eq!(
        consumed, users,
        "I6: every user message must be consumed by exactly one turn"
    );

    assert_eq!(
        turns.len(),
        started.len(),
        "/turns and the log disagree on the number of turns: {turns:#?}"
    );
    let mut prev_end: Option<&str> = None;
    for (t, (id, from, to)) in turns.iter().zip(&started) {
        assert_eq!(
            t["id"].as_str(),
            Some(id.as_str()),
            "/turns order: {turns:#?}"
        );
        assert_eq!(t["input"]["from"], json!(from), "turn input: {t}");
        assert!(t["input"]["to"].as_u64() >= Some(*to), "turn input: {t}");
        let status = t["status"].as_str().unwrap_or_default();
        assert!(TERMINAL.contains(&status), "turn not terminal: {t}");
        let (logged, reason) = &ends[id];
        assert_eq!(status, logged, "/turns and turn_ended disagree: {t}");
        assert_eq!(&t["reason"], reason, "/turns and turn_ended reasons: {t}");
        // RFC 3339 UTC with microseconds: fixed width, so text order is time order.
        let start = t["started_at"].as_str().unwrap();
        let end = t["ended_at"]
            .as_str()
            .unwrap_or_else(|| panic!("ended turn without ended_at: {t}"));
        assert!(end >= start, "ended_at before started_at: {t}");
        if let Some(p) = prev_end {
            assert!(
                start >= p,
                "turn {id} started at {start}, before the previous ended at {p}"
            );
        }
        prev_end = Some(end);
    }
}

// ---------------------------------------------------------------------------
// Helpers

fn sid(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

async fn check(c: &Client, id: &str) -> (Vec<Value>, Vec<Value>) {
    let entries = c.entries(id).await;
    let turns = c.turns(id).await;
    check_transcript(&entries, &turns);
    (entries, turns)
}

/// Waits until some turn of the session satisfies `pred`; returns it.
async fn wait_turn(c: &Client, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let turns = c.turns(id).await;
        if let Some(t) = turns.iter().find(|t| pred(t)) {
            return t.clone();
        }
        assert!(Instant::now() < deadline, "no turn matched: {turns:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a turn of the session runs (the prompt went to the agent).
async fn wait_running(c: &Client, id: &str) -> Value {
    wait_turn(c, id, |t| t["status"] == "running").await
}

/// Waits until the turn `turn` has ended; returns it.
async fn wait_ended(c: &Client, id: &str, turn: &str) -> Value {
    wait_turn(c, id, |t| {
        t["id"] == turn && TERMINAL.contains(&t["status"].as_str().unwrap_or_default())
    })
    .await
}

fn of_turn<'a>(entries: &'a [Value], turn: &Value) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["turn_id"] == *turn).collect()
}

fn assistant_of<'a>(entries: &'a [Value], turn: &Value) -> Vec<&'a Value> {
    of_turn(entries, turn)
        .into_iter()
        .filter(|e| e["type"] == "message" && e["role"] == "assistant")
        .collect()
}

/// Asserts that every user message (plain, no directive) got exactly one
/// reply `echo: <content>`, stored after it, by the turn that consumed it.
fn assert_each_echoed_once(entries: &[Value], turns: &[Value]) {
    for m in entries.iter().filter(|e| is_user(e)) {
        let seq = seq_of(m);
        let want = format!("echo: {}", m["content"].as_str().unwrap());
        let turn = turns
            .iter()
            .find(|t| {
                t["input"]["from"].as_u64().unwrap() <= seq
                    && seq <= t["input"]["to"].as_u64().unwrap()
            })
            .unwrap_or_else(|| panic!("no turn consumed seq {seq}"));
        let replies: Vec<&Value> = entries
            .iter()
            .filter(|e| e["role"] == "assistant" && e["content"] == want.as_str())
            .collect();
        assert_eq!(replies.len(), 1, "one reply {want:?}, got {replies:#?}");
        assert!(seq_of(replies[0]) > seq, "I5: reply before its message");
        assert_eq!(
            replies[0]["turn_id"], turn["id"],
            "reply from the wrong turn"
        );
    }
}

async fn delete(c: &Client, id: &str) -> StatusCode {
    c.send(c.req(Method::DELETE, &format!("/v1/sessions/{id}")))
        .await
        .0
}

// ---------------------------------------------------------------------------
// 1. Concurrency and FIFO

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_messages_run_as_fifty_fifo_turns() {
    let app = spawn_app(|cfg| cfg.queue_capacity = 100).await;
    let c = &app.client;

    // (a) 50 concurrent posts race on an idle session. Whatever the timing,
    // each disposition must be true of the log: `started` only when the
    // session was idle (its turn_started follows at once), `queued` with the
    // number of messages then waiting ahead of it.
    let s = c.create_session(json!({"policy": "queue"})).await;
    let id = sid(&s);
    let contents: Vec<String> = (0..50).map(|i| format!("race {i:02}")).collect();
    let results = join_all(contents.iter().map(|m| c.post(&id, m, None, None))).await;
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 50, "one turn per queued message");
    assert!(turns
        .iter()
        .all(|t| t["status"] == "completed" && t["input"]["from"] == t["input"]["to"]));
    assert_each_echoed_once(&entries, &turns);
    let started_at: HashMap<u64, u64> = entries
        .iter()
        .filter(|e| e["type"] == "turn_started")
        .map(|e| (e["input"]["from"].as_u64().unwrap(), seq_of(e)))
        .collect();
    let mut started = 0;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
        let seq = seq_of(&body["entry"]);
        let d = &body["disposition"];
        // Messages stored before this one whose turn had not started yet.
        let waiting_ahead = started_at
            .iter()
            .filter(|(from, ts)| **from < seq && **ts > seq)
            .count() as u64;
        match d["type"].as_str() {
            Some("started") => {
                started += 1;
                assert_eq!(started_at[&seq], seq + 1, "a started turn begins at once");
                let t = turns.iter().find(|t| t["input"]["from"] == seq).unwrap();
                assert_eq!(d["turn_id"], t["id"]);
                // Idle at that moment: no turn began before it and ended after it.
                let busy = entries.iter().any(|e| {
                    e["type"] == "turn_started"
                        && seq_of(e) < seq
                        && entries.iter().any(|x| {
                            x["type"] == "turn_ended"
                                && x["turn_id"] == e["turn_id"]
                                && seq_of(x) > seq
                        })
                });
                assert!(!busy, "`started` while a turn was running: {body}");
            }
            Some("queued") => {
                assert_eq!(d["position"].as_u64(), Some(waiting_ahead + 1), "{body}");
            }
            other => panic!("unexpected disposition {other:?}: {body}"),
        }
    }
    assert!(started >= 1, "someone must have started the first turn");
    eprintln!("idle race: {started} of 50 concurrent messages found the session idle");

    // (b) The same with the session held busy by a hanging turn, so that the
    // dispositions are exact: all 50 queued, positions 1..=50 in seq order.
    let s = c
        .create_session(json!({"policy": "queue", "message": "/hang gate"}))
        .await;
    let id = sid(&s);
    let gate = wait_running(c, &id).await;
    let contents: Vec<String> = (0..50).map(|i| format!("message {i:02}")).collect();
    let mut results = join_all(contents.iter().map(|m| c.post(&id, m, None, None))).await;
    results.sort_by_key(|(_, b)| seq_of(&b["entry"]));
    for (i, (status, body)) in results.iter().enumerate() {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
        assert_eq!(body["disposition"]["type"], "queued", "{body}");
        assert_eq!(body["disposition"]["position"], i as u64 + 1, "{body}");
    }
    let (_, session) = c.session(&id).await;
    assert_eq!(session["queued"], 50);
    let (status, body) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["turn_id"], gate["id"]);
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 51);
    assert_eq!(turns[0]["status"], "cancelled");
    for (t, (_, body)) in turns[1..].iter().zip(&results) {
        // FIFO: the k-th queued message is the k-th turn after the gate.
        let seq = seq_of(&body["entry"]);
        assert_eq!(t["input"], json!({"from": seq, "to": seq}));
        assert_eq!(t["status"], "completed");
    }
    let replies: Vec<&Value> = entries
        .iter()
        .filter(|e| e["role"] == "assistant")
        .collect();
    assert_eq!(replies.len(), 50, "the cancelled gate stores no reply");
    for (r, (_, m)) in replies.iter().zip(&results) {
        let m = m["entry"]["content"].as_str().unwrap();
        assert_eq!(r["content"], format!("echo: {m}"), "replies in FIFO order");
    }
    assert_eq!(entries.iter().filter(|e| is_user(e)).count(), 51);
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 2. Merge

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_consumes_waiting_messages_in_one_turn() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let s = c
        .create_session(json!({"message": "/sleep 3000 first"}))
        .await;
    let id = sid(&s);
    let mut seqs = Vec::new();
    for m in ["alpha", "beta", "gamma"] {
        let (status, body) = c.post(&id, m, Some("merge"), None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["disposition"]["type"], "merged", "{body}");
        seqs.push(seq_of(&body["entry"]));
    }
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(
        turns.len(),
        2,
        "exactly one turn after the first: {turns:#?}"
    );
    assert_eq!(turns[0]["status"], "completed");
    assert_eq!(turns[1]["status"], "completed");
    assert_eq!(turns[1]["input"], json!({"from": seqs[0], "to": seqs[2]}));
    let replies = assistant_of(&entries, &turns[1]["id"]);
    assert_eq!(replies.len(), 1, "one assistant message: {replies:#?}");
    assert_eq!(
        replies[0]["content"],
        "echo: alpha\necho: beta\necho: gamma"
    );
    assert_eq!(
        assistant_of(&entries, &turns[0]["id"])[0]["content"],
        "echo: first"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Interrupt

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupt_cancels_a_hanging_turn() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let s = c.create_session(json!({})).await;
    let id = sid(&s);
    let mut sse = c.open_stream(&id, None).await;
    let (status, first) = c.post(&id, "/hang until interrupted", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["disposition"]["type"], "started");
    let t1 = first["disposition"]["turn_id"].clone();

    // The turn runs once its first delta arrives.
    let mut events: Vec<Sse> = Vec::new();
    loop {
        let ev = sse.next().await.expect("the stream ended early");
        let running = ev.event == "delta" && ev.data["turn_id"] == t1;
        events.push(ev);
        if running {
            break;
        }
    }
    let (status, int) = c.post(&id, "stop that", Some("interrupt"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{int}");
    assert_eq!(int["disposition"]["type"], "interrupting", "{int}");
    assert_eq!(int["disposition"]["turn_id"], t1, "{int}");
    events.extend(
        sse.until_entry(|e| e["type"] == "turn_ended" && e["turn_id"] != t1)
            .await,
    );

    // I8 on the live stream: nothing of turn 1 after its turn_ended.
    let end1 = events
        .iter()
        .position(|ev| {
            ev.event == "entry" && ev.data["type"] == "turn_ended" && ev.data["turn_id"] == t1
        })
        .expect("turn 1 ended on the stream");
    assert_eq!(events[end1].data["status"], "cancelled");
    for ev in &events[end1 + 1..] {
        assert_ne!(
            ev.data["turn_id"], t1,
            "I8: {} of turn 1 after its end: {:?}",
            ev.event, ev
        );
    }
    // The stream's entries are the stored log, in order (I9).
    let streamed: Vec<Value> = events
        .iter()
        .filter(|ev| ev.event == "entry")
        .map(|ev| ev.data.clone())
        .collect();
    for (i, ev) in events.iter().filter(|ev| ev.event == "entry").enumerate() {
        assert_eq!(ev.id, (i + 1).to_string(), "entry ids are seqs in order");
    }
    let (entries, turns) = check(c, &id).await;
    assert_eq!(streamed, entries, "stream and store agree");

    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["id"], t1);
    assert_eq!(turns[0]["status"], "cancelled");
    let int_seq = seq_of(&int["entry"]);
    assert_eq!(
        turns[0]["reason"],
        format!("interrupted by message {int_seq}"),
        "{}",
        turns[0]
    );
    assert_eq!(turns[1]["input"], json!({"from": int_seq, "to": int_seq}));
    assert_eq!(turns[1]["status"], "completed");
    assert!(
        assistant_of(&entries, &t1).is_empty(),
        "a cancelled turn stores no reply"
    );
    let replies = assistant_of(&entries, &turns[1]["id"]);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["content"], "echo: stop that");
    app.stop().await;
}

/// "After an interrupt, the next turn takes every message waiting at that
/// moment": queued messages ride along with the interrupting one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupt_takes_every_waiting_message() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let s = c.create_session(json!({"message": "/hang"})).await;
    let id = sid(&s);
    let t1 = wait_running(c, &id).await;
    let mut seqs = Vec::new();
    for (m, p) in [("q1", None), ("q2", None), ("now", Some("interrupt"))] {
        let (status, body) = c.post(&id, m, p, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        seqs.push(seq_of(&body["entry"]));
        if p.is_some() {
            assert_eq!(body["disposition"]["type"], "interrupting");
            assert_eq!(body["disposition"]["turn_id"], t1["id"]);
        }
    }
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 2, "{turns:#?}");
    assert_eq!(turns[0]["status"], "cancelled");
    assert_eq!(turns[1]["input"], json!({"from": seqs[0], "to": seqs[2]}));
    assert_eq!(turns[1]["status"], "completed");
    assert_eq!(
        assistant_of(&entries, &turns[1]["id"])[0]["content"],
        "echo: q1\necho: q2\necho: now"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 4. Cancel and the drain deadline

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stubborn_agent_is_forced_at_the_drain_deadline() {
    let app = spawn_app(|cfg| cfg.cancel_drain_ms = 300).await;
    let c = &app.client;
    let s = c
        .create_session(json!({"message": "/stubborn will not stop"}))
        .await;
    let id = sid(&s);
    let t1 = wait_running(c, &id).await;
    let asked = Instant::now();
    let (status, body) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["turn_id"], t1["id"]);
    // A second cancel is idempotent: the same turn.
    let (status, again) = c.cancel(&id).await;
    assert!(
        again["turn_id"] == t1["id"] || (status == StatusCode::OK && again["turn_id"].is_null()),
        "{status} {again}"
    );
    let ended = wait_ended(c, &id, t1["id"].as_str().unwrap()).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "ended before the drain deadline"
    );
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("forced"),
        "reason says it was forced: {reason:?}"
    );
    assert!(reason.contains("cancelled by user"), "{reason:?}");

    let (status, next) = c.post(&id, "are you there", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{next}");
    assert_eq!(next["disposition"]["type"], "started");
    c.wait_idle(&id).await;
    let (status, idle) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idle, json!({"turn_id": null, "cancelled": false}));

    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[1]["status"], "completed");
    assert!(assistant_of(&entries, &t1["id"]).is_empty());
    assert_eq!(
        assistant_of(&entries, &turns[1]["id"])[0]["content"],
        "echo: are you there"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Reject

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_while_busy_stores_nothing() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    // A hanging turn instead of a timed one: nothing of the turn is stored
    // while we look, so `last_seq` must not move at all.
    let s = c
        .create_session(json!({"policy": "reject", "message": "/hang busy"}))
        .await;
    let id = sid(&s);
    let busy = wait_running(c, &id).await;
    let (_, before) = c.session(&id).await;
    let (status, body) = c.post(&id, "let me in", None, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "session_busy", "{body}");
    assert_eq!(body["error"]["turn_id"], busy["id"], "{body}");
    // An explicit reject override is refused the same way.
    let (status, body) = c.post(&id, "me too", Some("reject"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, after) = c.session(&id).await;
    assert_eq!(
        before["last_seq"], after["last_seq"],
        "a rejected message is not stored"
    );
    assert_eq!(after["queued"], 0);

    // A per-message override on a `queue` session.
    let q = c.create_session(json!({"message": "/hang busy too"})).await;
    let qid = sid(&q);
    let qbusy = wait_running(c, &qid).await;
    let (_, qbefore) = c.session(&qid).await;
    let (status, body) = c.post(&qid, "no thanks", Some("reject"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["turn_id"], qbusy["id"], "{body}");
    let (_, qafter) = c.session(&qid).await;
    assert_eq!(qbefore["last_seq"], qafter["last_seq"]);
    assert_eq!(c.cancel(&qid).await.0, StatusCode::ACCEPTED);
    c.wait_idle(&qid).await;
    check(c, &qid).await;

    assert_eq!(c.cancel(&id).await.0, StatusCode::ACCEPTED);
    c.wait_idle(&id).await;
    let (status, body) = c.post(&id, "now idle", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["disposition"]["type"], "started", "{body}");
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert!(
        entries
            .iter()
            .all(|e| e["content"] != "let me in" && e["content"] != "me too"),
        "rejected messages are never stored"
    );
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[1]["status"], "completed");
    assert_eq!(turns[1]["id"], body["disposition"]["turn_id"]);
    assert_eq!(
        assistant_of(&entries, &turns[1]["id"])[0]["content"],
        "echo: now idle"
    );
    app.stop().await;
}

/// A queue of one says so in the singular.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_of_one_says_message() {
    let app = spawn_app(|cfg| cfg.queue_capacity = 1).await;
    let c = &app.client;
    let s = c.create_session(json!({"message": "/hang"})).await;
    let id = sid(&s);
    wait_running(c, &id).await;
    let (status, body) = c.post(&id, "a", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = c.post(&id, "b", None, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        body["error"]["message"], "the session already has 1 message waiting",
        "{body}"
    );
    c.cancel(&id).await;
    app.stop().await;
}

/// The queue's capacity counts messages waiting for a turn; past it a
/// message is refused (`429 queue_full`) and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_full_past_capacity_stores_nothing() {
    let app = spawn_app(|cfg| cfg.queue_capacity = 2).await;
    let c = &app.client;
    let s = c.create_session(json!({"message": "/hang"})).await;
    let id = sid(&s);
    let t1 = wait_running(c, &id).await;
    for m in ["a", "b"] {
        let (status, body) = c.post(&id, m, None, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, before) = c.session(&id).await;
    for p in [None, Some("merge")] {
        let (status, body) = c.post(&id, "one too many", p, None).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"]["code"], "queue_full", "{body}");
        assert_eq!(
            body["error"]["message"], "the session already has 2 messages waiting",
            "{body}"
        );
    }
    let (_, after) = c.session(&id).await;
    assert_eq!(before["last_seq"], after["last_seq"]);
    assert_eq!(after["queued"], 2);
    let (status, body) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["turn_id"], t1["id"]);
    // Once "a" runs, one place is free again.
    wait_turn(c, &id, |t| t["id"] != t1["id"]).await;
    let (status, body) = c.post(&id, "c", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 4);
    assert!(entries.iter().all(|e| e["content"] != "one too many"));
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 6. Crash recovery

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_turn_then_restart_ends_it_lost_and_runs_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let srv = spawn_binary(&db, &[]).await;
    let c = srv.client.clone();
    let s = c.create_session(json!({"message": "/hang stuck"})).await;
    let id = sid(&s);
    let hung = wait_running(&c, &id).await;
    let mut queued = Vec::new();
    for (i, m) in ["first", "second", "third"].iter().enumerate() {
        let (status, body) = c.post(&id, m, None, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["disposition"]["type"], "queued");
        assert_eq!(body["disposition"]["position"], i as u64 + 1);
        queued.push(seq_of(&body["entry"]));
    }
    srv.kill9().await;

    let srv = spawn_binary(&db, &[]).await;
    let c = srv.client.clone();
    c.wait_idle(&id).await;
    let (entries, turns) = check(&c, &id).await;
    assert_eq!(turns.len(), 4, "{turns:#?}");
    assert_eq!(turns[0]["id"], hung["id"]);
    assert_eq!(turns[0]["status"], "lost", "{}", turns[0]);
    assert!(
        turns[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("lost"),
        "{}",
        turns[0]
    );
    for (t, seq) in turns[1..].iter().zip(&queued) {
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["input"], json!({"from": seq, "to": seq}));
    }
    // Nothing duplicated: 4 user messages, 3 replies, each once.
    assert_eq!(entries.iter().filter(|e| is_user(e)).count(), 4);
    let replies: Vec<&Value> = entries
        .iter()
        .filter(|e| e["role"] == "assistant")
        .collect();
    let texts: Vec<&str> = replies
        .iter()
        .map(|r| r["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["echo: first", "echo: second", "echo: third"]);
    assert_eq!(
        entries.iter().filter(|e| e["type"] == "turn_ended").count(),
        4,
        "one end per turn"
    );
    assert!(srv.terminate().await, "clean exit after the restart");
}

// ---------------------------------------------------------------------------
// 7. Fencing

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_epoch_cannot_append() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        lease_ttl: Duration::from_millis(200),
        ..StoreConfig::default()
    };
    let store = SqlStore::open_sqlite(&dir.path().join("baton.db"), cfg)
        .await
        .unwrap();
    let created = store
        .create_session(CreateSession {
            owner: "local".into(),
            agent: "demo".into(),
            policy: Policy::Queue,
            metadata: json!({}),
            idempotency_key: None,
            fingerprint: String::new(),
            message: Some("hello".into()),
            permission: None,
            node: "node-a".into(),
            debounce_ms: 0,
        })
        .await
        .unwrap();
    let id = created.session.id;
    let lease = created.lease.expect("a started turn comes with the lease");
    let todo = store
        .next_turn(&lease)
        .await
        .unwrap()
        .expect("a turn to run");
    let turn = todo.turn.id;
    assert_eq!(store.begin_turn(&lease, turn).await.unwrap(), Begin::Run);
    // While the lease is valid the worker writes.
    store
        .append_output(
            &lease,
            turn,
            vec![NewEntry::assistant_message(turn, "partial")],
        )
        .await
        .unwrap();

    // The worker pauses past its lease; another node takes over.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let recovered = store.recover("other-node", false).await.unwrap();
    assert_eq!(recovered.len(), 1);
    let new_lease = recovered[0].lease.clone();
    assert_eq!(new_lease.owner, "other-node");
    assert!(new_lease.epoch > lease.epoch);
    let turns = store.turns(id).await.unwrap();
    assert_eq!(turns[0].status, TurnStatus::Lost);
    let last = store.session("local", id).await.unwrap().last_seq;

    // The paused worker wakes up: every fenced write is refused.
    let late = store
        .append_output(
            &lease,
            turn,
            vec![NewEntry::assistant_message(turn, "zombie")],
        )
        .await;
    assert!(
        matches!(late, Err(StoreError::StaleEpoch { .. })),
        "{late:?}"
    );
    let late = store
        .end_turn(
            &lease,
            turn,
            TurnStatus::Completed,
            None,
            vec![NewEntry::turn_ended(turn, TurnStatus::Completed, None)],
        )
        .await;
    assert!(
        matches!(late, Err(StoreError::StaleEpoch { .. })),
        "{late:?}"
    );
    assert!(matches!(
        store.renew_lease(&lease).await,
        Err(StoreError::StaleEpoch { .. })
    ));
    assert!(matches!(
        store.release_lease(&lease, true).await,
        Err(StoreError::StaleEpoch { .. })
    ));
    assert_eq!(store.session("local", id).await.unwrap().last_seq, last);
    assert_eq!(store.turns(id).await.unwrap()[0].status, TurnStatus::Lost);

    // The new holder finds nothing to run and lets go.
    assert!(store.next_turn(&new_lease).await.unwrap().is_none());
    assert!(store.release_lease(&new_lease, false).await.unwrap());
    let page = store.entries(id, 0, 100).await.unwrap();
    let log: Vec<Value> = page
        .entries
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    let turns: Vec<Value> = store
        .turns(id)
        .await
        .unwrap()
        .iter()
        .map(|t| serde_json::to_value(t).unwrap())
        .collect();
    check_transcript(&log, &turns);
    assert!(log.iter().all(|e| e["content"] != "zombie"));
}

/// The engine-level variant: another node takes the lease of a running turn
/// (simulated by rewriting the lease row, as a takeover would). The worker's
/// next renewal fails with a stale epoch and it stops at once: its agent's
/// stream of deltas ends, and it writes nothing. When the thief's lease
/// expires, the sweeper ends the turn `lost` and the queue goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_whose_lease_renewal_fails_stops() {
    use sqlx::Connection;
    let app = spawn_app(|cfg| {
        cfg.lease_ms = 2_000;
        cfg.heartbeat_ms = 50;
        cfg.sweep_ms = 100;
    })
    .await;
    let c = &app.client;
    let s = c.create_session(json!({})).await;
    let id = sid(&s);
    let mut sse = c.open_stream(&id, None).await;
    // ~80 words over 8 s: a delta every ~100 ms for as long as the worker runs.
    let words: Vec<String> = (0..80).map(|i| format!("w{i}")).collect();
    let (status, first) = c
        .post(&id, &format!("/sleep 8000 {}", words.join(" ")), None, None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let t1 = first["disposition"]["turn_id"].clone();
    let (status, queued) = c.post(&id, "after the takeover", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{queued}");
    assert_eq!(queued["disposition"]["type"], "queued");
    let mut deltas = 0;
    while deltas < 3 {
        let ev = sse.next().await.expect("stream");
        if ev.event == "delta" && ev.data["turn_id"] == t1 {
            deltas += 1;
        }
    }

    // Steal the lease for 2.5 s.
    let url = format!("sqlite://{}", app.db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let stolen = Instant::now();
    let done = sqlx::query(
        "UPDATE sessions SET lease_owner = 'thief', lease_epoch = lease_epoch + 1, \
         lease_expires_at = $1 WHERE id = $2",
    )
    .bind(now + 2_500_000)
    .bind(id.as_str())
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
    let (_, during) = c.session(&id).await;

    // Deltas already in flight may arrive for a moment; then none.
    let quiet_from = stolen + Duration::from_millis(700);
    let until = stolen + Duration::from_millis(2_200);
    let mut late = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, sse.next()).await {
        if Instant::now() >= quiet_from && ev.data["turn_id"] == t1 {
            late.push(ev);
        }
    }
    assert!(late.is_empty(), "the fenced worker kept going: {late:#?}");
    let (_, still) = c.session(&id).await;
    assert_eq!(
        during["last_seq"], still["last_seq"],
        "the fenced worker wrote nothing"
    );

    // The thief vanishes: its lease expires and the sweeper recovers.
    sse.until_entry(|e| e["type"] == "turn_ended" && e["turn_id"] != t1)
        .await;
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["status"], "lost", "{}", turns[0]);
    assert!(assistant_of(&entries, &t1).is_empty());
    assert_eq!(turns[1]["status"], "completed");
    assert_eq!(
        assistant_of(&entries, &turns[1]["id"])[0]["content"],
        "echo: after the takeover"
    );
    conn.close().await.unwrap();
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 8. Timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turn_timeout_ends_timed_out() {
    let app = spawn_app(|cfg| {
        cfg.turn_timeout_ms = 1_000;
        cfg.cancel_drain_ms = 300;
    })
    .await;
    let c = &app.client;
    let began = Instant::now();
    let s = c.create_session(json!({"message": "/hang forever"})).await;
    let id = sid(&s);
    let t1 = wait_turn(c, &id, |_| true).await;
    let ended = wait_ended(c, &id, t1["id"].as_str().unwrap()).await;
    assert!(began.elapsed() >= Duration::from_millis(1_000));
    assert_eq!(ended["status"], "timed_out", "{ended}");
    assert_eq!(ended["reason"], "turn timed out");

    let (status, body) = c.post(&id, "quick one", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[1]["status"], "completed");
    assert!(assistant_of(&entries, &t1["id"]).is_empty());
    assert_eq!(
        assistant_of(&entries, &turns[1]["id"])[0]["content"],
        "echo: quick one"
    );

    // An agent that ignores the cancel a timeout sends is forced.
    let s = c
        .create_session(json!({"message": "/stubborn forever"}))
        .await;
    let id = sid(&s);
    let t1 = wait_turn(c, &id, |_| true).await;
    let ended = wait_ended(c, &id, t1["id"].as_str().unwrap()).await;
    assert_eq!(ended["status"], "timed_out", "{ended}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("turn timed out") && reason.contains("forced"),
        "{reason:?}"
    );
    check(c, &id).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 9. Failure

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_directive_ends_failed_and_queue_continues() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    // A first turn holds the session so that both later messages queue.
    let s = c
        .create_session(json!({"message": "/sleep 3000 warm up"}))
        .await;
    let id = sid(&s);
    let (status, fail) = c.post(&id, "/fail on purpose", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{fail}");
    assert_eq!(fail["disposition"]["type"], "queued", "{fail}");
    let (status, after) = c.post(&id, "still here", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{after}");
    assert_eq!(
        after["disposition"],
        json!({"type": "queued", "position": 2})
    );
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 3);
    assert_eq!(turns[0]["status"], "completed");
    assert_eq!(turns[1]["status"], "failed", "{}", turns[1]);
    assert!(
        turns[1]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("/fail"),
        "{}",
        turns[1]
    );
    let fseq = seq_of(&fail["entry"]);
    assert_eq!(turns[1]["input"], json!({"from": fseq, "to": fseq}));
    assert!(
        of_turn(&entries, &turns[1]["id"])
            .iter()
            .all(|e| e["type"] == "turn_started" || e["type"] == "turn_ended"),
        "a failed turn stores no output"
    );
    assert_eq!(turns[2]["status"], "completed");
    assert_eq!(
        assistant_of(&entries, &turns[2]["id"])[0]["content"],
        "echo: still here"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 10. Graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_cancels_running_turns_with_reason_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let srv = spawn_binary(
        &db,
        &["--cancel-drain-ms", "300", "--shutdown-grace-ms", "0"],
    )
    .await;
    let c = srv.client.clone();
    let s = c
        .create_session(json!({"message": "/hang through shutdown"}))
        .await;
    let id = sid(&s);
    let hung = wait_running(&c, &id).await;
    // Messages waiting behind it are not lost: they run after the restart.
    let mut queued = Vec::new();
    for m in ["later one", "later two"] {
        let (status, body) = c.post(&id, m, None, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["disposition"]["type"], "queued", "{body}");
        queued.push(seq_of(&body["entry"]));
    }
    // An agent that ignores cancel is forced at the drain deadline.
    let st = c.create_session(json!({"message": "/stubborn no"})).await;
    let stubborn_id = sid(&st);
    let stubborn = wait_running(&c, &stubborn_id).await;
    assert!(srv.terminate().await, "SIGTERM exits 0");

    let srv = spawn_binary(&db, &[]).await;
    let c = srv.client.clone();
    let (_, turns) = check(&c, &stubborn_id).await;
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0]["id"], stubborn["id"]);
    assert_eq!(turns[0]["status"], "cancelled", "{}", turns[0]);
    let reason = turns[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("shutdown") && reason.contains("forced"),
        "{reason:?}"
    );

    c.wait_idle(&id).await;
    let (entries, turns) = check(&c, &id).await;
    assert_eq!(turns.len(), 3, "{turns:#?}");
    assert_eq!(turns[0]["id"], hung["id"]);
    assert_eq!(turns[0]["status"], "cancelled", "{}", turns[0]);
    assert_eq!(turns[0]["reason"], "shutdown");
    assert!(assistant_of(&entries, &hung["id"]).is_empty());
    for (t, seq) in turns[1..].iter().zip(&queued) {
        assert_eq!(t["input"], json!({"from": seq, "to": seq}));
        assert_eq!(t["status"], "completed", "{t}");
    }
    assert_each_echoed_once(
        &entries
            .iter()
            .filter(|e| e["content"] != "/hang through shutdown")
            .cloned()
            .collect::<Vec<_>>(),
        &turns,
    );
    // The restarted server works.
    let (status, body) = c.post(&id, "back again", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["disposition"]["type"], "started");
    c.wait_idle(&id).await;
    check(&c, &id).await;
    assert!(srv.terminate().await);
}

// ---------------------------------------------------------------------------
// 11. Export

async fn export(c: &Client, id: &str) -> Vec<Value> {
    let (status, body) = c
        .send(c.req(
            Method::GET,
            &format!("/v1/sessions/{id}/export?format=openai"),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["messages"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_openai_merges_and_orders() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;

    // Turns one after the other: a strict user/assistant alternation.
    let s = c.create_session(json!({"message": "one"})).await;
    let id = sid(&s);
    c.wait_idle(&id).await;
    for m in ["/sleep 50 two", "three"] {
        let (status, body) = c.post(&id, m, None, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        c.wait_idle(&id).await;
    }
    let (entries, _) = check(c, &id).await;
    let messages = export(c, &id).await;
    let expected: Vec<Value> = entries
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| json!({"role": e["role"], "content": e["content"]}))
        .collect();
    assert_eq!(messages, expected);
    let pairs: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("user", "one"),
            ("assistant", "echo: one"),
            ("user", "/sleep 50 two"),
            ("assistant", "echo: two"),
            ("user", "three"),
            ("assistant", "echo: three"),
        ]
    );

    // Queued and merged messages are stored when they arrive, mid-turn; the
    // export puts each where the turn that consumed it starts (what the
    // agent saw), so the transcript alternates as the turns did.
    let s = c.create_session(json!({"message": "/sleep 3000 a"})).await;
    let id = sid(&s);
    assert_eq!(c.post(&id, "b", None, None).await.0, StatusCode::CREATED);
    assert_eq!(
        c.post(&id, "c", Some("merge"), None).await.0,
        StatusCode::CREATED
    );
    c.wait_idle(&id).await;
    let (status, body) = c.post(&id, "d", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 3, "a, then b+c merged, then d: {turns:#?}");
    let messages = export(c, &id).await;
    baton_core::export::check::openai(&messages).expect("valid for OpenAI");
    assert_eq!(
        entries.iter().filter(|e| e["type"] == "message").count(),
        7,
        "four user messages, three replies (b and c share one)"
    );
    let text: Vec<&str> = messages
        .iter()
        .flat_map(|m| m["content"].as_str().unwrap().lines())
        .collect();
    assert_eq!(
        text,
        [
            "/sleep 3000 a",
            "echo: a",
            "b",
            "c",
            "echo: b",
            "echo: c",
            "d",
            "echo: d"
        ]
    );
    assert_eq!(messages.last().unwrap()["role"], "assistant");

    for bad in ["xml", "OpenAI", ""] {
        let (status, err) = c
            .send(c.req(
                Method::GET,
                &format!("/v1/sessions/{id}/export?format={bad}"),
            ))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "format={bad}: {err}");
        assert_eq!(err["error"]["code"], "invalid_request");
    }
    app.stop().await;
}

/// The demo agent's `/tool`: thought, text, a call and its result, text;
/// thoughts only with `include_thoughts`; ranges; bad parameters are `400`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_formats_ranges_and_thoughts() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = sid(&c.create_session(json!({"message": "/tool rust"})).await);
    c.wait_idle(&id).await;
    let (entries, _) = check(c, &id).await;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "message",
            "turn_started",
            "thought",
            "message",
            "tool_call",
            "tool_result",
            "message",
            "turn_ended"
        ]
    );
    let get = |q: String| c.send(c.req(Method::GET, &format!("/v1/sessions/{id}/export?{q}")));
    let (status, body) = get("format=anthropic".into()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    baton_core::export::check::anthropic(&body).expect("valid for Anthropic");
    let blocks: Vec<Vec<&str>> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["type"].as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        blocks,
        [
            vec!["text"],
            vec!["text", "tool_use"],
            vec!["tool_result"],
            vec!["text"]
        ]
    );
    let openai = export(c, &id).await;
    assert!(
        !openai
            .iter()
            .any(|m| m["content"].to_string().contains("<thinking>")),
        "no thoughts unless asked: {openai:#?}"
    );
    let (_, with) = get("format=openai&include_thoughts=true".into()).await;
    baton_core::export::check::openai(with["messages"].as_array().unwrap()).expect("valid");
    assert!(with["messages"][1]["content"]
        .as_str()
        .unwrap()
        .starts_with("<thinking>"));
    // A range: the user message and the text before the call (seq 1..=4).
    let (_, part) = get("upto=4".into()).await;
    assert_eq!(
        part["messages"],
        json!([
            {"role": "user", "content": "/tool rust"},
            {"role": "assistant", "content": "Let me look that up."}
        ])
    );
    let (_, tail) = get("format=anthropic&after=5".into()).await;
    baton_core::export::check::anthropic(&tail).expect("a range stays valid");
    for bad in [
        "after=-1",
        "upto=x",
        "after=5&upto=2",
        "include_running=yes",
        "include_thoughts=1",
    ] {
        let (status, err) = get(bad.into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
        assert_eq!(err["error"]["code"], "invalid_request");
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 12. Delete

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_cancels_and_removes() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let other = c
        .create_session(json!({"message": "/sleep 500 bystander"}))
        .await;
    let other = sid(&other);
    let s = c.create_session(json!({"message": "/hang doomed"})).await;
    let id = sid(&s);
    wait_running(c, &id).await;
    assert_eq!(delete(c, &id).await, StatusCode::NO_CONTENT);
    let (status, body) = c.session(&id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = c
        .send(c.req(Method::GET, &format!("/v1/sessions/{id}/entries")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        c.post(&id, "hello?", None, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(delete(c, &id).await, StatusCode::NOT_FOUND);

    // The server keeps working for other sessions.
    c.wait_idle(&other).await;
    let (entries, _) = check(c, &other).await;
    assert!(entries.iter().any(|e| e["content"] == "echo: bystander"));
    let fresh = c.create_session(json!({"message": "life goes on"})).await;
    let fresh = sid(&fresh);
    c.wait_idle(&fresh).await;
    let (entries, _) = check(c, &fresh).await;
    assert!(entries.iter().any(|e| e["content"] == "echo: life goes on"));
    let (status, list) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["id"] != id.as_str()));
    app.stop().await;
}

/// Regression: turns shorter than the heartbeat, back to back for longer than
/// the lease, must not lose the lease (each turn's start and end extend it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn back_to_back_short_turns_keep_their_lease() {
    let app = common::spawn_app(|cfg| {
        cfg.lease_ms = 1_200;
        cfg.heartbeat_ms = 1_000;
        cfg.sweep_ms = 100;
        cfg.queue_capacity = 100;
    })
    .await;
    let c = &app.client;
    let id = c.create_session(serde_json::json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..12 {
        let (status, v) = c
            .post(&id, &format!("/sleep 250 short {i}"), None, None)
            .await;
        assert_eq!(status, 201, "{v}");
    }
    c.wait_idle(&id).await;
    let turns = c.turns(&id).await;
    assert_eq!(turns.len(), 12);
    for t in &turns {
        assert_eq!(t["status"], "completed", "a live turn lost its lease: {t}");
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Steering and debounce

/// The lines of every assistant message of `turn`.
fn reply_lines(entries: &[Value], turn: &Value) -> Vec<String> {
    assistant_of(entries, turn)
        .iter()
        .flat_map(|e| {
            e["content"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A message steered into a running `/sleep` turn joins it: one turn, whose
/// reply echoes it on its own line after the steered entry's seq, and whose
/// record lists it as input; a retry answers `200` with the same entry and
/// disposition. `GET /v1/agents` says the demo agent takes mid-turn input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_steered_message_joins_the_running_turn() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let (status, agents) = c.send(c.req(Method::GET, "/v1/agents")).await;
    assert_eq!(status, StatusCode::OK);
    let demo = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "demo")
        .cloned()
        .unwrap();
    assert_eq!(demo["mid_turn_input"], true, "{demo}");
    let (status, doc) = c.send(c.req(Method::GET, "/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    let schemas = &doc["components"]["schemas"];
    for (schema, word) in [
        ("Policy", "steer"),
        ("DispositionType", "steered"),
        ("DispositionType", "pending"),
    ] {
        assert!(
            schemas[schema].to_string().contains(&format!("\"{word}\"")),
            "the API document's {schema} has {word}: {}",
            schemas[schema]
        );
    }

    let s = c
        .create_session(json!({"message": "/sleep 3000 a long answer"}))
        .await;
    let id = sid(&s);
    let turn = s["turn_id"].clone();
    let mut stream = c.open_stream(&id, None).await;
    stream.until_delta().await;
    let (status, v) = c
        .post(&id, "also check the tests", Some("steer"), Some("steer-1"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["disposition"],
        json!({"type": "steered", "turn_id": turn}),
        "{v}"
    );
    let steered = seq_of(&v["entry"]);
    let (status, again) = c
        .post(&id, "also check the tests", Some("steer"), Some("steer-1"))
        .await;
    assert_eq!(status, StatusCode::OK, "a retry: {again}");
    assert_eq!(again["entry"], v["entry"]);
    assert_eq!(again["disposition"], v["disposition"]);

    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(
        turns.len(),
        1,
        "the steered message joined the turn: {turns:#?}"
    );
    assert_eq!(turns[0]["status"], "completed");
    assert_eq!(turns[0]["input"], json!({"from": 1, "to": steered}));
    let lines = reply_lines(&entries, &turn);
    assert!(
        lines.iter().any(|l| l == "echo: also check the tests"),
        "the steered text is echoed on its own line: {lines:?}"
    );
    let reply = assistant_of(&entries, &turn)[0];
    assert!(
        seq_of(reply) > steered,
        "I5: the steered entry precedes the reply"
    );
    // The transcript replays to a model with the steered message before the
    // reply that answers it.
    let roles: Vec<(String, String)> = export(c, &id)
        .await
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].to_string(),
            )
        })
        .collect();
    let steer_at = roles
        .iter()
        .position(|(r, c)| r == "user" && c.contains("also check the tests"))
        .unwrap_or_else(|| panic!("the steered message is exported: {roles:?}"));
    let reply_at = roles
        .iter()
        .position(|(r, c)| r == "assistant" && c.contains("echo: also check the tests"))
        .unwrap_or_else(|| panic!("the reply is exported: {roles:?}"));
    assert!(steer_at < reply_at, "{roles:?}");
    app.stop().await;
}

/// `steer` on an idle session starts a turn; a session whose default policy
/// is `steer` steers a message posted without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steer_starts_an_idle_session_and_can_be_the_default() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = sid(&c.create_session(json!({})).await);
    let (status, v) = c.post(&id, "hello", Some("steer"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["disposition"]["type"], "started", "{v}");
    c.wait_idle(&id).await;
    let (entries, _) = check(c, &id).await;
    assert!(entries.iter().any(|e| e["content"] == "echo: hello"));

    let s = c
        .create_session(json!({"policy": "steer", "message": "/sleep 3000 first"}))
        .await;
    assert_eq!(s["policy"], "steer");
    let id = sid(&s);
    wait_running(c, &id).await;
    let (status, v) = c.post(&id, "second", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["disposition"]["type"], "steered", "{v}");
    assert_eq!(v["disposition"]["turn_id"], s["turn_id"]);
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 1, "{turns:#?}");
    assert!(reply_lines(&entries, &s["turn_id"]).contains(&"echo: second".to_owned()));
    app.stop().await;
}

/// The boundary, with real concurrency: steered messages keep arriving on
/// several sessions while their turns end (turns of a few milliseconds, and
/// posts racing them from two tasks per session). Each message is consumed
/// by exactly one turn — the one it was steered to, or the next — and the
/// agent saw it exactly once, in the turn whose record lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steers_racing_the_end_of_turns_are_each_consumed_once() {
    let app = spawn_app(|cfg| cfg.queue_capacity = 1_000).await;
    let c = &app.client;
    let sessions: Vec<String> = join_all((0..6).map(|i| async move {
        sid(&c
            .create_session(json!({"message": format!("/sleep 200 start {i}")}))
            .await)
    }))
    .await;
    let posts = sessions.iter().enumerate().flat_map(|(s, id)| {
        (0..2).map(move |task| async move {
            let mut out = Vec::new();
            for i in 0..15 {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..12))).await;
                let content = format!("s{s} t{task} m{i}");
                let (status, v) = c.post(id, &content, Some("steer"), None).await;
                assert_eq!(status, StatusCode::CREATED, "{v}");
                out.push(v);
            }
            (id.clone(), out)
        })
    });
    let posted = join_all(posts).await;
    let mut took_steered = 0;
    for id in &sessions {
        c.wait_idle(id).await;
        let (entries, turns) = check(c, id).await;
        let order: Vec<&Value> = turns.iter().map(|t| &t["id"]).collect();
        for (_, results) in posted.iter().filter(|(s, _)| s == id) {
            for v in results {
                let seq = seq_of(&v["entry"]);
                let consumer = turns
                    .iter()
                    .position(|t| {
                        t["input"]["from"].as_u64().unwrap() <= seq
                            && seq <= t["input"]["to"].as_u64().unwrap()
                    })
                    .unwrap_or_else(|| panic!("no turn consumed seq {seq}"));
                let d = &v["disposition"];
                match d["type"].as_str() {
                    Some("steered") => {
                        let to = order
                            .iter()
                            .position(|t| **t == d["turn_id"])
                            .expect("the turn it was steered to");
                        assert!(
                            consumer == to || consumer == to + 1,
                            "seq {seq} steered to turn #{to} ran in turn #{consumer}"
                        );
                        took_steered += usize::from(consumer == to);
                    }
                    Some("started" | "queued") => {}
                    other => panic!("unexpected disposition {other:?}: {v}"),
                }
            }
        }
        // What each turn's agent saw is exactly what the turn consumed: the
        // messages it took mid-turn each echoed on a line of their own, and
        // (around those lines, which may split them at a word) the echoes
        // of its first input. So every message was seen once, by the turn
        // whose record lists it.
        for t in &turns {
            let started = entries
                .iter()
                .find(|e| e["type"] == "turn_started" && e["turn_id"] == t["id"])
                .unwrap();
            let (from, first_to, to) = (
                t["input"]["from"].as_u64().unwrap(),
                started["input"]["to"].as_u64().unwrap(),
                t["input"]["to"].as_u64().unwrap(),
            );
            // The demo agent's echo leaves a `/sleep MS` directive out.
            let echo = |e: &&Value| {
                let content = e["content"].as_str().unwrap();
                let text = content
                    .strip_prefix("/sleep ")
                    .and_then(|r| r.split_once(' '))
                    .map_or(content, |(_, rest)| rest);
                format!("echo: {text}")
            };
            let users = || entries.iter().filter(|e| is_user(e));
            let mut lines = reply_lines(&entries, &t["id"]);
            for taken in users().filter(|e| (first_to + 1..=to).contains(&seq_of(e))) {
                let line = echo(&taken);
                let at = lines.iter().position(|l| *l == line).unwrap_or_else(|| {
                    panic!(
                        "turn {} took {line:?} but did not echo it: {lines:?}",
                        t["id"]
                    )
                });
                lines.remove(at);
            }
            let words: Vec<String> = lines
                .iter()
                .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let want: Vec<String> = users()
                .filter(|e| (from..=first_to).contains(&seq_of(e)))
                .flat_map(|e| {
                    echo(&e)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(
                words,
                want,
                "turn {} echoed something other than its input: {:?}",
                t["id"],
                reply_lines(&entries, &t["id"])
            );
        }
    }
    assert!(
        took_steered > 0,
        "no steered message joined its turn: the race was not run"
    );
    app.stop().await;
}

/// Debounce: five messages 100 ms apart on a session with `debounce_ms` 400
/// are each `pending` (with the start moving later), then run as one turn
/// with all five, which starts once the window closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_within_the_debounce_window_is_one_turn() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    for bad in [
        json!({"debounce_ms": 3_600_001}),
        json!({"debounce_ms": -1}),
    ] {
        let (status, v) = c.send(c.req(Method::POST, "/v1/sessions").json(&bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    }
    let (_, list) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(
        list["sessions"],
        json!([]),
        "a refused create stores nothing"
    );
    // A window far wider than the 100 ms between posts, so a loaded
    // machine's stall does not close it early.
    let s = c.create_session(json!({"debounce_ms": 2000})).await;
    assert_eq!(s["debounce_ms"], 2000, "{s}");
    let id = sid(&s);
    let mut untils = Vec::new();
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, v) = c.post(&id, &format!("part {i}"), None, None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["disposition"]["type"], "pending", "{v}");
        let until = v["disposition"]["until"].as_str().unwrap().to_owned();
        assert!(untils.last().is_none_or(|u: &String| *u < until));
        untils.push(until);
    }
    let (_, view) = c.session(&id).await;
    assert_eq!(view["status"], "idle", "{view}");
    assert_eq!(view["queued"], 5, "{view}");
    c.wait_idle(&id).await;
    let (entries, turns) = check(c, &id).await;
    assert_eq!(turns.len(), 1, "{turns:#?}");
    assert_eq!(turns[0]["input"], json!({"from": 1, "to": 5}));
    assert!(
        turns[0]["started_at"].as_str().unwrap() >= untils[4].as_str(),
        "the turn started before its window closed: {turns:#?} {untils:?}"
    );
    let lines = reply_lines(&entries, &turns[0]["id"]);
    assert_eq!(
        lines,
        (0..5)
            .map(|i| format!("echo: part {i}"))
            .collect::<Vec<_>>()
    );
    app.stop().await;
}

/// A debounce window is stored: a server killed inside it (SIGKILL) and
/// started again still starts that turn, with every message, once it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debounce_window_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let server = spawn_binary(&db, &["--debounce-ms", "3000"]).await;
    let c = server.client.clone();
    let s = c.create_session(json!({"message": "one"})).await;
    assert_eq!(s["debounce_ms"], 3000, "the server's default: {s}");
    assert_eq!(s["status"], "idle", "{s}");
    let id = sid(&s);
    let (status, v) = c.post(&id, "two", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["disposition"]["type"], "pending", "{v}");
    let until = v["disposition"]["until"].as_str().unwrap().to_owned();
    server.kill9().await;

    let server = spawn_binary(&db, &[]).await;
    let c = server.client.clone();
    c.wait_idle(&id).await;
    let (entries, turns) = check(&c, &id).await;
    assert_eq!(turns.len(), 1, "{turns:#?}");
    assert_eq!(turns[0]["input"], json!({"from": 1, "to": 2}));
    assert!(turns[0]["started_at"].as_str().unwrap() >= until.as_str());
    assert_eq!(
        reply_lines(&entries, &turns[0]["id"]),
        vec!["echo: one".to_owned(), "echo: two".to_owned()]
    );
    assert!(server.terminate().await);
}
