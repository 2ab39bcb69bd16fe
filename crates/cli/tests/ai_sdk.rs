//! The AI SDK's UI message stream protocol (`/v1/ai-sdk/chat…`) over real
//! HTTP: every chunk is checked against the protocol's chunk schema (the
//! keys of `uiMessageChunkSchema` of `ai` 6.0.325, pinned by the example app,
//! taken strictly: no key the schema does not name), and every stream is
//! replayed through a model of the client's `processUIMessageStream`, which
//! fails where the client would (a delta for a part never started, a result
//! for an unknown tool call). The message the model holds is then compared
//! with the stored log.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::{spawn_app, Client, PATIENCE};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// The protocol, as the client checks it

/// Checks one chunk: a known type, the keys it requires with their types,
/// and no key the protocol does not name for that type.
fn check_chunk(c: &Value) {
    let obj = c
        .as_object()
        .unwrap_or_else(|| panic!("chunk not an object: {c}"));
    let kind = obj["type"].as_str().expect("chunk type");
    let (required, optional): (&[&str], &[&str]) = match kind {
        "start" => (&[], &["messageId", "messageMetadata"]),
        "start-step" | "finish-step" => (&[], &[]),
        "text-start" | "text-end" | "reasoning-start" | "reasoning-end" => {
            (&["id"], &["providerMetadata"])
        }
        "text-delta" | "reasoning-delta" => (&["id", "delta"], &["providerMetadata"]),
        "error" => (&["errorText"], &[]),
        "tool-input-available" => (
            &["toolCallId", "toolName", "input"],
            &[
                "providerExecuted",
                "providerMetadata",
                "toolMetadata",
                "dynamic",
                "title",
            ],
        ),
        "tool-output-available" => (
            &["toolCallId", "output"],
            &[
                "providerExecuted",
                "providerMetadata",
                "toolMetadata",
                "dynamic",
                "preliminary",
            ],
        ),
        "tool-output-error" => (
            &["toolCallId", "errorText"],
            &[
                "providerExecuted",
                "providerMetadata",
                "toolMetadata",
                "dynamic",
            ],
        ),
        "finish" => (&[], &["finishReason", "messageMetadata"]),
        "abort" => (&[], &["reason"]),
        "message-metadata" => (&["messageMetadata"], &[]),
        k if k.starts_with("data-") => (&["data"], &["id", "transient"]),
        other => panic!("not a chunk type of the protocol: {other:?} in {c}"),
    };
    for key in required {
        assert!(obj.contains_key(*key), "{kind} needs {key}: {c}");
    }
    for key in obj.keys().filter(|k| *k != "type") {
        assert!(
            required.contains(&key.as_str()) || optional.contains(&key.as_str()),
            "{kind} has a key the protocol does not name: {key:?} in {c}"
        );
    }
    for key in [
        "id",
        "delta",
        "errorText",
        "toolCallId",
        "toolName",
        "messageId",
        "reason",
    ] {
        if let Some(v) = obj.get(key) {
            assert!(v.is_string(), "{kind}.{key} must be a string: {c}");
        }
    }
    for key in ["dynamic", "transient", "preliminary", "providerExecuted"] {
        if let Some(v) = obj.get(key) {
            assert!(v.is_boolean(), "{kind}.{key} must be a boolean: {c}");
        }
    }
    if let Some(r) = obj.get("finishReason") {
        assert!(
            [
                "stop",
                "length",
                "content-filter",
                "tool-calls",
                "error",
                "other"
            ]
            .contains(&r.as_str().unwrap_or_default()),
            "finishReason {r}"
        );
    }
}

/// What a client holds after a stream: the assistant message and how the
/// stream ended.
#[derive(Debug, Default)]
struct Held {
    message_id: Option<String>,
    parts: Vec<Value>,
    metadata: Value,
    /// `finish`, `abort` or `error`.
    ended: Option<String>,
    transient: Vec<Value>,
    /// Text part ids opened from live deltas.
    live_parts: Vec<String>,
}

impl Held {
    fn text(&self) -> String {
        self.parts
            .iter()
            .filter(|p| p["type"] == "text")
            .map(|p| p["text"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("")
    }
}

fn merge(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// Replays chunks as the client's `processUIMessageStream` does, failing
/// where it would throw.
fn replay(chunks: &[Value]) -> Held {
    let mut h = Held {
        metadata: json!({}),
        ..Held::default()
    };
    let mut text: HashMap<String, usize> = HashMap::new();
    let mut reasoning: HashMap<String, usize> = HashMap::new();
    let mut tools: HashMap<String, usize> = HashMap::new();
    let mut seen_start = false;
    for c in chunks {
        check_chunk(c);
        assert!(h.ended.is_none(), "a chunk after the stream's end: {c}");
        let kind = c["type"].as_str().unwrap();
        if kind != "start" && !seen_start {
            assert!(
                kind.starts_with("data-") && c["transient"] == true,
                "only transient data may come before start: {c}"
            );
            h.transient.push(c.clone());
            continue;
        }
        match kind {
            "start" => {
                assert!(!seen_start, "a second start");
                seen_start = true;
                h.message_id = c["messageId"].as_str().map(str::to_owned);
                merge(&mut h.metadata, &c["messageMetadata"]);
            }
            "start-step" => h.parts.push(json!({"type": "step-start"})),
            "finish-step" => {
                assert!(text.is_empty(), "finish-step with a text part open");
            }
            "text-start" => {
                let id = c["id"].as_str().unwrap().to_owned();
                if id.ends_with("-live") {
                    h.live_parts.push(id.clone());
                }
                h.parts
                    .push(json!({"type": "text", "text": "", "state": "streaming"}));
                assert!(
                    text.insert(id, h.parts.len() - 1).is_none(),
                    "text id reused"
                );
            }
            "text-delta" => {
                let at = text[c["id"].as_str().unwrap()];
                let t = h.parts[at]["text"].as_str().unwrap().to_owned();
                h.parts[at]["text"] = json!(t + c["delta"].as_str().unwrap());
            }
            "text-end" => {
                let at = text
                    .remove(c["id"].as_str().unwrap())
                    .unwrap_or_else(|| panic!("text-end for a part never started: {c}"));
                h.parts[at]["state"] = json!("done");
            }
            "reasoning-start" => {
                h.parts
                    .push(json!({"type": "reasoning", "text": "", "state": "streaming"}));
                reasoning.insert(c["id"].as_str().unwrap().to_owned(), h.parts.len() - 1);
            }
            "reasoning-delta" => {
                let at = reasoning[c["id"].as_str().unwrap()];
                let t = h.parts[at]["text"].as_str().unwrap().to_owned();
                h.parts[at]["text"] = json!(t + c["delta"].as_str().unwrap());
            }
            "reasoning-end" => {
                let at = reasoning.remove(c["id"].as_str().unwrap()).unwrap();
                h.parts[at]["state"] = json!("done");
            }
            "tool-input-available" => {
                assert_eq!(c["dynamic"], true, "Baton's tools are dynamic");
                h.parts.push(json!({
                    "type": "dynamic-tool", "toolName": c["toolName"], "toolCallId": c["toolCallId"],
                    "state": "input-available", "input": c["input"],
                }));
                tools.insert(
                    c["toolCallId"].as_str().unwrap().to_owned(),
                    h.parts.len() - 1,
                );
            }
            "tool-output-available" | "tool-output-error" => {
                let at = *tools
                    .get(c["toolCallId"].as_str().unwrap())
                    .unwrap_or_else(|| panic!("no tool invocation for {c}"));
                if kind == "tool-output-available" {
                    h.parts[at]["state"] = json!("output-available");
                    h.parts[at]["output"] = c["output"].clone();
                } else {
                    h.parts[at]["state"] = json!("output-error");
                    h.parts[at]["errorText"] = c["errorText"].clone();
                }
            }
            "message-metadata" => merge(&mut h.metadata, &c["messageMetadata"]),
            "finish" | "abort" | "error" => h.ended = Some(kind.to_owned()),
            k if k.starts_with("data-") => {
                if c["transient"] == true {
                    h.transient.push(c.clone());
                } else {
                    h.parts.push(c.clone());
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(seen_start, "the stream had no start");
    h
}

// ---------------------------------------------------------------------------
// HTTP

/// A UI message stream being read.
struct UiStream {
    inner: std::pin::Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<
                        eventsource_stream::Event,
                        eventsource_stream::EventStreamError<reqwest::Error>,
                    >,
                > + Send,
        >,
    >,
    chunks: Vec<Value>,
    done: bool,
}

impl UiStream {
    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        assert_eq!(h["x-vercel-ai-ui-message-stream"], "v1");
        assert_eq!(h["x-accel-buffering"], "no");
        Self {
            inner: Box::pin(resp.bytes_stream().eventsource()),
            chunks: Vec::new(),
            done: false,
        }
    }

    /// The next chunk, or `None` after `[DONE]` or the end of the body.
    async fn next(&mut self) -> Option<Value> {
        if self.done {
            return None;
        }
        let ev = tokio::time::timeout(PATIENCE, self.inner.next())
            .await
            .expect("the stream stalled")?
            .expect("reading the stream");
        if ev.data == "[DONE]" {
            self.done = true;
            return None;
        }
        let v: Value = serde_json::from_str(&ev.data)
            .unwrap_or_else(|_| panic!("a data line that is not JSON: {:?}", ev.data));
        self.chunks.push(v.clone());
        Some(v)
    }

    /// Reads until a chunk satisfies `pred`.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        while let Some(c) = self.next().await {
            if pred(&c) {
                return c;
            }
        }
        panic!("the stream ended first; read {:#?}", self.chunks);
    }

    /// Reads to `[DONE]` and replays everything read.
    async fn finish(mut self) -> Held {
        while self.next().await.is_some() {}
        assert!(self.done, "the stream closed without [DONE]");
        replay(&self.chunks)
    }
}

fn user(id: &str, text: &str) -> Value {
    json!({"id": id, "role": "user", "parts": [{"type": "text", "text": text}]})
}

/// What `useChat`'s default transport sends for a new message.
fn submit(chat: &str, history: &[Value], msg: Value) -> Value {
    let mut messages = history.to_vec();
    messages.push(msg);
    json!({"id": chat, "messages": messages, "trigger": "submit-message"})
}

async fn post_chat(c: &Client, body: Value) -> reqwest::Response {
    c.req(Method::POST, "/v1/ai-sdk/chat")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn open(c: &Client, body: Value) -> UiStream {
    UiStream::new(post_chat(c, body).await)
}

async fn resume(c: &Client, chat: &str) -> reqwest::Response {
    c.req(Method::GET, &format!("/v1/ai-sdk/chat/{chat}/stream"))
        .send()
        .await
        .unwrap()
}

async fn transcript(c: &Client, chat: &str) -> Value {
    let (status, v) = c
        .send(c.req(Method::GET, &format!("/v1/ai-sdk/chat/{chat}/messages")))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// The stored assistant text of a turn, one message after another.
fn stored_reply(entries: &[Value], turn: &str) -> String {
    entries
        .iter()
        .filter(|e| e["type"] == "message" && e["role"] == "assistant" && e["turn_id"] == turn)
        .map(|e| e["content"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("")
}

fn session_of(h: &Held) -> String {
    h.metadata["baton"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The assistant message of `turn` in a transcript.
fn transcript_message<'a>(t: &'a Value, turn: &str) -> &'a Value {
    t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == turn)
        .unwrap_or_else(|| panic!("no message {turn} in {t:#}"))
}

/// The transcript's message is the one the stream built.
fn same_message(streamed: &Held, stored: &Value) {
    let strip = |parts: &[Value]| -> Vec<Value> {
        parts
            .iter()
            .map(|p| {
                let mut p = p.clone();
                if let Some(o) = p.as_object_mut() {
                    o.remove("state");
                    o.retain(|_, v| !v.is_null());
                }
                p
            })
            .collect()
    };
    let stored_parts: Vec<Value> = stored["parts"].as_array().unwrap().clone();
    let mut held = strip(&streamed.parts);
    // Dynamic tool parts carry a state the transcript also has; compare it.
    for (h, p) in held.iter_mut().zip(streamed.parts.iter()) {
        if p["type"] == "dynamic-tool" {
            h["state"] = p["state"].clone();
        }
    }
    let mut want = strip(&stored_parts);
    for (w, p) in want.iter_mut().zip(stored_parts.iter()) {
        if p["type"] == "dynamic-tool" {
            w["state"] = p["state"].clone();
        }
    }
    assert_eq!(held, want, "the streamed message is the stored one");
    assert_eq!(streamed.metadata, stored["metadata"], "the same metadata");
}

// ---------------------------------------------------------------------------
// Tests

/// Text: `start` with the turn id, a step, one text part, `finish`; the
/// held message is the stored reply and the transcript's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_reply_streams_as_the_protocol_says_and_equals_the_stored_reply() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let h = open(c, submit("chat-text", &[], user("u1", "hello there world")))
        .await
        .finish()
        .await;
    assert_eq!(h.ended.as_deref(), Some("finish"));
    assert_eq!(h.transient.len(), 1);
    let d = &h.transient[0];
    assert_eq!(d["type"], "data-baton-disposition");
    assert_eq!(d["data"]["disposition"]["type"], "started");
    let turn = h.message_id.clone().unwrap();
    assert_eq!(h.metadata["baton"]["turn_id"], turn.as_str());
    assert_eq!(h.metadata["baton"]["status"], "completed");
    let types: Vec<&str> = h
        .parts
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["step-start", "text"]);
    assert_eq!(h.text(), "echo: hello there world");
    let sid = session_of(&h);
    let entries = c.entries(&sid).await;
    assert_eq!(stored_reply(&entries, &turn), h.text());
    let t = transcript(c, "chat-text").await;
    assert_eq!(t["session_id"], sid.as_str());
    let msgs = t["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["parts"][0]["text"], "hello there world");
    same_message(&h, transcript_message(&t, &turn));
    // The chat is a session of its own, found by its session id too.
    let by_id = transcript(c, &sid).await;
    assert_eq!(by_id["messages"], t["messages"]);
    app.stop().await;
}

/// Tools and thoughts: reasoning, text, a dynamic tool call and its result,
/// then text, in the order the agent produced them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_thoughts_stream_as_reasoning_and_dynamic_tool_parts() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let h = open(c, submit("chat-tool", &[], user("u1", "/tool find me")))
        .await
        .finish()
        .await;
    assert_eq!(h.ended.as_deref(), Some("finish"));
    let types: Vec<&str> = h
        .parts
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["step-start", "reasoning", "text", "dynamic-tool", "text"],
        "{:#?}",
        h.parts
    );
    let tool = &h.parts[3];
    assert_eq!(tool["state"], "output-available");
    assert_eq!(tool["toolName"], "lookup");
    let turn = h.message_id.clone().unwrap();
    let entries = c.entries(&session_of(&h)).await;
    assert_eq!(stored_reply(&entries, &turn), h.text());
    let t = transcript(c, "chat-tool").await;
    same_message(&h, transcript_message(&t, &turn));
    app.stop().await;
}

/// Cancel: `POST …/stop` ends the turn `cancelled`; the stream ends with
/// `abort`. Failure: a failed turn ends with `error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_turn_ends_with_abort_and_a_failed_one_with_error() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let mut s = open(c, submit("chat-stop", &[], user("u1", "/hang wait for it"))).await;
    s.until(|c| c["type"] == "text-delta").await;
    let (status, v) = c
        .send(c.req(Method::POST, "/v1/ai-sdk/chat/chat-stop/stop"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let h = s.finish().await;
    assert_eq!(h.ended.as_deref(), Some("abort"));
    assert_eq!(h.metadata["baton"]["status"], "cancelled");
    assert_eq!(v["turn_id"], h.message_id.clone().unwrap().as_str());
    // Idle now: a stop stops nothing.
    let (status, v) = c
        .send(c.req(Method::POST, "/v1/ai-sdk/chat/chat-stop/stop"))
        .await;
    assert_eq!((status, &v["turn_id"]), (StatusCode::OK, &Value::Null));

    let h = open(c, submit("chat-stop", &[], user("u2", "/fail now")))
        .await
        .finish()
        .await;
    assert_eq!(h.ended.as_deref(), Some("error"));
    assert_eq!(h.metadata["baton"]["status"], "failed");
    app.stop().await;
}

/// A message sent while a turn runs (policy `queue`) shows its position,
/// then streams its own turn when it starts; the running turn's stream is
/// not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_behind_a_turn_shows_its_position_then_streams_its_turn() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let mut first = open(c, submit("chat-q", &[], user("u1", "/hang first"))).await;
    first.until(|c| c["type"] == "text-delta").await;
    let mut second = open(c, submit("chat-q", &[], user("u2", "second"))).await;
    let d = second
        .until(|c| c["type"] == "data-baton-disposition")
        .await;
    assert_eq!(d["transient"], true);
    assert_eq!(d["data"]["disposition"]["type"], "queued");
    assert_eq!(d["data"]["disposition"]["position"], 1);
    let (status, _) = c
        .send(c.req(Method::POST, "/v1/ai-sdk/chat/chat-q/stop"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let a = first.finish().await;
    let b = second.finish().await;
    assert_eq!(a.ended.as_deref(), Some("abort"));
    assert_eq!(b.ended.as_deref(), Some("finish"));
    assert_ne!(a.message_id, b.message_id, "one message per turn");
    assert_eq!(b.text(), "echo: second");
    // Under `reject`, a message sent while a turn runs is a 409 and nothing
    // is stored.
    let mut s = open(c, submit("chat-q", &[], user("u3", "/hang third"))).await;
    s.until(|c| c["type"] == "text-delta").await;
    let mut busy = submit("chat-q", &[], user("u4", "refused"));
    busy["policy"] = json!("reject");
    let resp = post_chat(c, busy).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_busy");
    c.send(c.req(Method::POST, "/v1/ai-sdk/chat/chat-q/stop"))
        .await;
    s.finish().await;
    let entries = c.entries(&session_of(&a)).await;
    assert!(entries.iter().all(|e| e["content"] != "refused"));
    app.stop().await;
}

/// Resume: `204` when nothing runs (also for a name never used); mid-turn,
/// the running turn replayed from `start` with the text streamed so far,
/// then live; both streams end with the stored reply, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_replays_the_turn_from_start_with_the_text_so_far() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    assert_eq!(
        resume(c, "never-used").await.status(),
        StatusCode::NO_CONTENT
    );
    let done = open(c, submit("chat-r", &[], user("u0", "warm up")))
        .await
        .finish()
        .await;
    assert_eq!(done.ended.as_deref(), Some("finish"));
    assert_eq!(
        resume(c, "chat-r").await.status(),
        StatusCode::NO_CONTENT,
        "idle"
    );

    // The whole echo streams, then the turn waits: what a resume gets of the
    // text can only come from the worker's run so far.
    let mut s = open(c, submit("chat-r", &[], user("u1", "/hang one two three"))).await;
    let mut so_far = String::new();
    while so_far != "echo: one two three" {
        let d = s.until(|c| c["type"] == "text-delta").await;
        so_far.push_str(d["delta"].as_str().unwrap());
    }
    let mut r = UiStream::new(resume(c, "chat-r").await);
    let start = r.until(|c| c["type"] == "start").await;
    assert_eq!(start["messageId"], s.chunks[1]["messageId"]);
    let mut replayed = String::new();
    while replayed != so_far {
        let d = r.until(|c| c["type"] == "text-delta").await;
        replayed.push_str(d["delta"].as_str().unwrap());
        assert!(so_far.starts_with(&replayed), "{replayed:?}");
    }
    c.send(c.req(Method::POST, "/v1/ai-sdk/chat/chat-r/stop"))
        .await;
    let a = s.finish().await;
    let b = r.finish().await;
    assert_eq!(b.text(), a.text(), "nothing twice, nothing missing");
    assert_eq!(b.live_parts.len(), 1, "the run so far came live");
    assert_eq!(b.ended.as_deref(), Some("abort"));

    // A turn that completes: the resumed message equals the stored reply.
    let mut s = open(
        c,
        submit("chat-r", &[], user("u2", "/sleep 1500 a b c d e f g h")),
    )
    .await;
    s.until(|c| c["type"] == "text-delta").await;
    let r = UiStream::new(resume(c, "chat-r").await);
    let (a, b) = (s.finish().await, r.finish().await);
    let turn = a.message_id.clone().unwrap();
    assert_eq!(b.message_id.as_deref(), Some(turn.as_str()));
    let entries = c.entries(&session_of(&a)).await;
    let stored = stored_reply(&entries, &turn);
    assert_eq!(stored, "echo: a b c d e f g h");
    assert_eq!(a.text(), stored);
    assert_eq!(b.text(), stored);
    let t = transcript(c, "chat-r").await;
    same_message(&b, transcript_message(&t, &turn));
    app.stop().await;
}

/// A retried submit (same UIMessage id) is stored once and streams the same
/// turn again; the same id with other text is a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_submit_with_the_same_message_id_is_stored_once() {
    let app = spawn_app(|_| {}).await;
    let c = &app.client;
    let body = submit("chat-idem", &[], user("same-id", "only once"));
    let (a, b) = tokio::join!(
        async { open(c, body.clone()).await.finish().await },
        async { open(c, body.clone()).await.finish().await }
    );
    assert_eq!(a.message_id, b.message_id, "one turn");
    assert_eq!(a.text(), b.text());
    let retried: Vec<bool> = [&a, &b]
        .iter()
        .map(|h| h.transient[0]["data"]["replayed"].as_bool().unwrap())
        .collect();
    assert_eq!(retried.iter().filter(|r| **r).count(), 1);
    let again = open(c, body.clone()).await.finish().await;
    assert_eq!(again.message_id, a.message_id);
    assert_eq!(again.text(), a.text());
    let entries = c.entries(&session_of(&a)).await;
    let users: Vec<&Value> = entries.iter().filter(|e| e["role"] == "user").collect();
    assert_eq!(users.len(), 1, "stored once");
    let resp = post_chat(c, submit("chat-idem", &[], user("same-id", "other text"))).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    app.stop().await;
}

/// Bad input is a `400` JSON error and stores nothing; another owner's
/// session id is `404` on every route; a name is per owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_other_owners_chats_are_refused() {
    let app = spawn_app(|cfg| {
        cfg.tokens = vec![
            ("alice".into(), "a-secret".into()),
            ("bob".into(), "b-secret".into()),
        ];
    })
    .await;
    let alice = app.client.with_token("a-secret");
    let bob = app.client.with_token("b-secret");
    let h = open(&alice, submit("shared-name", &[], user("u1", "hi")))
        .await
        .finish()
        .await;
    let sid = session_of(&h);
    for (body, why) in [
        (
            json!({"id": "x", "messages": [user("u", "hi")], "trigger": "regenerate-message", "messageId": "m"}),
            "regenerate",
        ),
        (json!({"id": "x", "messages": []}), "no message"),
        (
            json!({"id": "x", "messages": [{"id": "a", "role": "assistant", "parts": []}]}),
            "not a user message",
        ),
        (
            json!({"id": "x", "message": {"id": "a", "role": "user", "parts": [{"type": "file", "url": "u", "mediaType": "image/png"}]}}),
            "a file part",
        ),
        (json!({"id": "x", "message": user("a", "  ")}), "blank text"),
        (
            json!({"id": "bad/name", "message": user("a", "hi")}),
            "bad chat id",
        ),
        (
            json!({"id": "x", "message": user("a", "hi"), "agent": "nope"}),
            "unknown agent",
        ),
        (json!({"message": user("a", "hi")}), "no id"),
    ] {
        let resp = post_chat(&alice, body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{why}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request", "{why}");
    }
    // The trimmed shape of the resume guide works.
    let h2 = open(
        &alice,
        json!({"id": "shared-name", "message": user("u2", "trimmed")}),
    )
    .await
    .finish()
    .await;
    assert_eq!(h2.text(), "echo: trimmed");

    let resp = post_chat(&bob, submit(&sid, &[], user("b1", "let me in"))).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resume(&bob, &sid).await.status(), StatusCode::NOT_FOUND);
    let (status, _) = bob
        .send(bob.req(Method::POST, &format!("/v1/ai-sdk/chat/{sid}/stop")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = bob
        .send(bob.req(Method::GET, &format!("/v1/ai-sdk/chat/{sid}/messages")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Bob's "shared-name" is his own chat, empty.
    let t = transcript(&bob, "shared-name").await;
    assert_eq!(t["messages"], json!([]));
    assert_eq!(t["session_id"], Value::Null);
    let (status, _) = app
        .client
        .send(
            app.client
                .req(Method::GET, "/v1/ai-sdk/chat/shared-name/messages"),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let entries = alice.entries(&sid).await;
    let users: HashSet<&str> = entries
        .iter()
        .filter(|e| e["role"] == "user")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        HashSet::from(["hi", "trimmed"]),
        "nothing else stored"
    );
    app.stop().await;
}

/// A node on the PostgreSQL store at `url`.
async fn pg_node(
    url: &str,
) -> (
    Client,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let mut cfg = baton_cli::ServeConfig::embedded("unused.db");
    cfg.database_url = Some(url.to_owned());
    cfg.db = None;
    cfg.demo_word_delay_ms = 1;
    cfg.shutdown_grace_ms = 0;
    let app = baton_cli::App::build(&cfg).await.expect("building a node");
    let client = Client::new(format!("http://{}", app.addr()));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    (client, stop, task)
}

/// Resumed on another node than the one running the turn: the text
/// streamed so far comes from the worker over the cross-node bus, and the
/// message ends equal to the stored reply (needs `DATABASE_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_resumed_on_another_node_has_the_text_so_far_and_ends_equal() {
    let Some(url) = baton_testkit::pg::database_url("ai-sdk resume across nodes") else {
        return;
    };
    let schema = baton_testkit::pg::PgSchema::create(&url).await;
    let (a, stop_a, task_a) = pg_node(schema.url()).await;
    let (b, stop_b, task_b) = pg_node(schema.url()).await;

    let mut s = open(&a, submit("chat-x", &[], user("u1", "/hang one two three"))).await;
    let mut so_far = String::new();
    while so_far != "echo: one two three" {
        let d = s.until(|c| c["type"] == "text-delta").await;
        so_far.push_str(d["delta"].as_str().unwrap());
    }
    let mut r = UiStream::new(resume(&b, "chat-x").await);
    let mut replayed = String::new();
    while replayed != so_far {
        let d = r.until(|c| c["type"] == "text-delta").await;
        replayed.push_str(d["delta"].as_str().unwrap());
        assert!(so_far.starts_with(&replayed), "{replayed:?}");
    }
    let (status, _) = b
        .send(b.req(Method::POST, "/v1/ai-sdk/chat/chat-x/stop"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "a stop on any node");
    let (x, y) = (s.finish().await, r.finish().await);
    assert_eq!(
        (x.ended.as_deref(), y.ended.as_deref()),
        (Some("abort"), Some("abort"))
    );
    assert_eq!(x.text(), y.text());
    assert_eq!(
        y.live_parts.len(),
        1,
        "the run so far came live from the other node"
    );

    let mut s = open(
        &a,
        submit("chat-x", &[], user("u2", "/sleep 1500 a b c d e f g h")),
    )
    .await;
    s.until(|c| c["type"] == "text-delta").await;
    let r = UiStream::new(resume(&b, "chat-x").await);
    let (x, y) = (s.finish().await, r.finish().await);
    let turn = x.message_id.clone().unwrap();
    let stored = stored_reply(&b.entries(&session_of(&x)).await, &turn);
    assert_eq!(stored, "echo: a b c d e f g h");
    assert_eq!((x.text(), y.text()), (stored.clone(), stored));
    let t = transcript(&b, "chat-x").await;
    same_message(&y, transcript_message(&t, &turn));

    let _ = stop_a.send(());
    let _ = stop_b.send(());
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
}
