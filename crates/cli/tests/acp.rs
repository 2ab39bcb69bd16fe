//! Interop: Baton in front of real ACP agents, one written on each official
//! SDK (Python, TypeScript, Rust; see `tests/acp-peers/`). Every scenario
//! runs against every peer. A peer whose SDK is not installed is skipped with
//! a note on stderr, unless `BATON_REQUIRE_ACP_PEERS=1` (as in CI), where a
//! missing peer fails the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{spawn_app, Client, TestServer};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The peer's command line, or `None` (after saying why) if not installed.
fn peer(kind: &str) -> Option<String> {
    let root = root();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let (needed, command) = match kind {
        "python" => {
            let py = target.join("acp-venv/bin/python");
            (
                py.clone(),
                format!(
                    "{} {}",
                    py.display(),
                    root.join("tests/acp-peers/python/peer.py").display()
                ),
            )
        }
        "ts" => {
            let modules = root.join("tests/acp-peers/ts/node_modules/@agentclientprotocol/sdk");
            (
                modules,
                format!(
                    "node {}",
                    root.join("tests/acp-peers/ts/peer.mjs").display()
                ),
            )
        }
        _ => {
            let bin = target.join("debug/acp-peer");
            (bin.clone(), bin.display().to_string())
        }
    };
    if needed.exists() {
        return Some(command);
    }
    let msg = format!(
        "the {kind} ACP peer is not installed ({} is missing; see tests/acp-peers/README.md)",
        needed.display()
    );
    if std::env::var("BATON_REQUIRE_ACP_PEERS").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipping ACP interop test: {msg}");
    None
}

async fn server(command: String, tune: impl FnOnce(&mut baton_cli::ServeConfig)) -> TestServer {
    spawn_app(move |cfg| {
        cfg.acp = vec![("peer".into(), command)];
        cfg.acp_permission = vec![("peer".into(), "allow".into())];
        cfg.default_agent = "peer".into();
        cfg.queue_capacity = 1000;
        tune(cfg);
    })
    .await
}

async fn turns_of(c: &Client, id: &str) -> Vec<Value> {
    c.turns(id).await
}

/// Waits until turn `n` (0-based) of the session has ended; returns it.
async fn ended_turn(c: &Client, id: &str, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let turns = turns_of(c, id).await;
        if let Some(t) = turns.get(n).filter(|t| t["ended_at"].is_string()) {
            return t.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "turn {n} never ended: {turns:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until turn `n` is running.
async fn running_turn(c: &Client, id: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while turns_of(c, id).await.get(n).map(|t| t["status"].clone()) != Some(json!("running")) {
        assert!(tokio::time::Instant::now() < deadline, "turn {n} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The peer's command with `session/load` on, its sessions saved in `state`.
fn resumable(cmd: &str, state: &tempfile::TempDir) -> String {
    format!(
        "env ACP_PEER_LOAD_SESSION=1 ACP_PEER_STATE_DIR={} {cmd}",
        state.path().display()
    )
}

/// The peer as `GET /v1/agents` describes it.
async fn peer_agent(c: &Client) -> Value {
    let (_, agents) = c.send(c.req(reqwest::Method::GET, "/v1/agents")).await;
    agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "peer")
        .unwrap()
        .clone()
}

fn replies(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e["role"] == "assistant")
        .map(|e| e["content"].as_str().unwrap().to_owned())
        .collect()
}

/// No entry of a turn after its `turn_ended` (I8), seqs gapless (I1).
fn check_log(entries: &[Value]) {
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=entries.len() as u64).collect::<Vec<_>>());
    let mut ended = Vec::new();
    for e in entries {
        if let Some(t) = e["turn_id"].as_str() {
            assert!(
                !ended.contains(&t.to_owned()),
                "entry {} after its turn ended",
                e["seq"]
            );
            if e["type"] == "turn_ended" {
                ended.push(t.to_owned());
            }
        }
    }
}

async fn streamed_turn(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |_| {}).await;
    let c = &app.client;
    let s = c.create_session(json!({})).await;
    let id = s["id"].as_str().unwrap();
    let mut stream = c.open_stream(id, None).await;
    c.post(id, "hello from baton", None, None).await;
    let events = stream.until_entry(|e| e["type"] == "turn_ended").await;
    let deltas: String = events
        .iter()
        .filter(|e| e.event == "delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        deltas, "echo: hello from baton",
        "deltas concatenate to the reply"
    );
    assert!(
        events.iter().filter(|e| e.event == "delta").count() >= 3,
        "streamed in chunks"
    );
    let stored: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "entry" && e.data["role"] == "assistant")
        .map(|e| &e.data)
        .collect();
    assert_eq!(stored.len(), 1, "one stored message");
    assert_eq!(stored[0]["content"], "echo: hello from baton");
    let last_delta = events.iter().rposition(|e| e.event == "delta").unwrap();
    let message = events
        .iter()
        .position(|e| e.event == "entry" && e.data["role"] == "assistant")
        .unwrap();
    assert!(last_delta < message, "deltas, then the stored message");
    assert_eq!(ended_turn(c, id, 0).await["status"], "completed");
    // The agent list shows it running, with its capabilities.
    let me = peer_agent(c).await;
    assert_eq!(me["process"]["status"], "running", "{me}");
    assert!(me["capabilities"].is_object(), "{me}");
    app.stop().await;
}

async fn cancel_mid_stream_and_late_updates(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    // The peers send their late update 50 ms after the cancelled answer: a
    // quiet window far past that, however slowly a loaded machine runs them.
    let app = server(cmd, |cfg| cfg.acp_quiet_after_cancel_ms = 3_000).await;
    let c = &app.client;
    let id = c.create_session_id(json!({})).await;
    let mut stream = c.open_stream(&id, None).await;
    for (n, directive) in ["/hang stop me", "/late stop me too"].iter().enumerate() {
        c.post(&id, directive, None, None).await;
        running_turn(c, &id, n).await;
        let (status, v) = c.cancel(&id).await;
        assert_eq!(status, 202, "{v}");
        let t = ended_turn(c, &id, n).await;
        assert_eq!(t["status"], "cancelled", "{t}");
    }
    // A normal turn afterwards proves the session and the agent are fine,
    // and lets every late update arrive before we look.
    c.post(&id, "after", None, None).await;
    let events = stream
        .until_entry(|e| e["type"] == "turn_ended" && e["status"] == "completed")
        .await;
    let streamed: String = events
        .iter()
        .filter(|e| e.event == "delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert!(
        !streamed.contains("LATE"),
        "an update after the cancel was streamed: {streamed:?}"
    );
    let entries = c.entries(&id).await;
    assert!(
        !entries
            .iter()
            .any(|e| e["content"].as_str().is_some_and(|s| s.contains("LATE"))),
        "stored late output: {entries:#?}"
    );
    assert_eq!(
        replies(&entries),
        vec!["echo: after"],
        "cancelled turns store no reply"
    );
    check_log(&entries);
    app.stop().await;
}

async fn ignored_cancel_is_forced_and_the_next_turn_works(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |cfg| cfg.cancel_drain_ms = 500).await;
    let c = &app.client;
    let id = c.create_session_id(json!({})).await;
    let mut stream = c.open_stream(&id, None).await;
    c.post(&id, "/ignore-cancel", None, None).await;
    // Prompted (a cancel while it starts never reaches the agent).
    stream.until_delta().await;
    c.cancel(&id).await;
    let t = ended_turn(c, &id, 0).await;
    assert_eq!(t["status"], "cancelled");
    assert!(t["reason"].as_str().unwrap().contains("forced"), "{t}");
    c.post(&id, "still here", None, None).await;
    let t = ended_turn(c, &id, 1).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(replies(&c.entries(&id).await), vec!["echo: still here"]);
    let me = peer_agent(c).await;
    assert_eq!(
        me["process"]["starts"], 2,
        "the process was restarted (no other session was on it): {me}"
    );
    app.stop().await;
}

async fn death_mid_prompt_fails_with_stderr_and_recovers(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    dies_mid_prompt_then_recovers(cmd, "exit status: 3").await;
}

/// The process closes its pipes half a second before it exits (a wrapper
/// shell that outlives the agent): the turn on it must fail with the agent's
/// own last words, and the next turn must start a new process, not be sent
/// down the closed pipe.
async fn pipes_closed_before_exit_retire_the_process(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let wrapped = format!("sh -c \"{cmd}; exec >&-; exec sleep 0.5\"");
    dies_mid_prompt_then_recovers(wrapped, "exit status: 0").await;
}

/// The same, but the process would linger for a minute: it is killed.
async fn a_process_lingering_after_its_pipes_closed_is_killed(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let wrapped = format!("sh -c \"{cmd}; exec >&-; exec sleep 60\"");
    dies_mid_prompt_then_recovers(wrapped, "SIGKILL").await;
}

/// The agent run by `command` dies mid-prompt with a message queued behind:
/// the turn fails with its stderr tail and `exit` (how the process ended) in
/// the reason; the queued message runs on a second process.
async fn dies_mid_prompt_then_recovers(command: String, exit: &str) {
    let app = server(command, |_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "/die now"})).await;
    c.post(&id, "and then", None, None).await;
    let t = ended_turn(c, &id, 0).await;
    assert_eq!(t["status"], "failed", "{t}");
    let reason = t["reason"].as_str().unwrap();
    assert!(
        reason.contains("peer dying on purpose") && reason.contains(exit),
        "the turn ends with the process's exit ({exit}) and stderr tail: {t}"
    );
    let t = ended_turn(c, &id, 1).await;
    assert_eq!(
        t["status"], "completed",
        "the queue continues on a new process: {t}"
    );
    let entries = c.entries(&id).await;
    assert_eq!(replies(&entries), vec!["echo: and then"]);
    check_log(&entries);
    let me = peer_agent(c).await;
    assert_eq!(me["process"]["starts"], 2, "{me}");
    app.stop().await;
}

/// A forced stop kills the process; the next turn resumes the same ACP
/// session on a new one. The stopped turn's prompt, failing late (a
/// grandchild holds the old process's stderr open for a while), must not end
/// the turn now running on that session.
async fn a_stopped_turns_prompt_does_not_end_the_next_turn(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let state = tempfile::tempdir().unwrap();
    let cmd = format!("sh -c \"(sleep 5 &); exec {}\"", resumable(&cmd, &state));
    let app = server(cmd, |cfg| cfg.cancel_drain_ms = 300).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "first"})).await;
    ended_turn(c, &id, 0).await;
    let mut stream = c.open_stream(&id, None).await;
    c.post(&id, "/ignore-cancel", None, None).await;
    stream.until_delta().await;
    c.cancel(&id).await;
    let t = ended_turn(c, &id, 1).await;
    assert!(t["reason"].as_str().unwrap().contains("forced"), "{t}");
    c.post(
        &id,
        "/slow 300 one two three four five six seven",
        None,
        None,
    )
    .await;
    let t = ended_turn(c, &id, 2).await;
    assert_eq!(t["status"], "completed", "{t}");
    let entries = c.entries(&id).await;
    assert_eq!(
        replies(&entries),
        vec!["echo: first", "echo: one two three four five six seven"]
    );
    check_log(&entries);
    app.stop().await;
}

async fn session_load_after_restart_keeps_history_single(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let state = tempfile::tempdir().unwrap();
    let cmd = resumable(&cmd, &state);
    let app = server(cmd, |_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "first"})).await;
    ended_turn(c, &id, 0).await;
    c.post(&id, "/die restart please", None, None).await;
    assert_eq!(ended_turn(c, &id, 1).await["status"], "failed");
    let mut stream = c
        .open_stream(&id, Some(c.entries(&id).await.len() as u64))
        .await;
    c.post(&id, "third", None, None).await;
    let t = ended_turn(c, &id, 2).await;
    assert_eq!(t["status"], "completed", "{t}");
    let events = stream.until_entry(|e| e["type"] == "turn_ended").await;
    let streamed: String = events
        .iter()
        .filter(|e| e.event == "delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        streamed, "echo: third",
        "the session/load replay is not streamed as new output"
    );
    let entries = c.entries(&id).await;
    assert_eq!(
        replies(&entries),
        vec!["echo: first", "echo: third"],
        "history not duplicated"
    );
    check_log(&entries);
    // The peer resumed the same ACP session: its saved history holds all turns.
    let saved: String = std::fs::read_dir(state.path())
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(
        saved.contains("first") && saved.contains("third"),
        "one ACP session across the restart: {saved}"
    );
    app.stop().await;
}

async fn twenty_queued_messages_are_twenty_fifo_prompts(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |_| {}).await;
    let c = &app.client;
    let id = c.create_session_id(json!({})).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            c.post(&id, &format!("/slow 5 message {i}"), None, None)
                .await
        }));
    }
    let mut order = Vec::new();
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 201, "{v}");
        order.push((
            v["entry"]["seq"].as_u64().unwrap(),
            v["entry"]["content"]
                .as_str()
                .unwrap()
                .replace("/slow 5 ", ""),
        ));
    }
    order.sort();
    c.wait_idle(&id).await;
    let entries = c.entries(&id).await;
    check_log(&entries);
    let expected: Vec<String> = order.iter().map(|(_, m)| format!("echo: {m}")).collect();
    assert_eq!(replies(&entries), expected, "one prompt per message, FIFO");
    let turns = c.turns(&id).await;
    assert_eq!(turns.len(), 20);
    for w in turns.windows(2) {
        assert!(
            w[0]["ended_at"].as_str().unwrap() <= w[1]["started_at"].as_str().unwrap(),
            "prompts overlapped"
        );
    }
    assert!(turns.iter().all(|t| t["status"] == "completed"));
    app.stop().await;
}

async fn permission_policy_is_applied_and_recorded(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    for (policy, reply) in [
        ("allow", "permission granted"),
        ("deny", "permission denied"),
    ] {
        let app = server(cmd.clone(), |cfg| {
            cfg.acp_permission = vec![("peer".into(), policy.into())]
        })
        .await;
        let c = &app.client;
        let id = c
            .create_session_id(json!({"message": "/permission may I"}))
            .await;
        assert_eq!(ended_turn(c, &id, 0).await["status"], "completed");
        let entries = c.entries(&id).await;
        assert_eq!(replies(&entries), vec![reply]);
        let kinds: Vec<&str> = entries.iter().filter_map(|e| e["type"].as_str()).collect();
        let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or(usize::MAX);
        assert!(
            at("tool_call") < at("permission_request")
                && at("permission_request") + 1 == at("permission_decision"),
            "the call, then its request and decision: {kinds:?}"
        );
        assert!(
            !entries.iter().any(|e| e["role"] == "system"),
            "no system note: {entries:?}"
        );
        let request = &entries[at("permission_request")]["permission"];
        let decision = &entries[at("permission_decision")]["permission"];
        assert_eq!(request["tool_call_id"], "call-2", "{request}");
        assert_eq!(request["options"].as_array().map(Vec::len), Some(2));
        assert_eq!(decision["request_id"], request["request_id"]);
        assert_eq!(decision["decided_by"], "policy");
        assert_eq!(decision["outcome"], "selected");
        let chosen = if policy == "allow" {
            "allow_once"
        } else {
            "reject_once"
        };
        let kind_of = request["options"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["option_id"] == decision["option_id"])
            .map(|o| o["kind"].clone());
        assert_eq!(kind_of, Some(json!(chosen)), "{decision}");
        app.stop().await;
    }
}

async fn a_peer_that_cannot_start_backs_off(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    // A back-off far longer than the second turn can take to come.
    let app = server(format!("env ACP_PEER_CRASH_ON_START=1 {cmd}"), |cfg| {
        cfg.acp_restart_backoff_ms = 30_000
    })
    .await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "one"})).await;
    c.post(&id, "two", None, None).await;
    let first = ended_turn(c, &id, 0).await;
    assert_eq!(first["status"], "failed");
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("peer refuses to start"),
        "{first}"
    );
    let second = ended_turn(c, &id, 1).await;
    assert_eq!(second["status"], "failed");
    assert!(
        second["reason"]
            .as_str()
            .unwrap()
            .contains("next attempt in"),
        "backing off, not spinning: {second}"
    );
    let me = peer_agent(c).await;
    assert_eq!(me["process"]["starts"], 1, "one start, then back-off: {me}");
    assert_eq!(me["process"]["status"], "backing_off", "{me}");
    app.stop().await;
}

/// The peer's command behind `env VARS`.
fn with_env(cmd: &str, vars: &str) -> String {
    format!("env {vars} {cmd}")
}

/// An agent that is slow to start (a cold start before it reads stdin, or
/// a slow `initialize`) keeps its turn's lease: the turn completes, it is
/// never ended `lost`, and the next turn runs on the same process.
async fn a_slow_start_keeps_the_lease(kind: &str, vars: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(with_env(&cmd, vars), |cfg| {
        cfg.lease_ms = 3_000;
        cfg.heartbeat_ms = 500;
        cfg.sweep_ms = 200;
    })
    .await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "first"})).await;
    c.post(&id, "second", None, None).await;
    for n in 0..2 {
        let t = ended_turn(c, &id, n).await;
        assert_eq!(t["status"], "completed", "{t}");
    }
    let entries = c.entries(&id).await;
    assert_eq!(replies(&entries), vec!["echo: first", "echo: second"]);
    check_log(&entries);
    assert_eq!(peer_agent(c).await["process"]["starts"], 1);
    app.stop().await;
}

async fn a_slow_cold_start_keeps_the_lease(kind: &str) {
    a_slow_start_keeps_the_lease(kind, "ACP_PEER_STDIN_DELAY_MS=4500").await;
}

async fn a_slow_initialize_keeps_the_lease(kind: &str) {
    a_slow_start_keeps_the_lease(kind, "ACP_PEER_INIT_DELAY_MS=4500").await;
}

/// Past `--acp-start-timeout-ms` the turn ends `failed`, saying so.
async fn a_start_past_the_timeout_fails_the_turn(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(with_env(&cmd, "ACP_PEER_STDIN_DELAY_MS=20000"), |cfg| {
        cfg.acp_start_timeout_ms = 1_000;
    })
    .await;
    let c = &app.client;
    let id = c.create_session_id(json!({"message": "anyone?"})).await;
    let t = ended_turn(c, &id, 0).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("start timeout (1000 ms"),
        "{t}"
    );
    app.stop().await;
}

/// An agent that sends one more chunk ~100 ms after answering: the chunk
/// is dropped and counted, never stored or streamed in the next turn.
async fn a_chunk_after_the_answer_is_not_the_next_turns(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    // A window no loaded machine can miss; the default (250 ms) is the
    // same rule.
    let app = server(cmd, |cfg| cfg.acp_quiet_after_answer_ms = 1_500).await;
    let c = &app.client;
    let id = c.create_session_id(json!({})).await;
    let mut stream = c.open_stream(&id, None).await;
    c.post(&id, "/after-done alpha", None, None).await;
    c.post(&id, "beta gamma delta", None, None).await;
    let t = ended_turn(c, &id, 1).await;
    assert_eq!(t["status"], "completed", "{t}");
    let entries = c.entries(&id).await;
    assert_eq!(
        replies(&entries),
        vec!["echo: alpha", "echo: beta gamma delta"]
    );
    check_log(&entries);
    let seen = stream
        .until_entry(|e| e["type"] == "turn_ended" && e["turn_id"] == t["id"])
        .await;
    assert!(
        seen.iter()
            .all(|e| !e.data.to_string().contains("LATE-AFTER-DONE")),
        "the late chunk never reaches a stream: {seen:#?}"
    );
    let me = peer_agent(c).await;
    assert_eq!(me["late_updates"], 1, "{me}");
    let (_, metrics) = c.send(c.req(reqwest::Method::GET, "/metrics")).await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains("baton_agent_late_updates_total{agent=\"peer\"} 1"),
        "{text}"
    );
    app.stop().await;
}

/// Session A's agent ignores `session/cancel`; forcing it at the drain
/// deadline leaves session B's turn on the same process alone: B completes
/// its whole reply, the process is not restarted, and A goes on in a new
/// ACP session.
async fn a_forced_stop_leaves_other_sessions_alone(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |cfg| cfg.cancel_drain_ms = 300).await;
    let c = &app.client;
    let a = c.create_session_id(json!({})).await;
    let b = c.create_session_id(json!({})).await;
    let mut sa = c.open_stream(&a, None).await;
    let mut sb = c.open_stream(&b, None).await;
    c.post(&a, "/ignore-cancel", None, None).await;
    sa.until_delta().await;
    c.post(
        &b,
        "/slow 150 one two three four five six seven eight",
        None,
        None,
    )
    .await;
    sb.until_delta().await;
    c.cancel(&a).await;
    let t = ended_turn(c, &a, 0).await;
    assert_eq!(t["status"], "cancelled", "{t}");
    assert!(t["reason"].as_str().unwrap().contains("forced"), "{t}");
    let t = ended_turn(c, &b, 0).await;
    assert_eq!(t["status"], "completed", "B is untouched: {t}");
    assert_eq!(
        replies(&c.entries(&b).await),
        vec!["echo: one two three four five six seven eight"]
    );
    c.post(&a, "still here", None, None).await;
    let t = ended_turn(c, &a, 1).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(replies(&c.entries(&a).await), vec!["echo: still here"]);
    let me = peer_agent(c).await;
    assert_eq!(me["process"]["starts"], 1, "not restarted: {me}");
    app.stop().await;
}

/// Output past the cap fails that turn only: the agent is cancelled (not
/// killed) and a turn beside it on the same process completes.
async fn output_past_the_cap_fails_only_that_turn(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |cfg| cfg.max_output_bytes = 60).await;
    let c = &app.client;
    let a = c.create_session_id(json!({})).await;
    let b = c.create_session_id(json!({})).await;
    let mut sb = c.open_stream(&b, None).await;
    c.post(&b, "/slow 100 short and sweet", None, None).await;
    sb.until_delta().await;
    let long = "lorem ipsum dolor sit amet ".repeat(10);
    c.post(&a, &format!("/slow 5 {long}"), None, None).await;
    let t = ended_turn(c, &a, 0).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("exceeded the limit of 60 bytes"),
        "{t}"
    );
    assert!(replies(&c.entries(&a).await).is_empty(), "nothing partial");
    let t = ended_turn(c, &b, 0).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(replies(&c.entries(&b).await), vec!["echo: short and sweet"]);
    assert_eq!(peer_agent(c).await["process"]["starts"], 1);
    app.stop().await;
}

/// The pending permission request of a session, once there is one.
async fn asked(c: &Client, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let (_, v) = c
            .send(c.req(
                reqwest::Method::GET,
                &format!("/v1/sessions/{id}/permissions"),
            ))
            .await;
        if let Some(r) = v["permissions"].as_array().and_then(|a| a.first()) {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never asked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn answer(
    c: &Client,
    id: &str,
    request: &Value,
    option: &str,
) -> (reqwest::StatusCode, Value) {
    let rid = request["permission"]["request_id"].as_str().unwrap();
    c.send(
        c.req(
            reqwest::Method::POST,
            &format!("/v1/sessions/{id}/permissions/{rid}"),
        )
        .json(&json!({ "option_id": option })),
    )
    .await
}

/// The outcomes the peer received (`/ask-permission` logs each to a file).
async fn outcomes_logged(log: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer logged {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The peer's command, logging the permission outcomes it gets to `log`.
fn logging(cmd: &str, log: &std::path::Path) -> String {
    format!("env ACP_PEER_PERMISSION_LOG={} {cmd}", log.display())
}

/// A session that asks (its own policy over the agent's `allow`): the
/// request is streamed, the user's choice reaches the agent, which reports
/// it; allow and reject alike.
async fn the_user_answers_the_agents_permission_request(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("outcomes");
    let app = server(logging(&cmd, &log), |_| {}).await;
    let c = &app.client;
    for (n, option) in ["allow-always", "reject-once"].into_iter().enumerate() {
        let id = c.create_session_id(json!({"permission": "ask"})).await;
        let mut stream = c.open_stream(&id, None).await;
        c.post(&id, "/ask-permission go", None, None).await;
        let read = stream
            .until_entry(|e| e["type"] == "permission_request")
            .await;
        let request = read.last().unwrap().data.clone();
        assert_eq!(request["permission"]["tool_call_id"], "call-3");
        assert_eq!(request["permission"]["title"], "run command");
        assert_eq!(
            request["permission"]["options"].as_array().map(Vec::len),
            Some(4)
        );
        assert_eq!(asked(c, &id).await, request);
        let (status, v) = answer(c, &id, &request, option).await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
        stream.until_entry(|e| e["type"] == "turn_ended").await;
        assert_eq!(ended_turn(c, &id, 0).await["status"], "completed");
        let entries = c.entries(&id).await;
        check_log(&entries);
        assert_eq!(replies(&entries), vec![format!("permission: {option}")]);
        assert_eq!(outcomes_logged(&log, n + 1).await[n], option);
    }
    app.stop().await;
}

/// Nobody answers: the peer gets `cancelled` at the permission timeout, the
/// decision says `timeout`, and the turn goes on.
async fn an_unanswered_agent_request_times_out(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("outcomes");
    let app = server(logging(&cmd, &log), |cfg| {
        cfg.acp_permission = vec![("peer".into(), "ask".into())];
        cfg.permission_timeout_ms = 300;
    })
    .await;
    let c = &app.client;
    let id = c
        .create_session_id(json!({"message": "/ask-permission go"}))
        .await;
    let request = asked(c, &id).await;
    assert_eq!(ended_turn(c, &id, 0).await["status"], "completed");
    let entries = c.entries(&id).await;
    check_log(&entries);
    assert_eq!(replies(&entries), vec!["permission: cancelled"]);
    let decision = entries
        .iter()
        .find(|e| e["type"] == "permission_decision")
        .unwrap();
    assert_eq!(decision["permission"]["decided_by"], "timeout");
    assert_eq!(decision["permission"]["outcome"], "cancelled");
    assert_eq!(outcomes_logged(&log, 1).await, vec!["cancelled"]);
    let (status, _) = answer(c, &id, &request, "allow-once").await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    app.stop().await;
}

/// A cancel while the agent waits: the request is answered `cancelled`
/// (stored, and sent to the agent) before the cancel; the turn ends
/// `cancelled`; nothing of it follows; the next turn is clean.
async fn a_cancel_answers_the_agents_request_first(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("outcomes");
    let app = server(logging(&cmd, &log), |cfg| {
        cfg.acp_permission = vec![("peer".into(), "ask".into())]
    })
    .await;
    let c = &app.client;
    let id = c
        .create_session_id(json!({"message": "/ask-permission go"}))
        .await;
    let request = asked(c, &id).await;
    let (status, _) = c.cancel(&id).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    assert_eq!(ended_turn(c, &id, 0).await["status"], "cancelled");
    assert_eq!(outcomes_logged(&log, 1).await, vec!["cancelled"]);
    let entries = c.entries(&id).await;
    let kinds: Vec<&str> = entries.iter().filter_map(|e| e["type"].as_str()).collect();
    let decision = kinds
        .iter()
        .position(|k| *k == "permission_decision")
        .unwrap();
    let end = kinds.iter().position(|k| *k == "turn_ended").unwrap();
    assert!(decision < end, "{kinds:?}");
    assert_eq!(entries[decision]["permission"]["decided_by"], "turn_end");
    assert!(replies(&entries).is_empty(), "{entries:?}");
    let (status, v) = answer(c, &id, &request, "allow-once").await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{v}");
    c.post(&id, "after", None, None).await;
    assert_eq!(ended_turn(c, &id, 1).await["status"], "completed");
    let entries = c.entries(&id).await;
    check_log(&entries);
    assert_eq!(replies(&entries), vec!["echo: after"]);
    app.stop().await;
}

/// The server dies while the agent waits: after the restart the turn is
/// `lost` and its request closed in the same recovery.
async fn a_restart_while_the_agent_waits_closes_the_request(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let agent = format!("peer={cmd}");
    let args = [
        "--acp",
        agent.as_str(),
        "--acp-permission",
        "peer=ask",
        "--default-agent",
        "peer",
    ];
    let first = common::spawn_binary(&db, &args).await;
    let c = first.client.clone();
    let id = c
        .create_session_id(json!({"message": "/ask-permission go"}))
        .await;
    let request = asked(&c, &id).await;
    first.kill9().await;
    let second = common::spawn_binary(&db, &args).await;
    let c = second.client.clone();
    assert_eq!(ended_turn(&c, &id, 0).await["status"], "lost");
    let entries = c.entries(&id).await;
    check_log(&entries);
    // The decision, then the result closing its call, then the end.
    let tail: Vec<&str> = entries[entries.len() - 3..]
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        tail,
        ["permission_decision", "tool_result", "turn_ended"],
        "{entries:?}"
    );
    let decision = &entries[entries.len() - 3];
    assert_eq!(decision["permission"]["outcome"], "cancelled");
    assert_eq!(
        decision["permission"]["request_id"],
        request["permission"]["request_id"]
    );
    let (status, _) = answer(&c, &id, &request, "allow-once").await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    assert!(second.terminate().await);
}

/// Both exports of the session, each checked against its API's rules.
async fn exports(c: &Client, id: &str, query: &str) -> (Vec<Value>, Vec<Value>) {
    let get = |format: &str| {
        c.send(c.req(
            reqwest::Method::GET,
            &format!("/v1/sessions/{id}/export?format={format}{query}"),
        ))
    };
    let (status, openai) = get("openai").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{openai}");
    let openai = openai["messages"].as_array().unwrap().clone();
    baton_core::export::check::openai(&openai)
        .unwrap_or_else(|e| panic!("OpenAI export{query}: {e}: {openai:#?}"));
    let (status, anthropic) = get("anthropic").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{anthropic}");
    baton_core::export::check::anthropic(&anthropic)
        .unwrap_or_else(|e| panic!("Anthropic export{query}: {e}: {anthropic:#?}"));
    (openai, anthropic["messages"].as_array().unwrap().clone())
}

/// The kinds of a turn's entries after its `turn_started`, with the tool
/// call id or text each carries.
fn turn_shape(entries: &[Value]) -> Vec<(String, String)> {
    let start = entries
        .iter()
        .position(|e| e["type"] == "turn_started")
        .unwrap();
    entries[start + 1..]
        .iter()
        .map(|e| {
            let what = e["tool"]["id"]
                .as_str()
                .or_else(|| e["content"].as_str())
                .unwrap_or_default();
            (e["type"].as_str().unwrap().to_owned(), what.to_owned())
        })
        .collect()
}

/// `after` starts with `before` and adds no user message: the export taken
/// mid-turn is the export taken after it, minus that turn.
fn is_prefix_minus_the_turn(before: &[Value], after: &[Value]) {
    assert_eq!(
        &after[..before.len()],
        before,
        "mid-turn export: {before:#?}"
    );
    assert!(
        after[before.len()..]
            .iter()
            .all(|m| m["role"] != "user" || m["content"][0]["type"] == "tool_result"),
        "only the turn's messages follow: {after:#?}"
    );
}

/// A thought, text, a tool call and its result, text, a second call and
/// result, the reply: stored in that order, exported in that order in both formats; an
/// export taken mid-turn is the final one minus the turn.
async fn text_tool_text_is_stored_and_exported_in_order(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |_| {}).await;
    let c = &app.client;
    let id = c
        .create_session_id(json!({"message": "/slow 150 /think /chatty hi"}))
        .await;
    c.wait_entry(&id, |e| e["type"] == "tool_result").await;
    let mid = exports(c, &id, "").await;
    let running = exports(c, &id, "&include_running=true").await;
    assert_eq!(mid.0.len(), 1, "only the user message: {:#?}", mid.0);
    assert!(running.0.len() >= 3, "{:#?}", running.0);
    assert_eq!(ended_turn(c, &id, 0).await["status"], "completed");
    let entries = c.entries(&id).await;
    check_log(&entries);
    let shape = turn_shape(&entries);
    let kinds: Vec<&str> = shape.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "thought",
            "message",
            "tool_call",
            "tool_result",
            "message",
            "tool_call",
            "tool_result",
            "message",
            "turn_ended"
        ],
        "{shape:#?}"
    );
    assert_eq!(shape[0].1, "Thinking it over.", "agent_thought_chunk");
    assert_eq!(shape[1].1.trim(), "Let me look.");
    assert_eq!(
        (shape[2].1.as_str(), shape[3].1.as_str()),
        ("chat-1", "chat-1")
    );
    assert_eq!(shape[4].1.trim(), "Found them.");
    let (openai, anthropic) = exports(c, &id, "").await;
    let roles: Vec<&str> = openai.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    assert_eq!(
        openai[1]["content"].as_str().map(str::trim),
        Some("Let me look.")
    );
    assert_eq!(openai[1]["tool_calls"][0]["id"], "chat-1");
    assert_eq!(openai[2]["content"], "found 3 matches");
    assert_eq!(
        openai[3]["content"].as_str().map(str::trim),
        Some("Found them.")
    );
    assert_eq!(anthropic.len(), 6, "{anthropic:#?}");
    let (thinking, _) = exports(c, &id, "&include_thoughts=true").await;
    assert_eq!(
        thinking[1]["content"].as_str().map(str::trim),
        Some("<thinking>Thinking it over.</thinking>\nLet me look."),
        "thoughts only when asked"
    );
    is_prefix_minus_the_turn(&mid.0, &openai);
    is_prefix_minus_the_turn(&mid.1, &anthropic);
    app.stop().await;
}

/// A cancel while a tool call is open: the call gets a result carrying the
/// turn's status and reason, in the end's transaction; both exports valid.
async fn cancel_mid_tool_closes_the_call(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |_| {}).await;
    let c = &app.client;
    let id = c
        .create_session_id(json!({"message": "/chatty-hang look"}))
        .await;
    c.wait_entry(&id, |e| e["type"] == "tool_call").await;
    let mid = exports(c, &id, "").await;
    exports(c, &id, "&include_running=true").await;
    let (status, _) = c.cancel(&id).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    assert_eq!(ended_turn(c, &id, 0).await["status"], "cancelled");
    let entries = c.entries(&id).await;
    check_log(&entries);
    let n = entries.len();
    let (closing, ended) = (&entries[n - 2], &entries[n - 1]);
    assert_eq!(
        (&closing["type"], &closing["tool"]["id"], &closing["status"]),
        (&json!("tool_result"), &json!("chat-1"), &json!("cancelled")),
        "{entries:#?}"
    );
    assert_eq!(closing["reason"], ended["reason"]);
    assert_eq!(
        closing["created_at"], ended["created_at"],
        "one transaction"
    );
    let (openai, anthropic) = exports(c, &id, "").await;
    assert_eq!(openai.last().unwrap()["role"], "tool");
    assert_eq!(
        anthropic.last().unwrap()["content"][0]["is_error"],
        true,
        "{anthropic:#?}"
    );
    is_prefix_minus_the_turn(&mid.0, &openai);
    is_prefix_minus_the_turn(&mid.1, &anthropic);
    app.stop().await;
}

/// The server is killed (SIGKILL) while a tool call is open: after the
/// restart the turn is `lost` and the call closed by the recovery, both
/// exports valid.
async fn a_server_killed_mid_tool_ends_lost_with_the_call_closed(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let agent = format!("peer={cmd}");
    let args = ["--acp", agent.as_str(), "--default-agent", "peer"];
    let first = common::spawn_binary(&db, &args).await;
    let c = first.client.clone();
    let id = c
        .create_session_id(json!({"message": "/chatty-hang look"}))
        .await;
    c.wait_entry(&id, |e| e["type"] == "tool_call").await;
    first.kill9().await;
    let second = common::spawn_binary(&db, &args).await;
    let c = second.client.clone();
    assert_eq!(ended_turn(&c, &id, 0).await["status"], "lost");
    let entries = c.entries(&id).await;
    check_log(&entries);
    let n = entries.len();
    let (closing, ended) = (&entries[n - 2], &entries[n - 1]);
    assert_eq!(
        (&closing["type"], &closing["tool"]["id"], &closing["status"]),
        (&json!("tool_result"), &json!("chat-1"), &json!("lost")),
        "{entries:#?}"
    );
    assert_eq!(closing["reason"], ended["reason"]);
    let (openai, anthropic) = exports(&c, &id, "").await;
    let roles: Vec<&str> = openai.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool"]);
    assert_eq!(anthropic.len(), 3);
    assert!(second.terminate().await);
}

/// ACP has one prompt at a time per session: `GET /v1/agents` says the
/// peer takes no mid-turn input, and a `steer` message posted while its turn
/// runs is `queued` (never `steered`), then runs as the next turn.
async fn steer_queues_behind_a_running_turn(kind: &str) {
    let Some(cmd) = peer(kind) else { return };
    let app = server(cmd, |_| {}).await;
    let c = &app.client;
    assert_eq!(peer_agent(c).await["mid_turn_input"], false);
    let s = c.create_session(json!({"policy": "steer"})).await;
    let id = s["id"].as_str().unwrap();
    let (status, first) = c
        .post(id, "/slow 300 one two three four five", None, None)
        .await;
    assert_eq!(status, 201, "{first}");
    running_turn(c, id, 0).await;
    let (status, v) = c.post(id, "and also this", Some("steer"), None).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        v["disposition"],
        json!({"type": "queued", "position": 1}),
        "{v}"
    );
    let t0 = ended_turn(c, id, 0).await;
    assert_eq!(t0["status"], "completed", "{t0}");
    assert_eq!(t0["input"], json!({"from": 1, "to": 1}), "{t0}");
    let t1 = ended_turn(c, id, 1).await;
    let seq = v["entry"]["seq"].as_u64().unwrap();
    assert_eq!(t1["input"], json!({"from": seq, "to": seq}), "{t1}");
    let entries = c.entries(id).await;
    check_log(&entries);
    assert_eq!(
        replies(&entries),
        vec!["echo: one two three four five", "echo: and also this"]
    );
    app.stop().await;
}

macro_rules! for_each_peer {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn python() { super::$scenario("python").await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn typescript() { super::$scenario("ts").await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn rust() { super::$scenario("rust").await }
            }
        )*
    };
}

for_each_peer!(
    streamed_turn,
    cancel_mid_stream_and_late_updates,
    ignored_cancel_is_forced_and_the_next_turn_works,
    death_mid_prompt_fails_with_stderr_and_recovers,
    pipes_closed_before_exit_retire_the_process,
    a_process_lingering_after_its_pipes_closed_is_killed,
    a_stopped_turns_prompt_does_not_end_the_next_turn,
    session_load_after_restart_keeps_history_single,
    twenty_queued_messages_are_twenty_fifo_prompts,
    permission_policy_is_applied_and_recorded,
    a_peer_that_cannot_start_backs_off,
    a_slow_cold_start_keeps_the_lease,
    a_slow_initialize_keeps_the_lease,
    a_start_past_the_timeout_fails_the_turn,
    a_chunk_after_the_answer_is_not_the_next_turns,
    a_forced_stop_leaves_other_sessions_alone,
    output_past_the_cap_fails_only_that_turn,
    the_user_answers_the_agents_permission_request,
    an_unanswered_agent_request_times_out,
    a_cancel_answers_the_agents_request_first,
    a_restart_while_the_agent_waits_closes_the_request,
    text_tool_text_is_stored_and_exported_in_order,
    cancel_mid_tool_closes_the_call,
    a_server_killed_mid_tool_ends_lost_with_the_call_closed,
    steer_queues_behind_a_running_turn,
);
