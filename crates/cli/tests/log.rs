//! End-to-end tests of the session log's guarantees over real HTTP, with
//! real concurrency and real files: gapless seqs under concurrent writers
//! and retries (I1, I3), durability across SIGKILL and graceful restarts
//! (I2), isolation between owners (I10), gapless stream resume (I9), bad
//! input (I11), idempotency, and the operational endpoints.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Client, PATIENCE};
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long one test may wait for a condition of its own.
const DEADLINE: Duration = Duration::from_secs(20);

fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("random seed: {seed}");
    seed
}

/// Sends and returns the status, the content type and the raw body.
async fn raw(rb: reqwest::RequestBuilder) -> (StatusCode, String, Vec<u8>) {
    let resp = rb.send().await.expect("request failed to send");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.bytes().await.expect("reading body").to_vec();
    (status, ctype, body)
}

/// Asserts a JSON error body `{"error": {"code", "message"}}` with `code`.
#[track_caller]
fn assert_error(what: &str, status: StatusCode, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status.as_u16(), want_status, "{what}: status; body {body}");
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: body is not a JSON object: {body}"));
    assert_eq!(obj.len(), 1, "{what}: only `error` at the top: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: code; body {body}");
    let message = body["error"]["message"].as_str();
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "{what}: a message: {body}"
    );
}

/// Entries must be seq 1, 2, … n.
#[track_caller]
fn assert_gapless(what: &str, entries: &[Value]) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "{what}: seq at position {i}: {e}"
        );
    }
}

fn user_messages(entries: &[Value]) -> Vec<(u64, String)> {
    entries
        .iter()
        .filter(|e| e["type"] == "message" && e["role"] == "user")
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every acknowledged `(seq, content)` is in `entries` exactly once, at
/// its acknowledged seq (so in the acknowledged order too).
#[track_caller]
fn assert_acked_present(what: &str, entries: &[Value], acked: &[(u64, String)]) {
    let users = user_messages(entries);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, content) in &users {
        *count.entry(content.as_str()).or_default() += 1;
    }
    for (seq, content) in acked {
        assert_eq!(
            count.get(content.as_str()),
            Some(&1),
            "{what}: acknowledged {content:?} must be stored exactly once (count: None = lost)"
        );
        let e = &entries[*seq as usize - 1];
        assert_eq!(e["seq"].as_u64(), Some(*seq), "{what}: {e}");
        assert_eq!(
            e["type"], "message",
            "{what}: entry {seq} is the acknowledged message: {e}"
        );
        assert_eq!(e["role"], "user", "{what}: {e}");
        assert_eq!(
            e["content"],
            content.as_str(),
            "{what}: entry {seq} was acknowledged as {content:?}: {e}"
        );
    }
    let mut sorted: Vec<_> = acked.to_vec();
    sorted.sort();
    let positions: Vec<usize> = sorted
        .iter()
        .map(|(_, c)| users.iter().position(|(_, u)| u == c).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "{what}: acknowledged order kept"
    );
}

/// Every `turn_started` has exactly one `turn_ended`, after it (I7).
#[track_caller]
fn assert_turns_end_once(what: &str, entries: &[Value]) {
    let mut started: HashMap<String, u64> = HashMap::new();
    let mut ended: HashMap<String, u64> = HashMap::new();
    for e in entries {
        let seq = e["seq"].as_u64().unwrap();
        if e["type"] == "turn_started" {
            let t = e["turn_id"].as_str().unwrap().to_owned();
            assert!(
                started.insert(t, seq).is_none(),
                "{what}: a turn started twice: {e}"
            );
        } else if e["type"] == "turn_ended" {
            let t = e["turn_id"].as_str().unwrap().to_owned();
            assert!(
                ended.insert(t, seq).is_none(),
                "{what}: a turn ended twice: {e}"
            );
        }
    }
    for (t, s) in &started {
        let end = ended
            .get(t)
            .unwrap_or_else(|| panic!("{what}: turn {t} (started at {s}) never ended"));
        assert!(end > s, "{what}: turn {t} ended before it started");
    }
    assert_eq!(
        started.len(),
        ended.len(),
        "{what}: every ended turn started"
    );
}

// ---------------------------------------------------------------------------
// 1. Concurrent writers with retries.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_with_retries_get_gapless_seqs() {
    const SESSIONS: usize = 4;
    const WRITERS: u64 = 32;
    const PER_WRITER: usize = 10;
    let app = common::spawn_app(|c| c.queue_capacity = 100_000).await;
    let c = app.client.clone();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(
            c.create_session(json!({})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let base_seed = seed();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let c = c.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(base_seed.wrapping_add(w));
            let mut acked = Vec::new();
            for i in 0..PER_WRITER {
                let sid = ids[(w as usize + i) % SESSIONS].clone();
                let key = format!("key-{w}-{i}");
                let content = format!("message {w}/{i}");
                let extra = rng.usize(0..=2);
                // The first `together` requests race each other; the rest
                // are sequential retries after them.
                let together = 1 + rng.usize(0..=extra);
                let mut results =
                    join_all((0..together).map(|_| c.post(&sid, &content, None, Some(&key)))).await;
                for _ in together..=extra {
                    results.push(c.post(&sid, &content, None, Some(&key)).await);
                }
                let what = format!("{key} ({} requests, {together} together)", extra + 1);
                for (status, body) in &results {
                    assert!(
                        *status == StatusCode::CREATED || *status == StatusCode::OK,
                        "{what}: {status} {body}"
                    );
                }
                let created: Vec<_> = results
                    .iter()
                    .filter(|(s, _)| *s == StatusCode::CREATED)
                    .collect();
                assert_eq!(created.len(), 1, "{what}: exactly one 201: {results:?}");
                if together == 1 {
                    assert_eq!(
                        results[0].0,
                        StatusCode::CREATED,
                        "{what}: the first post creates"
                    );
                }
                let first = &created[0].1;
                assert_eq!(first["entry"]["type"], "message", "{what}: {first}");
                assert_eq!(first["entry"]["role"], "user", "{what}: {first}");
                assert_eq!(
                    first["entry"]["content"],
                    content.as_str(),
                    "{what}: {first}"
                );
                assert_eq!(
                    first["entry"]["session_id"],
                    sid.as_str(),
                    "{what}: {first}"
                );
                assert!(
                    first["disposition"]["type"].is_string(),
                    "{what}: a disposition: {first}"
                );
                for (_, body) in &results {
                    assert_eq!(
                        body["entry"], first["entry"],
                        "{what}: a retry returns the original entry"
                    );
                    assert_eq!(
                        body["disposition"], first["disposition"],
                        "{what}: and its disposition"
                    );
                }
                acked.push((sid, first["entry"]["seq"].as_u64().unwrap(), content));
            }
            acked
        }));
    }
    let mut per_session: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for t in tasks {
        for (sid, seq, content) in t.await.unwrap() {
            per_session.entry(sid).or_default().push((seq, content));
        }
    }
    assert_eq!(per_session.len(), SESSIONS);
    for (sid, acked) in &per_session {
        let seqs: HashSet<u64> = acked.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs.len(),
            acked.len(),
            "{sid}: two messages acknowledged with one seq"
        );
        let session = c.wait_idle(sid).await;
        let entries = c.entries(sid).await;
        assert_gapless(sid, &entries);
        assert_eq!(
            session["last_seq"].as_u64(),
            Some(entries.len() as u64),
            "{sid}: last_seq is the log's end"
        );
        assert_eq!(
            user_messages(&entries).len(),
            acked.len(),
            "{sid}: only acknowledged messages are stored"
        );
        assert_acked_present(sid, &entries, acked);
        assert_turns_end_once(sid, &entries);
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 2. SIGKILL.

/// A post that may fail because the server dies: `Ok(Some(seq))` if it was
/// acknowledged (a 2xx with its whole body read), `Ok(None)` if the server
/// did not answer, `Err` for any other answer.
async fn post_or_die(
    c: &Client,
    sid: &str,
    content: &str,
    key: &str,
) -> Result<Option<u64>, String> {
    let rb = c
        .req(Method::POST, &format!("/v1/sessions/{sid}/messages"))
        .header("Idempotency-Key", key)
        .json(&json!({ "content": content }));
    let Ok(resp) = rb.send().await else {
        return Ok(None);
    };
    let status = resp.status();
    let Ok(bytes) = resp.bytes().await else {
        return Ok(None);
    };
    if !status.is_success() {
        return Err(format!(
            "{key}: {status} {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{key}: a 2xx with a bad body: {e}"))?;
    if v["entry"]["content"] != content {
        return Err(format!("{key}: acknowledged a different entry: {v}"));
    }
    Ok(v["entry"]["seq"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_entry() {
    const SESSIONS: usize = 3;
    const WRITERS: usize = 24;
    const ACKS_BEFORE_KILL: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let args = ["--queue-capacity", "100000"];
    let server = common::spawn_binary(&db, &args).await;
    let c = server.client.clone();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(
            c.create_session(json!({})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    // (session, key, content, acknowledged seq) of every attempt.
    type Attempt = (String, String, String, Option<u64>);
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (c, ids, attempts, acks) = (c.clone(), ids.clone(), attempts.clone(), acks.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let sid = ids[(w + i) % SESSIONS].clone();
                let key = format!("kill-{w}-{i}");
                let content = format!("durable {w}/{i}");
                let acked = post_or_die(&c, &sid, &content, &key).await?;
                attempts.lock().unwrap().push((sid, key, content, acked));
                if acked.is_none() {
                    return Ok::<_, String>(());
                }
                acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        }));
    }
    let deadline = Instant::now() + DEADLINE;
    while acks.load(std::sync::atomic::Ordering::SeqCst) < ACKS_BEFORE_KILL {
        assert!(Instant::now() < deadline, "the writers made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9().await;
    for w in writers {
        tokio::time::timeout(DEADLINE, w)
            .await
            .expect("a writer hangs after the kill")
            .unwrap()
            .unwrap();
    }
    let attempts = std::mem::take(&mut *attempts.lock().unwrap());
    let acked_total = attempts.iter().filter(|a| a.3.is_some()).count();
    assert!(acked_total >= ACKS_BEFORE_KILL);
    assert_eq!(
        attempts.len(),
        acked_total + WRITERS,
        "each writer stops at its first failure"
    );

    // Restart on the same file: everything acknowledged is there.
    let server = common::spawn_binary(&db, &args).await;
    let c = server.client.clone();
    for sid in &ids {
        let acked: Vec<(u64, String)> = attempts
            .iter()
            .filter(|a| &a.0 == sid)
            .filter_map(|a| a.3.map(|s| (s, a.2.clone())))
            .collect();
        let entries = c.entries(sid).await;
        assert_gapless(sid, &entries);
        assert_acked_present(sid, &entries, &acked);
        // Nothing stored twice, acknowledged or not.
        let users = user_messages(&entries);
        let distinct: HashSet<&String> = users.iter().map(|(_, c)| c).collect();
        assert_eq!(distinct.len(), users.len(), "{sid}: a message stored twice");
    }
    // Retrying the posts whose answer was lost stores each exactly once.
    for (sid, key, content, _) in attempts.iter().filter(|a| a.3.is_none()) {
        let (status, v) = c.post(sid, content, None, Some(key)).await;
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{key}: {status} {v}"
        );
        assert_eq!(v["entry"]["content"], content.as_str());
    }
    for sid in &ids {
        let entries = c.entries(sid).await;
        assert_gapless(sid, &entries);
        let users = user_messages(&entries);
        let distinct: HashSet<&String> = users.iter().map(|(_, c)| c).collect();
        assert_eq!(
            distinct.len(),
            users.len(),
            "{sid}: a retried message stored twice"
        );
        let expected = attempts.iter().filter(|a| &a.0 == sid).count();
        assert_eq!(
            users.len(),
            expected,
            "{sid}: every attempted message is stored once"
        );
    }
    server.kill9().await;
}

// ---------------------------------------------------------------------------
// 3. Isolation.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owners_cannot_see_each_other() {
    let app = common::spawn_app(|cfg| {
        cfg.tokens = vec![
            ("alice".into(), "a-secret".into()),
            ("bob".into(), "b-secret".into()),
        ];
    })
    .await;
    let alice = app.client.with_token("a-secret");
    let bob = app.client.with_token("b-secret");
    let s = alice
        .create_session(json!({"message": "alice's secret", "metadata": {"k": "v"}}))
        .await;
    assert_eq!(s["owner"], "alice");
    let id = s["id"].as_str().unwrap().to_owned();
    alice.wait_idle(&id).await;
    // A turn runs while Bob tries everything, so a cancel, delete or post
    // that reached it would show.
    let (status, hang) = alice.post(&id, "/hang", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{hang}");
    let hang_turn = hang["disposition"]["turn_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + DEADLINE;
    while alice.turns(&id).await.last().unwrap()["status"] != "running" {
        assert!(Instant::now() < deadline, "the turn never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, before) = alice.session(&id).await;
    assert_eq!(before["status"], "running", "{before}");
    assert_eq!(before["turn_id"], hang_turn.as_str(), "{before}");
    let log_before = alice.entries(&id).await;
    assert!(log_before.len() >= 6, "{log_before:#?}");
    let turns_before = alice.turns(&id).await;

    // Every route under a session answers Bob about Alice's session exactly
    // as about one that does not exist.
    // (method, path after the session, body, headers)
    type Route<'a> = (Method, &'a str, Option<Value>, Vec<(&'a str, &'a str)>);
    let routes: Vec<Route> = vec![
        (Method::GET, "", None, vec![]),
        (Method::DELETE, "", None, vec![]),
        (
            Method::POST,
            "/messages",
            Some(json!({"content": "bob was here"})),
            vec![],
        ),
        (
            Method::POST,
            "/messages",
            Some(json!({"content": "bob again"})),
            vec![("Idempotency-Key", "bob-key")],
        ),
        (Method::GET, "/stream", None, vec![]),
        (Method::GET, "/stream", None, vec![("Last-Event-ID", "1")]),
        (Method::GET, "/stream?after=2", None, vec![]),
        (Method::GET, "/entries", None, vec![]),
        (Method::GET, "/entries?after=1&limit=2", None, vec![]),
        (Method::GET, "/turns", None, vec![]),
        (Method::GET, "/export", None, vec![]),
        (Method::GET, "/export?format=openai", None, vec![]),
        (Method::POST, "/cancel", None, vec![]),
    ];
    for (method, suffix, body, headers) in &routes {
        let request = |sid: &str| {
            let mut rb = bob.req(method.clone(), &format!("/v1/sessions/{sid}{suffix}"));
            if let Some(b) = body {
                rb = rb.json(b);
            }
            for (k, v) in headers {
                rb = rb.header(*k, *v);
            }
            rb
        };
        let what = format!("bob: {method} …{suffix}");
        let (s_alice, t_alice, b_alice) = raw(request(&id)).await;
        let (s_none, t_none, b_none) = raw(request(&random_id())).await;
        assert_eq!(s_alice, s_none, "{what}: status");
        assert_eq!(
            String::from_utf8_lossy(&b_alice),
            String::from_utf8_lossy(&b_none),
            "{what}: body byte for byte"
        );
        assert_eq!(t_alice, t_none, "{what}: content type");
        let v: Value = serde_json::from_slice(&b_alice).unwrap();
        assert_error(&what, s_alice, &v, 404, "not_found");
    }

    // Bob's list does not have it; his creates with Alice's key are his own.
    let (status, list) = bob.send(bob.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["sessions"], json!([]), "bob sees nothing: {list}");
    let (status, list) = alice.send(alice.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(status, StatusCode::OK);
    let alice_ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(alice_ids, vec![id.as_str()]);
    let create = |c: &Client| {
        c.req(Method::POST, "/v1/sessions")
            .header("Idempotency-Key", "same-key")
            .json(&json!({}))
    };
    let (s1, a2) = alice.send(create(&alice)).await;
    let (s2, b1) = bob.send(create(&bob)).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::CREATED, StatusCode::CREATED),
        "{a2} {b1}"
    );
    assert_ne!(a2["id"], b1["id"]);
    assert_eq!(b1["owner"], "bob");
    let (status, list) = bob.send(bob.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(status, StatusCode::OK);
    let bob_ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(bob_ids, vec![b1["id"].as_str().unwrap()]);

    // Alice's session is untouched.
    let (status, after) = alice.session(&id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(after, before);
    assert_eq!(alice.entries(&id).await, log_before);
    assert_eq!(alice.turns(&id).await, turns_before);

    // No token, a wrong token, a wrong scheme: 401 JSON.
    let anon = Client::new(app.client.base.clone());
    let wrong = app.client.with_token("c-secret");
    let paths = [
        "/v1/sessions".to_owned(),
        format!("/v1/sessions/{id}"),
        format!("/v1/sessions/{id}/entries"),
    ];
    for path in &paths {
        for (who, rb) in [
            ("no token", anon.req(Method::GET, path)),
            ("wrong token", wrong.req(Method::GET, path)),
            (
                "prefix of a token",
                app.client.with_token("a-secre").req(Method::GET, path),
            ),
            (
                "basic auth",
                anon.req(Method::GET, path)
                    .basic_auth("alice", Some("a-secret")),
            ),
            (
                "bare secret",
                anon.req(Method::GET, path)
                    .header("Authorization", "a-secret"),
            ),
        ] {
            let (status, v) = anon.send(rb).await;
            assert_error(&format!("{who} on {path}"), status, &v, 401, "unauthorized");
        }
    }
    let (status, v) = anon
        .send(
            anon.req(Method::POST, &format!("/v1/sessions/{id}/messages"))
                .json(&json!({"content": "x"})),
        )
        .await;
    assert_error("anonymous post", status, &v, 401, "unauthorized");
    assert_eq!(alice.entries(&id).await, log_before);

    // Alice can still do what Bob could not.
    let (status, v) = alice.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["turn_id"], hang_turn.as_str());
    alice.wait_idle(&id).await;
    let log = alice.entries(&id).await;
    assert_eq!(&log[..log_before.len()], &log_before[..]);
    assert_eq!(log.last().unwrap()["type"], "turn_ended");
    assert_eq!(log.last().unwrap()["status"], "cancelled");
    let (status, _) = alice
        .send(alice.req(Method::DELETE, &format!("/v1/sessions/{id}")))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = alice.session(&id).await;
    assert_error("deleted", status, &v, 404, "not_found");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 4. Gapless stream resume.

/// One SSE event as it was on the wire.
#[derive(Debug)]
struct WireEvent {
    event: String,
    /// `None` when the event had no `id:` field.
    id: Option<String>,
    data: String,
}

/// A minimal SSE reader that keeps what `id` fields were really sent.
struct WireStream {
    resp: reqwest::Response,
    buf: String,
}

impl WireStream {
    async fn next(&mut self, deadline: Instant) -> Option<WireEvent> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = WireEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => ev.event = value.to_owned(),
                        "id" => ev.id = Some(value.to_owned()),
                        "data" => {
                            if has_data {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(value);
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if has_data {
                    return Some(ev);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .ok()??;
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("SSE is UTF-8"));
        }
    }
}

/// Opens a stream with an optional `Last-Event-ID` and query; the error
/// status and body if it is refused.
async fn open_wire(
    c: &Client,
    sid: &str,
    last_event_id: Option<&str>,
    query: &str,
) -> Result<WireStream, (StatusCode, Value)> {
    let mut rb = c.req(Method::GET, &format!("/v1/sessions/{sid}/stream{query}"));
    if let Some(k) = last_event_id {
        rb = rb.header("Last-Event-ID", k);
    }
    let resp = rb.send().await.expect("opening a stream");
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = resp.json().await.unwrap_or(Value::Null);
        return Err((status, body));
    }
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .unwrap()
        .to_str()
        .unwrap();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    Ok(WireStream {
        resp,
        buf: String::new(),
    })
}

async fn last_seq(c: &Client, sid: &str) -> u64 {
    let (status, s) = c.session(sid).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    s["last_seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_resumes_gaplessly_from_every_last_event_id() {
    const WARM: usize = 10;
    const MORE: usize = 30;
    let app = common::spawn_app(|c| c.queue_capacity = 100_000).await;
    let c = app.client.clone();
    let sid = c.create_session(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..WARM {
        let (status, v) = c.post(&sid, &format!("warm up {i}"), None, None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    c.wait_idle(&sid).await;
    let l0 = last_seq(&c, &sid).await;
    let n = l0 + 20;
    let target = l0 + 60;
    // Each message makes four entries (message, turn_started, reply,
    // turn_ended), so the log passes `target`.
    assert!(l0 + 4 * MORE as u64 > target);

    let writer = {
        let (c, sid) = (c.clone(), sid.clone());
        tokio::spawn(async move {
            for i in 0..MORE {
                let (status, v) = c
                    .post(&sid, &format!("live message number {i}"), None, None)
                    .await;
                assert_eq!(status, StatusCode::CREATED, "{v}");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let deadline = Instant::now() + DEADLINE;
    let mut readers = Vec::new();
    for k in 0..=n {
        let (c, sid) = (c.clone(), sid.clone());
        readers.push(tokio::spawn(async move {
            // Only a cursor the log has reached is valid.
            while last_seq(&c, &sid).await < k {
                assert!(Instant::now() < deadline, "the log never reached {k}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let ks = k.to_string();
            let (header, query) = match k % 3 {
                0 => (Some(ks.as_str()), String::new()),
                1 => (None, format!("?after={k}")),
                // Last-Event-ID wins over ?after.
                _ => (Some(ks.as_str()), format!("?after={}", k / 2)),
            };
            let mut stream = open_wire(&c, &sid, header, &query)
                .await
                .unwrap_or_else(|e| panic!("stream after {k}: {e:?}"));
            let mut seqs = Vec::new();
            let mut deltas = 0;
            loop {
                let ev = stream
                    .next(deadline)
                    .await
                    .unwrap_or_else(|| panic!("stream after {k} ended or stalled; got {seqs:?}"));
                match ev.event.as_str() {
                    "entry" => {
                        let data: Value = serde_json::from_str(&ev.data).unwrap();
                        let seq = data["seq"].as_u64().unwrap();
                        assert_eq!(
                            ev.id.as_deref(),
                            Some(seq.to_string().as_str()),
                            "after {k}: id is the seq"
                        );
                        assert_eq!(data["session_id"], sid.as_str());
                        seqs.push(seq);
                        if seq >= target {
                            break;
                        }
                    }
                    "delta" => {
                        assert_eq!(ev.id, None, "after {k}: a delta has no id: {ev:?}");
                        let data: Value = serde_json::from_str(&ev.data).unwrap();
                        let turn = data["turn_id"]
                            .as_str()
                            .unwrap_or_else(|| panic!("a delta's turn_id: {ev:?}"));
                        assert_eq!(turn.len(), 36, "{ev:?}");
                        assert!(data["text"].is_string(), "a delta's text: {ev:?}");
                        deltas += 1;
                    }
                    other => panic!("after {k}: unexpected event {other:?}: {ev:?}"),
                }
            }
            let want: Vec<u64> = (k + 1..=target).collect();
            assert_eq!(
                seqs, want,
                "stream after {k}: exactly k+1..=target, in order"
            );
            deltas
        }));
    }
    // A cursor past the end is refused while the log grows, too.
    let far = (last_seq(&c, &sid).await + 1_000_000).to_string();
    let e = open_wire(&c, &sid, Some(&far), "").await.err().unwrap();
    assert_error(
        "Last-Event-ID far beyond",
        e.0,
        &e.1,
        400,
        "invalid_request",
    );

    let mut deltas = 0;
    for r in readers {
        deltas += r.await.unwrap();
    }
    assert!(deltas > 0, "live deltas reach the streams");
    writer.await.unwrap();
    c.wait_idle(&sid).await;
    let last = last_seq(&c, &sid).await;
    assert_eq!(last, l0 + 4 * MORE as u64);

    // At the end: `last` is a valid cursor, `last + 1` is not.
    let mut s = open_wire(&c, &sid, Some(&last.to_string()), "")
        .await
        .unwrap();
    let quiet = s.next(Instant::now() + Duration::from_millis(200)).await;
    assert!(quiet.is_none(), "nothing after the end: {quiet:?}");
    let beyond = (last + 1).to_string();
    let e = open_wire(&c, &sid, Some(&beyond), "").await.err().unwrap();
    assert_error(
        "Last-Event-ID = last_seq + 1",
        e.0,
        &e.1,
        400,
        "invalid_request",
    );
    let e = open_wire(&c, &sid, None, &format!("?after={beyond}"))
        .await
        .err()
        .unwrap();
    assert_error("?after = last_seq + 1", e.0, &e.1, 400, "invalid_request");
    // Last-Event-ID wins over ?after, in both directions.
    let e = open_wire(&c, &sid, Some(&beyond), "?after=1")
        .await
        .err()
        .unwrap();
    assert_error(
        "Last-Event-ID beyond with a valid ?after",
        e.0,
        &e.1,
        400,
        "invalid_request",
    );
    let mut s = open_wire(
        &c,
        &sid,
        Some(&(last - 1).to_string()),
        &format!("?after={}", last - 5),
    )
    .await
    .unwrap();
    let ev = s.next(Instant::now() + DEADLINE).await.unwrap();
    assert_eq!(ev.id, Some(last.to_string()), "{ev:?}");
    // Malformed cursors are refused, never a silent full replay.
    for bad in [
        "abc",
        "-1",
        "1.5",
        "1e3",
        "+3",
        "0x10",
        "3 4",
        "99999999999999999999999",
    ] {
        let e = open_wire(&c, &sid, Some(bad), "")
            .await
            .err()
            .unwrap_or_else(|| panic!("Last-Event-ID {bad:?} accepted"));
        assert_error(
            &format!("Last-Event-ID {bad:?}"),
            e.0,
            &e.1,
            400,
            "invalid_request",
        );
        let q = format!("?after={}", urlencode(bad));
        let e = open_wire(&c, &sid, None, &q)
            .await
            .err()
            .unwrap_or_else(|| panic!("{q} accepted"));
        assert_error(
            &format!("?after={bad:?}"),
            e.0,
            &e.1,
            400,
            "invalid_request",
        );
    }
    let e = open_wire(&c, &sid, None, "?after=").await.err().unwrap();
    assert_error("?after= (empty)", e.0, &e.1, 400, "invalid_request");
    app.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 5. Bad input.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_4xx_json_and_writes_nothing() {
    let app = common::spawn_app(|_| {}).await;
    let c = app.client.clone();
    let s = c.create_session(json!({"message": "hello"})).await;
    let sid = s["id"].as_str().unwrap().to_owned();
    c.wait_idle(&sid).await;
    let log_before = c.entries(&sid).await;
    let (_, list_before) = c.send(c.req(Method::GET, "/v1/sessions")).await;

    let big = "x".repeat(300 * 1024);
    let big_message = format!("{{\"content\":\"{big}\"}}");
    let big_create = format!("{{\"message\":\"{big}\"}}");
    let long_key = "k".repeat(256);
    let messages = format!("/v1/sessions/{sid}/messages");

    // (what, path, body, extra header, status, code)
    type Case<'a> = (
        &'a str,
        String,
        String,
        Option<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        // POST /v1/sessions
        (
            "create: invalid JSON",
            "/v1/sessions".into(),
            "{\"agent\":".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: not an object",
            "/v1/sessions".into(),
            "[1]".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: message is a number",
            "/v1/sessions".into(),
            "{\"message\":5}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: empty message",
            "/v1/sessions".into(),
            "{\"message\":\"\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: unknown field",
            "/v1/sessions".into(),
            "{\"extra\":1}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: unknown policy",
            "/v1/sessions".into(),
            "{\"policy\":\"yolo\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: policy is a number",
            "/v1/sessions".into(),
            "{\"policy\":5}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: unknown agent",
            "/v1/sessions".into(),
            "{\"agent\":\"nope\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: metadata is a list",
            "/v1/sessions".into(),
            "{\"metadata\":[1]}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: metadata is a string",
            "/v1/sessions".into(),
            "{\"metadata\":\"x\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: metadata not an object, with a message",
            "/v1/sessions".into(),
            "{\"metadata\":7,\"message\":\"hi\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: key too long",
            "/v1/sessions".into(),
            "{\"message\":\"hi\"}".into(),
            Some(("Idempotency-Key", &long_key)),
            400,
            "invalid_request",
        ),
        (
            "create: not JSON content type",
            "/v1/sessions".into(),
            "{}".into(),
            Some(("Content-Type", "text/plain")),
            400,
            "invalid_request",
        ),
        // POST /messages
        (
            "post: invalid JSON",
            messages.clone(),
            "{\"content\":\"x\"".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: empty body",
            messages.clone(),
            String::new(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: content is a number",
            messages.clone(),
            "{\"content\":5}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: content is null",
            messages.clone(),
            "{\"content\":null}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: no content",
            messages.clone(),
            "{}".into(),
            None,
            400,
            "invalid_request",
        ),
        // PostgreSQL's text cannot hold a NUL byte: refused on both stores.
        (
            "post: content with a NUL byte",
            messages.clone(),
            "{\"content\":\"a\\u0000b\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "create: message with a NUL byte",
            "/v1/sessions".into(),
            "{\"message\":\"a\\u0000b\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: empty content",
            messages.clone(),
            "{\"content\":\"\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: unknown field",
            messages.clone(),
            "{\"content\":\"x\",\"extra\":1}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: unknown policy",
            messages.clone(),
            "{\"content\":\"x\",\"policy\":\"yolo\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: key too long",
            messages.clone(),
            "{\"content\":\"x\"}".into(),
            Some(("Idempotency-Key", &long_key)),
            400,
            "invalid_request",
        ),
        (
            "post: malformed session id",
            "/v1/sessions/not-a-session/messages".into(),
            "{\"content\":\"x\"}".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "post: session id in braces",
            format!("/v1/sessions/%7B{sid}%7D/messages"),
            "{\"content\":\"x\"}".into(),
            None,
            400,
            "invalid_request",
        ),
    ];
    for (what, path, body, header, status, code) in &cases {
        let mut rb = c.req(Method::POST, path).body(body.clone());
        match header {
            Some((k, v)) if k.eq_ignore_ascii_case("content-type") => rb = rb.header(*k, *v),
            Some((k, v)) => rb = rb.header("Content-Type", "application/json").header(*k, *v),
            None => rb = rb.header("Content-Type", "application/json"),
        }
        let (got, ctype, bytes) = raw(rb).await;
        assert!(
            ctype.starts_with("application/json"),
            "{what}: JSON content type, got {ctype:?}"
        );
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{what}: not JSON: {}", String::from_utf8_lossy(&bytes)));
        assert_error(what, got, &v, *status, code);
    }

    // Oversized bodies, with a Content-Length and chunked (no length): the
    // client, still sending when the server refuses, must get the 413, not
    // a reset connection; repeated, since a reset is a matter of timing.
    for round in 0..25 {
        for (route, path, body) in [
            ("create", "/v1/sessions", &big_create),
            ("post", messages.as_str(), &big_message),
        ] {
            for chunked in [false, true] {
                let what = format!("{route}: 300 KiB, chunked: {chunked}, round {round}");
                let rb = c
                    .req(Method::POST, path)
                    .header("Content-Type", "application/json");
                let rb = if chunked {
                    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
                        .as_bytes()
                        .chunks(8 * 1024)
                        .map(|c| Ok(c.to_vec()))
                        .collect();
                    rb.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                        chunks,
                    )))
                } else {
                    rb.body(body.clone())
                };
                let resp = rb
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{what}: no answer: {e:?}"));
                let status = resp.status();
                let v: Value = resp
                    .json()
                    .await
                    .unwrap_or_else(|e| panic!("{what}: body: {e:?}"));
                assert_error(&what, status, &v, 413, "payload_too_large");
            }
        }
    }

    // Bad ids and queries on reads.
    let reads = [
        ("get: malformed id", "/v1/sessions/xyz".to_owned()),
        (
            "entries: malformed id",
            "/v1/sessions/123/entries".to_owned(),
        ),
        (
            "entries: after=-1",
            format!("/v1/sessions/{sid}/entries?after=-1"),
        ),
        (
            "entries: after=abc",
            format!("/v1/sessions/{sid}/entries?after=abc"),
        ),
        (
            "entries: after=1.5",
            format!("/v1/sessions/{sid}/entries?after=1.5"),
        ),
        (
            "entries: after=",
            format!("/v1/sessions/{sid}/entries?after="),
        ),
        (
            "entries: limit=-5",
            format!("/v1/sessions/{sid}/entries?limit=-5"),
        ),
        (
            "entries: limit=ten",
            format!("/v1/sessions/{sid}/entries?limit=ten"),
        ),
        (
            "entries: limit=1e2",
            format!("/v1/sessions/{sid}/entries?limit=1e2"),
        ),
        ("turns: malformed id", "/v1/sessions/nope/turns".to_owned()),
        (
            "stream: malformed id",
            "/v1/sessions/nope/stream".to_owned(),
        ),
    ];
    for (what, path) in &reads {
        let (status, v) = c.send(c.req(Method::GET, path)).await;
        assert_error(what, status, &v, 400, "invalid_request");
    }
    for (what, method, path) in [
        ("delete: malformed id", Method::DELETE, "/v1/sessions/nope"),
        (
            "cancel: malformed id",
            Method::POST,
            "/v1/sessions/nope/cancel",
        ),
    ] {
        let (status, v) = c.send(c.req(method, path)).await;
        assert_error(what, status, &v, 400, "invalid_request");
    }

    // Nothing was written anywhere.
    let (_, s_after) = c.session(&sid).await;
    assert_eq!(s_after["last_seq"].as_u64(), Some(log_before.len() as u64));
    assert_eq!(c.entries(&sid).await, log_before, "the log is unchanged");
    let (_, list_after) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(list_after, list_before, "no session was created");
    assert_eq!(list_after["sessions"].as_array().unwrap().len(), 1);

    // Control: the same requests, well-formed, succeed (so the failures
    // above are about the input, not the route), including a chunked body.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"content\":".to_vec()),
        Ok(b"\"chunked ok\"}".to_vec()),
    ];
    let rb = c
        .req(Method::POST, &messages)
        .header("Content-Type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
    let (status, v) = c.send(rb).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["entry"]["seq"].as_u64(),
        Some(log_before.len() as u64 + 1)
    );
    let just_under = format!("{{\"content\":\"{}\"}}", "y".repeat(200 * 1024));
    let (status, v) = c
        .send(
            c.req(Method::POST, &messages)
                .header("Content-Type", "application/json")
                .body(just_under),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 6. Idempotency.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_conflict_and_concurrent_same_key() {
    let app = common::spawn_app(|c| c.queue_capacity = 100_000).await;
    let c = app.client.clone();
    let sid = c.create_session(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, first) = c.post(&sid, "original", None, Some("k1")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, v) = c.post(&sid, "different", None, Some("k1")).await;
    assert_error(
        "same key, other content",
        status,
        &v,
        409,
        "idempotency_conflict",
    );
    let (status, v) = c.post(&sid, "original", Some("reject"), Some("k1")).await;
    assert_error(
        "same key, other policy",
        status,
        &v,
        409,
        "idempotency_conflict",
    );
    let (status, again) = c.post(&sid, "original", None, Some("k1")).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["entry"], first["entry"]);
    assert_eq!(again["disposition"], first["disposition"]);
    // Keys are per session: the same key elsewhere is a new message.
    let other = c.create_session(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, v) = c.post(&other, "different", None, Some("k1")).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    // 16 concurrent posts with one key: one 201, fifteen 200, one entry.
    let results = join_all((0..16).map(|_| c.post(&sid, "raced", None, Some("k2")))).await;
    let created: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .collect();
    let replayed = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!((created.len(), replayed), (1, 15), "{results:?}");
    let winner = &created[0].1;
    for (_, v) in &results {
        assert_eq!(v["entry"], winner["entry"]);
        assert_eq!(v["disposition"], winner["disposition"]);
    }
    // Racing retries of a conflicting body never sneak in either.
    let conflicts = join_all((0..8).map(|i| {
        let (c, sid) = (c.clone(), sid.clone());
        async move { c.post(&sid, &format!("raced {i}"), None, Some("k2")).await }
    }))
    .await;
    for (status, v) in &conflicts {
        assert_error("racing conflicts", *status, v, 409, "idempotency_conflict");
    }
    c.wait_idle(&sid).await;
    let entries = c.entries(&sid).await;
    assert_gapless(&sid, &entries);
    let users = user_messages(&entries);
    let contents: Vec<&str> = users.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(contents, vec!["original", "raced"], "{entries:#?}");
    assert_eq!(users[1].0, winner["entry"]["seq"].as_u64().unwrap());

    // Concurrent creates with one key: one session.
    let (_, list_before) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    let body = json!({"message": "created once", "metadata": {"n": 1}});
    let creates = join_all((0..12).map(|_| {
        c.send(
            c.req(Method::POST, "/v1/sessions")
                .header("Idempotency-Key", "create-1")
                .json(&body),
        )
    }))
    .await;
    let created: Vec<_> = creates
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .collect();
    let replayed = creates.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!((created.len(), replayed), (1, 11), "{creates:?}");
    let new_id = created[0].1["id"].as_str().unwrap().to_owned();
    for (_, v) in &creates {
        assert_eq!(v["id"], new_id.as_str());
    }
    let (status, v) = c
        .send(
            c.req(Method::POST, "/v1/sessions")
                .header("Idempotency-Key", "create-1")
                .json(&json!({"message": "other"})),
        )
        .await;
    assert_error(
        "create: same key, other body",
        status,
        &v,
        409,
        "idempotency_conflict",
    );
    let (_, list_after) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    let ids = |l: &Value| -> HashSet<String> {
        l["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let added: Vec<String> = ids(&list_after)
        .difference(&ids(&list_before))
        .cloned()
        .collect();
    assert_eq!(added, vec![new_id.clone()]);
    // The first message was stored once, as entry 1.
    c.wait_idle(&new_id).await;
    let entries = c.entries(&new_id).await;
    assert_gapless(&new_id, &entries);
    let users = user_messages(&entries);
    assert_eq!(users, vec![(1, "created once".to_owned())]);
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 7. Operational endpoints.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_metrics_openapi() {
    let app = common::spawn_app(|_| {}).await;
    let c = app.client.clone();
    let (status, ctype, body) = raw(c.req(Method::GET, "/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "ok", "{v}");

    let s = c.create_session(json!({"message": "count me"})).await;
    c.wait_idle(s["id"].as_str().unwrap()).await;
    let (status, ctype, body) = raw(c.req(Method::GET, "/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        ctype.starts_with("text/plain") || ctype.starts_with("application/openmetrics-text"),
        "{ctype}"
    );
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("baton_http_requests_total"), "{text}");
    // Prometheus text: every sample line is `name{labels} value`.
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(!samples.is_empty());
    for line in &samples {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "a sample line: {line:?}");
    }
    let create_line = samples
        .iter()
        .find(|l| {
            l.starts_with("baton_http_requests_total{")
                && l.contains("route=\"/v1/sessions\"")
                && l.contains("method=\"POST\"")
        })
        .unwrap_or_else(|| panic!("the create was counted: {text}"));
    assert!(create_line.contains("status=\"201\""), "{create_line}");

    let (status, ctype, body) = raw(c.req(Method::GET, "/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let doc: Value = serde_json::from_slice(&body).expect("the OpenAPI document is JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    let routes = [
        ("post", "/v1/sessions"),
        ("get", "/v1/sessions"),
        ("get", "/v1/sessions/{id}"),
        ("delete", "/v1/sessions/{id}"),
        ("post", "/v1/sessions/{id}/messages"),
        ("get", "/v1/sessions/{id}/entries"),
        ("get", "/v1/sessions/{id}/stream"),
        ("post", "/v1/sessions/{id}/cancel"),
        ("get", "/v1/sessions/{id}/turns"),
        ("get", "/v1/sessions/{id}/export"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];
    for (method, path) in routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "the document lacks {method} {path}; it has {:?}",
            paths.keys()
        );
    }
    let export_params: Vec<&str> = paths["/v1/sessions/{id}/export"]["get"]["parameters"]
        .as_array()
        .expect("export parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in [
        "format",
        "after",
        "upto",
        "include_running",
        "include_thoughts",
    ] {
        assert!(
            export_params.contains(&name),
            "export lacks {name}: {export_params:?}"
        );
    }
    let kinds = doc["components"]["schemas"]["EntryType"].to_string();
    for kind in ["thought", "permission_request", "permission_decision"] {
        assert!(kinds.contains(kind), "EntryType lacks {kind}: {kinds}");
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 8. Graceful shutdown.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_keeps_acknowledged_entries() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let app = common::spawn_app_on(&db, |c| c.queue_capacity = 100_000).await;
    let c = app.client.clone();
    let slow = c.create_session(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fast = c.create_session(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A turn that is surely running at shutdown, with messages queued
    // behind it; and a session busy with many short turns.
    let (status, sleeper) = c
        .post(&slow, "/sleep 60000 still running", None, Some("sleeper"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sleeper}");
    let sleeper_turn = sleeper["disposition"]["turn_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let posts = (0..40).map(|i| {
        let sid = if i % 2 == 0 {
            slow.clone()
        } else {
            fast.clone()
        };
        let c = c.clone();
        async move {
            let content = format!("kept {i}");
            let (status, v) = c.post(&sid, &content, None, Some(&format!("g-{i}"))).await;
            assert_eq!(status, StatusCode::CREATED, "{v}");
            (sid, v["entry"]["seq"].as_u64().unwrap(), content)
        }
    });
    let mut acked = join_all(posts).await;
    acked.push((
        slow.clone(),
        sleeper["entry"]["seq"].as_u64().unwrap(),
        "/sleep 60000 still running".into(),
    ));
    c.wait_session(&slow, |s| {
        s["status"] == "running" && s["turn_id"] == sleeper_turn.as_str()
    })
    .await;
    let before_slow = c.entries(&slow).await;
    let before_fast = c.entries(&fast).await;

    let t0 = Instant::now();
    tokio::time::timeout(PATIENCE, app.stop())
        .await
        .expect("graceful shutdown hangs");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t0.elapsed()
    );

    let app = common::spawn_app_on(&db, |c| c.queue_capacity = 100_000).await;
    let c = app.client.clone();
    for (sid, before) in [(&slow, &before_slow), (&fast, &before_fast)] {
        let entries = c.entries(sid).await;
        assert_gapless(sid, &entries);
        assert_eq!(
            &entries[..before.len()],
            &before[..],
            "{sid}: what was read before stop is unchanged"
        );
        let mine: Vec<(u64, String)> = acked
            .iter()
            .filter(|a| &a.0 == sid)
            .map(|a| (a.1, a.2.clone()))
            .collect();
        assert_acked_present(sid, &entries, &mine);
        // The queue goes on after the restart; every turn ends once.
        c.wait_idle(sid).await;
        let entries = c.entries(sid).await;
        assert_gapless(sid, &entries);
        assert_acked_present(sid, &entries, &mine);
        assert_eq!(user_messages(&entries).len(), mine.len());
        assert_turns_end_once(sid, &entries);
    }
    let entries = c.entries(&slow).await;
    let end = entries
        .iter()
        .find(|e| e["type"] == "turn_ended" && e["turn_id"] == sleeper_turn.as_str())
        .expect("the running turn ended");
    assert_eq!(end["status"], "cancelled", "{end}");
    assert_eq!(end["reason"], "shutdown", "{end}");
    app.stop().await;
}

/// `GET /v1/sessions` pages newest first with an opaque cursor, filters by
/// status and agent, and refuses a bad limit, cursor, status or parameter
/// with a `400` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_list_pages_by_cursor_and_refuses_bad_parameters() {
    let app = common::spawn_app(|_| {}).await;
    let c = app.client.clone();
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(c.create_session_id(json!({})).await);
    }
    let busy = c.create_session_id(json!({"message": "/hang"})).await;
    created.push(busy.clone());
    let mut seen = Vec::new();
    let mut path = "/v1/sessions?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = c.send(c.req(Method::GET, &path)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        let items = page["sessions"].as_array().unwrap();
        assert!(items.len() <= 2);
        for s in items {
            assert!(s["last_activity_at"].is_string(), "{s}");
            seen.push(s["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/sessions?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    created.reverse();
    assert_eq!(seen, created, "newest first, each once");

    let (_, running) = c
        .send(c.req(Method::GET, "/v1/sessions?status=running"))
        .await;
    assert_eq!(running["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(running["sessions"][0]["id"], busy.as_str());
    assert_eq!(running["next_cursor"], Value::Null);
    let (_, idle) = c
        .send(c.req(Method::GET, "/v1/sessions?status=idle&agent=demo"))
        .await;
    assert_eq!(idle["sessions"].as_array().unwrap().len(), 5);
    let (_, none) = c
        .send(c.req(Method::GET, "/v1/sessions?agent=nobody"))
        .await;
    assert_eq!(none["sessions"], json!([]));

    for (query, names) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=two", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=12.not-a-uuid", "cursor"),
        ("cursor=.9b2f0c1e-0000-4000-8000-000000000000", "cursor"),
        ("status=busy", "status"),
        ("page=2", "page"),
    ] {
        let (status, body) = c
            .send(c.req(Method::GET, &format!("/v1/sessions?{query}")))
            .await;
        assert_error(query, status, &body, 400, "invalid_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(names),
            "{query}: the message names {names}: {body}"
        );
    }
    c.cancel(&busy).await;
}

/// The inspector's page and files are served without a token, from the
/// binary, with a Content-Security-Policy that forbids inline code; a file
/// it does not have is a JSON 404; the page says whether a token is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inspector_is_served_with_a_strict_content_security_policy() {
    let app = common::spawn_app(|cfg| cfg.tokens = vec![("alice".into(), "s1".into())]).await;
    let c = Client::new(app.client.base.clone());
    for (path, ctype) in [
        ("/", "text/html; charset=utf-8"),
        (
            "/sessions/9b2f0c1e-0000-4000-8000-000000000000",
            "text/html; charset=utf-8",
        ),
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/style.css", "text/css; charset=utf-8"),
    ] {
        let resp = c.req(Method::GET, path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert_eq!(h["content-type"], ctype, "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = resp.text().await.unwrap();
        if path == "/" {
            assert!(body.contains(r#"<meta name="baton-auth" content="token">"#));
            assert!(!body.contains("s1"), "no secret in the page");
        }
    }
    let (status, body) = c.send(c.req(Method::GET, "/assets/nope.js")).await;
    assert_error("a missing file", status, &body, 404, "not_found");
    // The page links to the API document.
    let page = c
        .req(Method::GET, "/")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"href="/openapi.json""#), "{page}");
    // A client that wants JSON at `/` gets an index of the documents.
    let (status, body) = c
        .send(c.req(Method::GET, "/").header("accept", "application/json"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["api"], "/openapi.json", "{body}");
    assert_eq!(body["inspector"], "/", "{body}");
    // An unknown route points to both.
    let (status, body) = c.send(c.req(Method::GET, "/v2/nothing")).await;
    assert_error("an unknown route", status, &body, 404, "not_found");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/openapi.json") && message.contains("inspector"),
        "{message}"
    );
    // The API itself still wants the token.
    let (status, body) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    assert_error("no token", status, &body, 401, "unauthorized");
}

/// A schema backstop firing is an invariant breach, not contention: a row
/// planted at the seq the session's counter gives next makes the post
/// answer `500 internal` at once, `baton_invariant_breaches_total` counts it
/// once under the constraint's name, and nothing of the post is stored;
/// once the row is gone, posting works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backstop_firing_is_a_counted_500() {
    let app = common::spawn_app(|_| {}).await;
    let c = app.client.clone();
    let id = c.create_session_id(json!({"message": "hi"})).await;
    let idle = c.wait_idle(&id).await;
    let next = idle["last_seq"].as_u64().unwrap() + 1;

    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", app.db.display());
    let mut raw_db = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let plant = format!(
        "PRAGMA busy_timeout = 10000; INSERT INTO entries (session_id, seq, kind, role, content, created_at) \
         VALUES ('{id}', {next}, 'message', 'assistant', 'planted', 0)"
    );
    sqlx::raw_sql(&plant).execute(&mut raw_db).await.unwrap();

    let (status, body) = c.post(&id, "refused", None, None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "internal", "{body}");
    let (_, _, metrics) = raw(c.req(Method::GET, "/metrics")).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "baton_invariant_breaches_total{constraint=\"entries_pkey\"} 1"),
        "counted once under its constraint: {text}"
    );
    let (_, s) = c.session(&id).await;
    assert_eq!(
        s["last_seq"].as_u64(),
        Some(next - 1),
        "nothing stored: {s}"
    );

    let drop_it = format!("DELETE FROM entries WHERE session_id = '{id}' AND seq = {next}");
    sqlx::raw_sql(&drop_it).execute(&mut raw_db).await.unwrap();
    let (status, body) = c.post(&id, "accepted", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["entry"]["seq"].as_u64(), Some(next), "{body}");
    c.wait_idle(&id).await;
    app.stop().await;
}
