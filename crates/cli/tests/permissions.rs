//! Human in the loop, end to end on the demo agent (its `/ask` directive):
//! a permission request is stored, streamed and listed; the user answers it
//! exactly once; a request nobody answers times out; a cancel, an interrupt
//! or a restart closes it before the turn ends; bad answers write nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{spawn_app, spawn_binary, Client, PATIENCE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn answer(c: &Client, id: &str, request: &str, body: Value) -> (StatusCode, Value) {
    c.send(
        c.req(
            Method::POST,
            &format!("/v1/sessions/{id}/permissions/{request}"),
        )
        .json(&body),
    )
    .await
}

async fn pending(c: &Client, id: &str) -> Vec<Value> {
    let (status, v) = c
        .send(c.req(Method::GET, &format!("/v1/sessions/{id}/permissions")))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["permissions"].as_array().cloned().unwrap()
}

/// Waits for the session's one pending request; returns its entry.
async fn wait_request(c: &Client, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(r) = pending(c, id).await.into_iter().next() {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no permission request came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn request_id(request: &Value) -> String {
    request["permission"]["request_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn of_kind<'a>(entries: &'a [Value], kind: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["type"] == kind).collect()
}

fn reply(entries: &[Value]) -> String {
    entries
        .iter()
        .rfind(|e| e["role"] == "assistant")
        .map(|e| e["content"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn ended(c: &Client, id: &str) -> Value {
    c.wait_idle(id).await;
    c.turns(id).await.last().cloned().unwrap()
}

/// `ask`: the request is an entry of its own, streamed and listed; the
/// user's answer is stored as the decision, reaches the agent, and is the
/// one answer: a retry gets it back, another option gets `409` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_answers_a_request_and_the_agent_sees_the_choice() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({})).await;
    let mut stream = c.open_stream(&id, None).await;
    c.post(&id, "/ask tidy up", None, None).await;
    let streamed = stream
        .until_entry(|e| e["type"] == "permission_request")
        .await;
    let request = streamed.last().unwrap().data.clone();
    let rid = request_id(&request);
    let p = &request["permission"];
    assert_eq!(p["tool_call_id"], "demo-call-1");
    assert_eq!(p["title"], "pretend tool");
    let kinds: Vec<&str> = p["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["allow_once", "allow_always", "reject_once", "reject_always"]
    );
    assert!(request["turn_id"].is_string());

    // The turn waits, and the session shows what it waits for.
    let (_, session) = c.session(&id).await;
    assert_eq!(session["status"], "running");
    assert_eq!(session["pending_permissions"], json!([request.clone()]));
    assert_eq!(pending(c, &id).await, vec![request.clone()]);

    let (status, first) = answer(c, &id, &rid, json!({"option_id": "allow-always"})).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let decision = &first["decision"];
    assert_eq!(decision["type"], "permission_decision");
    assert_eq!(decision["turn_id"], request["turn_id"]);
    assert_eq!(decision["permission"]["request_id"], rid.as_str());
    assert_eq!(decision["permission"]["option_id"], "allow-always");
    assert_eq!(decision["permission"]["outcome"], "selected");
    assert_eq!(decision["permission"]["decided_by"], "user:local");
    let streamed = stream
        .until_entry(|e| e["type"] == "permission_decision")
        .await;
    assert_eq!(streamed.last().unwrap().data, *decision);

    let turn = ended(c, &id).await;
    assert_eq!(turn["status"], "completed");
    let entries = c.entries(&id).await;
    assert_eq!(reply(&entries), "echo: tidy up (permission: allow-always)");
    let shape: Vec<&str> = entries
        .iter()
        .filter(|e| e["turn_id"] == request["turn_id"])
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        shape,
        [
            "turn_started",
            "tool_call",
            "permission_request",
            "permission_decision",
            "tool_result",
            "message",
            "turn_ended"
        ]
    );
    assert!(pending(c, &id).await.is_empty());
    let (_, session) = c.session(&id).await;
    assert!(session.get("pending_permissions").is_none(), "{session}");

    // Exactly once: the same answer again is the original; another is 409.
    let (status, again) = answer(c, &id, &rid, json!({"option_id": "allow-always"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first);
    let (status, other) = answer(c, &id, &rid, json!({"option_id": "reject"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{other}");
    assert_eq!(other["error"]["code"], "permission_closed");
    assert_eq!(other["error"]["permission"]["state"], "answered");
    assert_eq!(other["error"]["permission"]["option_id"], "allow-always");
    assert_eq!(other["error"]["permission"]["decided_by"], "user:local");
    assert_eq!(
        other["error"]["permission"]["decision_seq"],
        decision["seq"]
    );
    assert_eq!(
        of_kind(&c.entries(&id).await, "permission_decision").len(),
        1
    );
    app.stop().await;
}

/// A reject reaches the agent like any choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_reaches_the_agent() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "/ask go"})).await;
    let rid = request_id(&wait_request(c, &id).await);
    let (status, _) = answer(c, &id, &rid, json!({"option_id": "reject"})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ended(c, &id).await["status"], "completed");
    let entries = c.entries(&id).await;
    assert_eq!(reply(&entries), "echo: go (permission: reject)");
    app.stop().await;
}

/// A session's own policy answers without asking, recorded as `policy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_policy_answers_without_asking() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    for (policy, chosen) in [("allow", "allow"), ("deny", "reject")] {
        let created = c
            .create_session(json!({"permission": policy, "message": "/ask go"}))
            .await;
        assert_eq!(created["permission"], policy);
        let id = created["id"].as_str().unwrap();
        assert_eq!(ended(c, id).await["status"], "completed");
        let entries = c.entries(id).await;
        assert_eq!(reply(&entries), format!("echo: go (permission: {chosen})"));
        let decisions = of_kind(&entries, "permission_decision");
        assert_eq!(decisions.len(), 1);
        assert_eq!(decisions[0]["permission"]["decided_by"], "policy");
        assert_eq!(decisions[0]["permission"]["option_id"], chosen);
    }
    let (status, v) = c
        .send(
            c.req(Method::POST, "/v1/sessions")
                .json(&json!({"permission": "sometimes"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    app.stop().await;
}

/// Unknown request `404`, unknown option `400`, malformed bodies `400`,
/// another owner `404`: the log does not move and the request still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_refused_and_write_nothing() {
    let app = spawn_app(|cfg| {
        cfg.tokens = vec![("alice".into(), "a".into()), ("bob".into(), "b".into())]
    })
    .await;
    let alice = app.client.with_token("a");
    let bob = app.client.with_token("b");
    let c = &alice;
    let id = c.create_session_id(json!({"message": "/ask go"})).await;
    let request = wait_request(c, &id).await;
    let rid = request_id(&request);
    let before = c.entries(&id).await;

    let (status, v) = answer(c, &id, "no-such-request", json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    let (status, v) = answer(c, &id, &rid, json!({"option_id": "maybe"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request");
    assert!(v["error"]["message"].as_str().unwrap().contains("maybe"));
    for body in [
        json!({}),
        json!({"option_id": 7}),
        json!({"option_id": ""}),
        json!({"option_id": "allow", "extra": true}),
        json!(["allow"]),
    ] {
        let (status, v) = answer(c, &id, &rid, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    let (status, v) = c
        .send(
            c.req(
                Method::POST,
                &format!("/v1/sessions/{id}/permissions/{rid}"),
            )
            .header("content-type", "application/json")
            .body("{\"option_id\": "),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // Another owner: as if neither the session nor the request existed.
    let (status, v) = answer(&bob, &id, &rid, json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, _) = bob
        .send(bob.req(Method::GET, &format!("/v1/sessions/{id}/permissions")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(c.entries(&id).await, before, "nothing was written");
    assert_eq!(pending(c, &id).await, vec![request]);
    let (status, _) = answer(c, &id, &rid, json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ended(c, &id).await["status"], "completed");
    app.stop().await;
}

/// Twenty clients answer one request at once, each with another option:
/// one decision is stored and reaches the agent; every other answer is
/// `409` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_answers_store_exactly_one_decision() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = c
        .create_session_id(json!({"message": "/ask 20 race"}))
        .await;
    let rid = request_id(&wait_request(c, &id).await);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (1..=20)
        .map(|i| {
            let (c, id, rid, barrier) = (c.clone(), id.clone(), rid.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let option = format!("option-{i}");
                let got = answer(&c, &id, &rid, json!({"option_id": option})).await;
                (option, got)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let winners: Vec<&String> = results
        .iter()
        .filter(|(_, (s, _))| *s == StatusCode::CREATED)
        .map(|(o, _)| o)
        .collect();
    assert_eq!(winners.len(), 1, "{results:#?}");
    let winner = winners[0];
    for (option, (status, body)) in &results {
        if option != winner {
            assert_eq!(*status, StatusCode::CONFLICT, "{option}: {body}");
            assert_eq!(body["error"]["permission"]["option_id"], winner.as_str());
        }
    }
    assert_eq!(ended(c, &id).await["status"], "completed");
    let entries = c.entries(&id).await;
    let decisions = of_kind(&entries, "permission_decision");
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0]["permission"]["option_id"], winner.as_str());
    assert_eq!(
        reply(&entries),
        format!("echo: race (permission: {winner})")
    );
    app.stop().await;
}

/// Nobody answers: past `--permission-timeout-ms` the request is answered
/// `cancelled` by `timeout` with a reason, and the turn goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_times_out_cancelled() {
    let app = spawn_app(|cfg| cfg.permission_timeout_ms = 200).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "/ask wait"})).await;
    let rid = request_id(&wait_request(c, &id).await);
    assert_eq!(ended(c, &id).await["status"], "completed");
    let entries = c.entries(&id).await;
    let decisions = of_kind(&entries, "permission_decision");
    assert_eq!(decisions.len(), 1);
    let d = decisions[0];
    assert_eq!(d["permission"]["outcome"], "cancelled");
    assert_eq!(d["permission"]["decided_by"], "timeout");
    assert!(d["permission"].get("option_id").is_none(), "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("200 ms"),
        "the reason names the timeout: {d}"
    );
    assert_eq!(reply(&entries), "echo: wait (permission: cancelled)");
    let (status, v) = answer(c, &id, &rid, json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["permission"]["state"], "cancelled");
    assert_eq!(v["error"]["permission"]["decided_by"], "timeout");
    app.stop().await;
}

/// The request of a cancelled turn is answered `cancelled` before the
/// turn ends; nothing of the turn follows its end; a late answer is `409`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_closes_the_waiting_request_first() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "/ask stop"})).await;
    let rid = request_id(&wait_request(c, &id).await);
    let (status, _) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let turn = ended(c, &id).await;
    assert_eq!(turn["status"], "cancelled");
    let entries = c.entries(&id).await;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["permission_decision", "tool_result", "turn_ended"],
        "{entries:#?}"
    );
    let d = of_kind(&entries, "permission_decision")[0];
    assert_eq!(d["permission"]["outcome"], "cancelled");
    assert_eq!(d["permission"]["decided_by"], "turn_end");
    assert!(
        d["reason"].as_str().unwrap().contains("cancelled by user"),
        "{d}"
    );
    assert!(
        reply(&entries).is_empty(),
        "a cancelled turn stores no reply"
    );
    let (status, v) = answer(c, &id, &rid, json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["permission"]["state"], "cancelled");
    assert!(pending(c, &id).await.is_empty());
    // The session goes on.
    c.post(&id, "next", None, None).await;
    c.wait_idle(&id).await;
    assert_eq!(reply(&c.entries(&id).await), "echo: next");
    app.stop().await;
}

/// A turn waiting for an answer is a running turn: `reject` refuses,
/// `queue` waits, `interrupt` cancels it (closing its request first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_policies_hold_while_a_turn_waits() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "/ask hold"})).await;
    let request = wait_request(c, &id).await;
    let (status, v) = c.post(&id, "no", Some("reject"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "session_busy");
    assert_eq!(v["error"]["turn_id"], request["turn_id"]);
    let (status, v) = c.post(&id, "later", Some("queue"), None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(v["disposition"]["type"], "queued");
    let (status, v) = c.post(&id, "now", Some("interrupt"), None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(v["disposition"]["type"], "interrupting");
    c.wait_idle(&id).await;
    let turns = c.turns(&id).await;
    assert_eq!(turns[0]["status"], "cancelled");
    assert_eq!(turns.len(), 2, "the interrupt took both waiting messages");
    let entries = c.entries(&id).await;
    let d = of_kind(&entries, "permission_decision")[0];
    assert_eq!(d["permission"]["outcome"], "cancelled");
    assert!(d["reason"].as_str().unwrap().contains("interrupted"), "{d}");
    assert_eq!(reply(&entries), "echo: later\necho: now");
    app.stop().await;
}

/// A server killed while a turn waits: at the next start the turn is
/// `lost` and its request is closed `cancelled` in the same recovery, never
/// left open; an answer then is `409`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_waiting_loses_the_turn_and_closes_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let first = spawn_binary(&db, &[]).await;
    let c = first.client.clone();
    let id = c.create_session_id(json!({"message": "/ask crash"})).await;
    let rid = request_id(&wait_request(&c, &id).await);
    first.kill9().await;

    let second = spawn_binary(&db, &[]).await;
    let c = second.client.clone();
    let turn = ended(&c, &id).await;
    assert_eq!(turn["status"], "lost");
    let entries = c.entries(&id).await;
    let tail: Vec<&str> = entries[entries.len() - 3..]
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        tail,
        ["permission_decision", "tool_result", "turn_ended"],
        "the decision, the result closing its call, the end: {entries:#?}"
    );
    let d = &entries[entries.len() - 3];
    assert_eq!(d["permission"]["request_id"], rid.as_str());
    assert_eq!(d["permission"]["outcome"], "cancelled");
    assert_eq!(d["permission"]["decided_by"], "turn_end");
    assert!(pending(&c, &id).await.is_empty());
    let (status, v) = answer(&c, &id, &rid, json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(second.terminate().await);
}

/// `baton chat` shows a waiting request with its options and sends the
/// one typed; with piped input, the line after the request answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shows_a_request_and_sends_the_choice() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let app = spawn_app(|_| {}).await;
    let mut chat = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["chat", "--url", &app.client.base])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    // Statuses come on stderr, replies on stdout: read both, in one order.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forward = |name: &'static str, pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send((name, line));
            }
        });
    };
    forward("stdout", Box::new(chat.stdout.take().unwrap()));
    forward("stderr", Box::new(chat.stderr.take().unwrap()));
    drop(tx);
    let mut until = async |want: &str| {
        let mut seen = Vec::new();
        loop {
            let (name, line) = tokio::time::timeout(PATIENCE, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {want:?} in {seen:#?}"))
                .unwrap_or_else(|| panic!("chat ended; no {want:?} in {seen:#?}"));
            if line.contains(want) {
                return (name, seen);
            }
            seen.push(line);
        }
    };
    stdin.write_all(b"/ask hi\n").await.unwrap();
    let (_, shown) = until("answer with /answer N").await;
    assert!(
        shown
            .iter()
            .any(|l| l.contains("permission asked: pretend tool")),
        "{shown:#?}"
    );
    assert!(
        shown
            .iter()
            .any(|l| l.contains("2) allow always [allow_always]")),
        "{shown:#?}"
    );
    stdin.write_all(b"/answer 2\n").await.unwrap();
    until("[permission: allow-always (by user:local)]").await;
    let (stream, _) = until("echo: hi (permission: allow-always)").await;
    assert_eq!(stream, "stdout", "the reply is the output");
    stdin.write_all(b"/quit\n").await.unwrap();
    let exit = tokio::time::timeout(PATIENCE, chat.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    app.stop().await;
}

/// The API document has the permission routes and entry types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_document_describes_permissions() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let (status, doc) = c.send(c.req(Method::GET, "/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    for (method, path) in [
        ("get", "/v1/sessions/{id}/permissions"),
        ("post", "/v1/sessions/{id}/permissions/{request_id}"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "no {method} {path}");
    }
    let answer = &doc["paths"]["/v1/sessions/{id}/permissions/{request_id}"]["post"];
    for code in ["200", "201", "400", "404", "409"] {
        assert!(answer["responses"][code].is_object(), "no {code}: {answer}");
    }
    let schemas = &doc["components"]["schemas"];
    let kinds = schemas["EntryType"].to_string();
    for kind in ["permission_request", "permission_decision"] {
        assert!(kinds.contains(kind), "{kinds}");
    }
    for schema in [
        "PermissionInfo",
        "PermissionOptionInfo",
        "PermissionPolicy",
        "PermissionStatus",
        "AnswerBody",
    ] {
        assert!(schemas[schema].is_object(), "no schema {schema}");
    }
    assert!(schemas["Session"]["properties"]["pending_permissions"].is_object());
    assert!(schemas["CreateSessionBody"]["properties"]["permission"].is_object());
    app.stop().await;
}

/// A server shutting down cancels a waiting turn: its request is answered
/// `cancelled` by `shutdown` before the turn ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_closes_the_waiting_request_as_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let app = common::spawn_app_on(&db, |_| {}).await;
    let c = app.client.clone();
    let id = c.create_session_id(json!({"message": "/ask bye"})).await;
    wait_request(&c, &id).await;
    app.stop().await;

    let app = common::spawn_app_on(&db, |_| {}).await;
    let c = &app.client;
    let turn = ended(c, &id).await;
    assert_eq!(turn["status"], "cancelled");
    assert_eq!(turn["reason"], "shutdown");
    let entries = c.entries(&id).await;
    let d = of_kind(&entries, "permission_decision")[0];
    assert_eq!(d["permission"]["decided_by"], "shutdown");
    assert_eq!(d["permission"]["outcome"], "cancelled");
    assert!(pending(c, &id).await.is_empty());
    app.stop().await;
}
