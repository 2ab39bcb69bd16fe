//! The agent boundary, end to end with the demo agent: a cancel names its
//! turn, a deploy lets answers finish, output has a cap, a delete waits for
//! its turn's drain.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{spawn_app, spawn_binary, Client, PATIENCE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

async fn turn(c: &Client, id: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let turns = c.turns(id).await;
        if let Some(t) = turns.get(n).filter(|t| pred(t)) {
            return t.clone();
        }
        assert!(
            Instant::now() < deadline,
            "turn {n} never matched: {turns:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn running(c: &Client, id: &str, n: usize) -> Value {
    turn(c, id, n, |t| t["status"] == "running").await
}

async fn ended(c: &Client, id: &str, n: usize) -> Value {
    turn(c, id, n, |t| t["ended_at"].is_string()).await
}

async fn cancel_turn(c: &Client, id: &str, turn: &Value) -> (StatusCode, Value) {
    c.send(
        c.req(Method::POST, &format!("/v1/sessions/{id}/cancel"))
            .json(&json!({ "turn_id": turn })),
    )
    .await
}

fn replies(entries: &[Value]) -> Vec<&str> {
    entries
        .iter()
        .filter(|e| e["role"] == "assistant")
        .map(|e| e["content"].as_str().unwrap())
        .collect()
}

/// A client that saw turn A running cancels it after A ended and B
/// started: B goes on, and the answer says nothing was cancelled and which
/// turn is active.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_cancel_cancels_nothing_and_says_so() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = c
        .create_session_id(json!({"message": "/sleep 200 first"}))
        .await;
    let a = running(c, &id, 0).await;
    c.post(&id, "/hang second", None, None).await;
    ended(c, &id, 0).await;
    let b = running(c, &id, 1).await;

    let (status, body) = cancel_turn(c, &id, &a["id"]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"turn_id": null, "cancelled": false, "active_turn_id": b["id"]})
    );
    // B was not touched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.turns(&id).await[1]["status"], "running");

    let (status, body) = cancel_turn(c, &id, &b["id"]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["turn_id"], b["id"]);
    assert_eq!(body["cancelled"], true);
    let t = ended(c, &id, 1).await;
    assert_eq!(t["status"], "cancelled");

    // Named turn on an idle session: nothing, and `active_turn_id` null.
    let (status, body) = cancel_turn(c, &id, &b["id"]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"turn_id": null, "cancelled": false, "active_turn_id": null})
    );
    // Bad bodies are 400 and cancel nothing.
    for bad in [json!({"turn_id": "nope"}), json!({"turn": 1}), json!([1])] {
        let (status, body) = c
            .send(
                c.req(Method::POST, &format!("/v1/sessions/{id}/cancel"))
                    .json(&bad),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
    }
    app.stop().await;
}

/// Output past `--max-output-bytes` ends the turn `failed`, stores nothing
/// of it, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_past_the_cap_fails_the_turn_and_stores_nothing_of_it() {
    let app = spawn_app(|cfg| cfg.max_output_bytes = 1_000).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "/big 5000"})).await;
    c.post(&id, "small enough", None, None).await;
    let t = ended(c, &id, 0).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("exceeded the limit of 1000 bytes"),
        "{t}"
    );
    let t = ended(c, &id, 1).await;
    assert_eq!(t["status"], "completed", "{t}");
    let entries = c.entries(&id).await;
    assert_eq!(replies(&entries), vec!["echo: small enough"]);
    app.stop().await;
}

/// `DELETE` during a turn cancels it and waits for its drain: the turn's
/// end is recorded (and streamed) before the session goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_waits_for_the_turn_to_drain() {
    let app = spawn_app(|cfg| cfg.cancel_drain_ms = 300).await;
    let c = &app.client;
    for message in ["/hang doomed", "/stubborn doomed"] {
        let id = c.create_session_id(json!({})).await;
        let mut stream = c.open_stream(&id, None).await;
        c.post(&id, message, None, None).await;
        running(c, &id, 0).await;
        let (status, _) = c
            .send(c.req(Method::DELETE, &format!("/v1/sessions/{id}")))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let seen = stream.until_entry(|e| e["type"] == "turn_ended").await;
        let end = &seen.last().unwrap().data;
        assert_eq!(end["status"], "cancelled", "{message}: {end}");
        assert!(
            end["reason"]
                .as_str()
                .unwrap()
                .starts_with("session deleted"),
            "{end}"
        );
        assert_eq!(c.session(&id).await.0, StatusCode::NOT_FOUND);
    }
    app.stop().await;
}

/// A graceful stop lets a running turn finish within the grace; messages
/// waiting behind it are not started on this node, and run at the next
/// start, none recorded as a vanished worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_running_turns_finish_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let app = common::spawn_app_on(&db, |cfg| cfg.shutdown_grace_ms = 20_000).await;
    let c = app.client.clone();
    let id = c
        .create_session_id(json!({"message": "/sleep 1500 finishing"}))
        .await;
    running(&c, &id, 0).await;
    let (_, queued) = c.post(&id, "after the restart", None, None).await;
    assert_eq!(queued["disposition"]["type"], "queued");
    let mut stream = c.open_stream(&id, None).await;
    let stopping = tokio::spawn(app.stop());
    let seen = stream.until_entry(|e| e["type"] == "turn_ended").await;
    assert_eq!(seen.last().unwrap().data["status"], "completed");
    stopping.await.unwrap();
    // The stream ended once the node's turns were over, after their entries
    // (the next turn's `turn_started`, stored with the end, included).
    let mut rest = Vec::new();
    while let Some(ev) = stream.next().await {
        rest.push(ev.data["type"].clone());
    }
    assert!(rest.iter().all(|t| t == "turn_started"), "{rest:?}");

    let app = common::spawn_app_on(&db, |_| {}).await;
    let c = &app.client;
    let t = ended(c, &id, 1).await;
    assert_eq!(t["status"], "completed", "{t}");
    let turns = c.turns(&id).await;
    assert_eq!(turns[0]["status"], "completed");
    let entries = c.entries(&id).await;
    assert_eq!(
        replies(&entries),
        vec!["echo: finishing", "echo: after the restart"]
    );
    app.stop().await;
}

/// With no grace, shutdown cancels at once (reason `shutdown`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_without_grace_cancels_at_once() {
    let app = spawn_app(|cfg| cfg.shutdown_grace_ms = 0).await;
    let c = app.client.clone();
    let id = c
        .create_session_id(json!({"message": "/sleep 60000 never"}))
        .await;
    running(&c, &id, 0).await;
    let mut stream = c.open_stream(&id, None).await;
    let stopping = tokio::spawn(app.stop());
    let seen = stream.until_entry(|e| e["type"] == "turn_ended").await;
    let end = &seen.last().unwrap().data;
    assert_eq!(end["status"], "cancelled");
    assert_eq!(end["reason"], "shutdown");
    stopping.await.unwrap();
}

/// SIGTERM starts the grace; a second SIGTERM forces: the process exits
/// long before a 10-minute grace, its turn ended `cancelled` (shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sigterm_forces_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let mut srv = spawn_binary(&db, &["--shutdown-grace-ms", "600000"]).await;
    let c = srv.client.clone();
    let id = c.create_session_id(json!({"message": "/hang on"})).await;
    running(&c, &id, 0).await;
    srv.signal();
    // The first signal was taken once the server stops accepting.
    let deadline = Instant::now() + PATIENCE;
    while c
        .req(Method::GET, "/healthz")
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "the server kept accepting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.signal();
    assert!(srv.wait().await, "exits 0");

    let srv = spawn_binary(&db, &[]).await;
    let c = srv.client.clone();
    let t = ended(&c, &id, 0).await;
    assert_eq!(t["status"], "cancelled", "{t}");
    assert!(t["reason"].as_str().unwrap().starts_with("shutdown"), "{t}");
    assert!(srv.terminate().await);
}
