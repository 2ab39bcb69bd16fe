//! Test support for end-to-end tests: servers embedded on `127.0.0.1:0`
//! (`spawn_app`) or run as the real `baton` binary (`spawn_binary`, for
//! SIGKILL tests), typed request helpers, and an SSE reader.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use baton_cli::{App, ServeConfig};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a test waits for a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// An HTTP client for one server.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Client {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            token: None,
        }
    }

    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends and returns status and JSON body (`Value::Null` if none).
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = rb.send().await.expect("request failed to send");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("reading body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, body)
    }

    pub async fn create_session(&self, body: Value) -> Value {
        let (status, v) = self
            .send(self.req(reqwest::Method::POST, "/v1/sessions").json(&body))
            .await;
        assert!(status.is_success(), "create failed: {status} {v}");
        v
    }

    /// Creates a session; returns its id.
    pub async fn create_session_id(&self, body: Value) -> String {
        let v = self.create_session(body).await;
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("a created session has an id: {v}"))
            .to_owned()
    }

    /// `POST /messages`; returns status and body.
    pub async fn post(
        &self,
        id: &str,
        content: &str,
        policy: Option<&str>,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut body = json!({ "content": content });
        if let Some(p) = policy {
            body["policy"] = json!(p);
        }
        let mut rb = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/sessions/{id}/messages"),
            )
            .json(&body);
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        self.send(rb).await
    }

    pub async fn session(&self, id: &str) -> (StatusCode, Value) {
        self.send(self.req(reqwest::Method::GET, &format!("/v1/sessions/{id}")))
            .await
    }

    /// Every entry of a session, paging through.
    pub async fn entries(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let (status, v) = self
                .send(self.req(
                    reqwest::Method::GET,
                    &format!("/v1/sessions/{id}/entries?after={after}&limit=1000"),
                ))
                .await;
            assert_eq!(status, StatusCode::OK, "entries: {v}");
            let page = v["entries"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return out;
            }
            after = page.last().unwrap()["seq"].as_u64().unwrap();
            out.extend(page);
        }
    }

    pub async fn turns(&self, id: &str) -> Vec<Value> {
        let (status, v) = self
            .send(self.req(reqwest::Method::GET, &format!("/v1/sessions/{id}/turns")))
            .await;
        assert_eq!(status, StatusCode::OK, "turns: {v}");
        v["turns"].as_array().cloned().unwrap_or_default()
    }

    pub async fn cancel(&self, id: &str) -> (StatusCode, Value) {
        self.send(self.req(reqwest::Method::POST, &format!("/v1/sessions/{id}/cancel")))
            .await
    }

    /// Waits until the session is idle with nothing queued.
    pub async fn wait_idle(&self, id: &str) -> Value {
        self.wait_session(id, |s| s["status"] == "idle" && s["queued"] == 0)
            .await
    }

    /// Waits until `pred` holds for the session.
    pub async fn wait_session(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, s) = self.session(id).await;
            assert_eq!(status, StatusCode::OK, "session: {s}");
            if pred(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "session never reached the state: {s}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until some entry satisfies `pred`; returns all entries then.
    pub async fn wait_entry(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let entries = self.entries(id).await;
            if entries.iter().any(&pred) {
                return entries;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no entry matched; log: {entries:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens the stream (`after` as `Last-Event-ID` if given).
    pub async fn open_stream(&self, id: &str, last_event_id: Option<u64>) -> SseReader {
        let mut rb = self.req(reqwest::Method::GET, &format!("/v1/sessions/{id}/stream"));
        if let Some(k) = last_event_id {
            rb = rb.header("Last-Event-ID", k.to_string());
        }
        let resp = rb.send().await.expect("opening stream");
        assert_eq!(resp.status(), StatusCode::OK, "stream status");
        SseReader {
            inner: Box::pin(resp.bytes_stream().eventsource()),
        }
    }
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// Reads a stream's events.
pub struct SseReader {
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
}

impl SseReader {
    /// The next event, or `None` at the end (or after `PATIENCE`).
    pub async fn next(&mut self) -> Option<Sse> {
        let ev = tokio::time::timeout(PATIENCE, self.inner.next())
            .await
            .ok()??
            .ok()?;
        Some(Sse {
            event: ev.event,
            id: ev.id,
            data: serde_json::from_str(&ev.data).unwrap_or(Value::Null),
        })
    }

    /// Reads until the first `delta` (the agent was prompted and talks).
    pub async fn until_delta(&mut self) -> Sse {
        while let Some(ev) = self.next().await {
            if ev.event == "delta" {
                return ev;
            }
        }
        panic!("stream ended before a delta");
    }

    /// Reads until an `entry` event satisfies `pred`; returns everything read.
    pub async fn until_entry(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Sse> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            let done = ev.event == "entry" && pred(&ev.data);
            out.push(ev);
            if done {
                return out;
            }
        }
        panic!("stream ended before the expected entry; read: {out:#?}");
    }
}

/// A server embedded in the test process on `127.0.0.1:0`.
pub struct TestServer {
    pub client: Client,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts a server on a fresh embedded store; `tune` adjusts the config.
pub async fn spawn_app(tune: impl FnOnce(&mut ServeConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    start(db, dir, tune).await
}

/// Builds and serves on the embedded store at `db`; `dir` lives as long as
/// the server.
async fn start(
    db: PathBuf,
    dir: tempfile::TempDir,
    tune: impl FnOnce(&mut ServeConfig),
) -> TestServer {
    let mut cfg = ServeConfig::embedded(db.to_string_lossy());
    cfg.demo_word_delay_ms = 1;
    // Tests that stop a server mid-turn want the cancel at once; the grace
    // is tested where a test sets it.
    cfg.shutdown_grace_ms = 0;
    tune(&mut cfg);
    let app = App::build(&cfg).await.expect("building the app");
    let base = format!("http://{}", app.addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    TestServer {
        client: Client::new(base),
        dir,
        db,
        stop: Some(tx),
        task: Some(task),
    }
}

impl TestServer {
    /// Graceful shutdown (as on SIGTERM); waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// The real `baton` binary running `serve`.
pub struct ChildServer {
    pub child: tokio::process::Child,
    pub client: Client,
}

/// Runs `baton serve --listen 127.0.0.1:0 --db DB ARGS…` and waits for its
/// `listening on` line. `DATABASE_URL` is removed so the file is used.
pub async fn spawn_binary(db: &Path, args: &[&str]) -> ChildServer {
    spawn_binary_at(db, "127.0.0.1:0", args).await
}

/// [`spawn_binary`] listening on `listen` (a restart on the same port).
pub async fn spawn_binary_at(db: &Path, listen: &str, args: &[&str]) -> ChildServer {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--db")
        .arg(db)
        .arg("--demo-word-delay-ms")
        .arg("1")
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawning baton");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("baton did not start in time")
        .expect("reading baton's stdout")
        .expect("baton exited before listening");
    let addr = line
        .strip_prefix("listening on ")
        .expect("the first line announces the address")
        .to_owned();
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    ChildServer {
        child,
        client: Client::new(addr),
    }
}

impl ChildServer {
    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait for exit; returns whether it exited successfully.
    pub async fn terminate(mut self) -> bool {
        self.signal();
        self.wait().await
    }

    /// Sends SIGTERM without waiting.
    pub fn signal(&mut self) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns whether it exited successfully.
    pub async fn wait(&mut self) -> bool {
        let exit = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("baton did not exit")
            .unwrap();
        exit.success()
    }
}

/// Starts a server on the embedded store at `db`, which may already hold
/// what an earlier server left (restart tests); `tune` adjusts the config.
/// The caller owns the file's directory: dropping the returned server (or
/// `stop`) does not remove it.
pub async fn spawn_app_on(db: &Path, tune: impl FnOnce(&mut ServeConfig)) -> TestServer {
    // An empty directory of its own, so dropping the server leaves `db` alone.
    start(db.to_path_buf(), tempfile::tempdir().unwrap(), tune).await
}
