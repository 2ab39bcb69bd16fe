//! What the server says, through the real binary at the default level with
//! `--log-format json`: start-up lines naming the store, the agents and the
//! auth mode; one line per turn start and end with fields a pipeline can
//! index; a forced stop; an agent command that does not exist; a lease
//! taken over after a crash; no colour codes when stderr is not a terminal.
//! And `/metrics` after turns: turns by agent and status, turn durations,
//! queue depth, store commit latency and batch size.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::{Client, PATIENCE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A `baton serve --log-format json` whose stderr lines are collected.
struct Logged {
    child: tokio::process::Child,
    client: Client,
    lines: Arc<Mutex<Vec<String>>>,
}

async fn serve(db: &Path, args: &[&str]) -> Logged {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--db"])
        .arg(db)
        .args(["--demo-word-delay-ms", "1"])
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = err.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, out.next_line())
        .await
        .expect("baton did not start in time")
        .unwrap()
        .unwrap_or_else(|| panic!("baton exited: {:?}", lines.lock().unwrap()));
    let base = line.strip_prefix("listening on ").unwrap().to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    Logged {
        child,
        client: Client::new(base),
        lines,
    }
}

impl Logged {
    /// Every line so far, each of which must be one JSON object.
    fn records(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                assert!(!l.contains('\u{1b}'), "a colour code in a log line: {l:?}");
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits for a line whose message starts with `message` and whose
    /// fields include `fields`; returns it.
    async fn wait_for(&self, message: &str, fields: Value) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let found = self.records().into_iter().find(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
                    && fields.as_object().unwrap().iter().all(|(k, v)| &r[k] == v)
            });
            if let Some(r) = found {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line {message:?} with {fields}; lines:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_agents_and_start_up_are_logged_as_json_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let mut s = serve(
        &db,
        &[
            "--token",
            "alice:s1",
            "--acp",
            "ghost=/nonexistent/agent --flag",
            "--acp-restart-backoff-ms",
            "1",
            "--cancel-drain-ms",
            "100",
        ],
    )
    .await;
    // Start-up: the store (a file), the agents, the auth mode.
    let store = s.wait_for("store opened", json!({"level": "INFO"})).await;
    let named = store["store"].as_str().unwrap();
    assert!(
        named.starts_with("file ") && named.ends_with("baton.db"),
        "{store}"
    );
    s.wait_for("agent configured", json!({"agent": "ghost", "kind": "acp"}))
        .await;
    s.wait_for("agent configured", json!({"agent": "demo"}))
        .await;
    let auth = s
        .wait_for("bearer tokens required", json!({"auth": "bearer"}))
        .await;
    assert!(!auth.to_string().contains("s1"), "a secret in {auth}");

    let c = s.client.with_token("s1");
    // A turn that completes.
    let id = c.create_session_id(json!({"message": "hi"})).await;
    c.wait_idle(&id).await;
    let started = s
        .wait_for("turn started", json!({"session": id, "agent": "demo"}))
        .await;
    let turn = started["turn"].as_str().unwrap().to_owned();
    let ended = s
        .wait_for(
            "turn ended",
            json!({"session": id, "turn": turn, "agent": "demo", "status": "completed"}),
        )
        .await;
    assert!(ended["duration_ms"].is_u64(), "{ended}");
    assert_eq!(ended["level"], "INFO", "{ended}");

    // An agent whose command does not exist: the failed start and the turn.
    let ghost = c
        .create_session_id(json!({"agent": "ghost", "message": "hello?"}))
        .await;
    c.wait_idle(&ghost).await;
    let failed = s
        .wait_for("agent process failed to start", json!({"agent": "ghost"}))
        .await;
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/agent"),
        "{failed}"
    );
    let ended = s
        .wait_for(
            "turn ended",
            json!({"session": ghost, "agent": "ghost", "status": "failed"}),
        )
        .await;
    assert!(!ended["reason"].as_str().unwrap().is_empty(), "{ended}");

    // A forced stop: an agent that ignores the cancel, then a queued message.
    let stubborn = c.create_session_id(json!({"message": "/stubborn"})).await;
    c.wait_session(&stubborn, |v| v["status"] == "running")
        .await;
    let (status, body) = c.post(&stubborn, "after", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["disposition"]["type"], "queued", "{body}");
    let (status, _) = c.cancel(&stubborn).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    c.wait_idle(&stubborn).await;
    s.wait_for(
        "forced stop",
        json!({"session": stubborn, "agent": "demo", "level": "WARN"}),
    )
    .await;
    s.wait_for(
        "turn ended",
        json!({"session": stubborn, "status": "cancelled"}),
    )
    .await;

    // The metrics after those turns.
    let (status, text) = c.send(c.req(Method::GET, "/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for series in [
        r#"baton_turns_total{agent="demo",status="completed"}"#,
        r#"baton_turns_total{agent="demo",status="cancelled"}"#,
        r#"baton_turns_total{agent="ghost",status="failed"}"#,
        r#"baton_turn_duration_seconds_bucket{le="#,
        r#"baton_turn_duration_seconds_count{agent="demo"}"#,
        "baton_queue_depth_count 1",
        "baton_store_commit_duration_seconds_count",
        "baton_store_commit_batch_size_bucket{le=",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    let completed = text
        .lines()
        .find(|l| l.starts_with(r#"baton_turns_total{agent="demo",status="completed"}"#))
        .unwrap();
    // "hi", and "after" once the stubborn turn was forced.
    assert!(completed.ends_with(" 2"), "{completed}");
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taken_over_after_a_crash_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let mut s = serve(&db, &[]).await;
    let id = s
        .client
        .create_session_id(json!({"message": "/hang"}))
        .await;
    s.client
        .wait_session(&id, |v| v["status"] == "running")
        .await;
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();
    let mut s = serve(&db, &[]).await;
    let took = s.wait_for("lease takeover", json!({"session": id})).await;
    assert!(took["epoch"].is_u64(), "{took}");
    s.wait_for(
        "store opened",
        json!({"store": format!("file {}", db.display())}),
    )
    .await;
    s.wait_for("no tokens", json!({"auth": "none"})).await;
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();
}
