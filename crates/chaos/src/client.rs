//! The HTTP side of a run: requests to any of the servers' URLs, each
//! counted by kind and outcome ([`Ops`]), and SSE stream reads.
//!
//! A request that fails to connect or times out is an observation too
//! (`error`); the caller decides whether to retry (same `Idempotency-Key`)
//! on another URL.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

use crate::history::{LogEntry, StreamEvent, StreamRead, TurnRecord};

/// Operations by kind, then by outcome (`201`, `409`, `error` …).
#[derive(Clone, Default)]
pub struct Ops(Arc<Mutex<BTreeMap<String, BTreeMap<String, u64>>>>);

impl Ops {
    pub fn count(&self, kind: &str, outcome: &str) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *m.entry(kind.to_owned())
            .or_default()
            .entry(outcome.to_owned())
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What one request got: a status and a JSON body, or no answer at all.
#[derive(Clone, Debug)]
pub enum Outcome {
    Answer {
        status: u16,
        body: Value,
    },
    /// No answer: `unreachable` (never connected, so nothing was sent) or
    /// not (sent, and the fate of the request is unknown).
    NoAnswer {
        unreachable: bool,
        why: String,
    },
}

impl Outcome {
    pub fn label(&self) -> String {
        match self {
            // A refusal names its code: `409 session_busy` and `409
            // idempotency_conflict` mean different things.
            Self::Answer { status, body } => match body["error"]["code"].as_str() {
                Some(code) if *status >= 400 => format!("{status} {code}"),
                _ => status.to_string(),
            },
            Self::NoAnswer {
                unreachable: true, ..
            } => "unreachable".into(),
            Self::NoAnswer { .. } => "no answer".into(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Answer { status, .. } => Some(*status),
            Self::NoAnswer { .. } => None,
        }
    }
}

/// A client for one owner over all the servers' URLs.
#[derive(Clone)]
pub struct Api {
    pub urls: Arc<Vec<String>>,
    pub token: Option<String>,
    pub http: reqwest::Client,
    pub ops: Ops,
}

impl Api {
    pub fn new(urls: Vec<String>, token: Option<String>, ops: Ops) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(32)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            urls: Arc::new(urls),
            token,
            http,
            ops,
        })
    }

    /// The same servers as another owner.
    pub fn as_owner(&self, token: Option<String>) -> Self {
        Self {
            token,
            ..self.clone()
        }
    }

    fn request(&self, node: usize, method: Method, path: &str) -> reqwest::RequestBuilder {
        let base = &self.urls[node % self.urls.len()];
        let rb = self
            .http
            .request(method, format!("{base}{path}"))
            .timeout(Duration::from_secs(20));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends one request to `node`, counted as `kind`.
    pub async fn call(
        &self,
        kind: &str,
        node: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Outcome {
        let mut rb = self.request(node, method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        let outcome = match rb.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(bytes) if bytes.is_empty() => Outcome::Answer {
                        status,
                        body: Value::Null,
                    },
                    Ok(bytes) => Outcome::Answer {
                        status,
                        body: serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&bytes).into_owned())
                        }),
                    },
                    Err(e) => Outcome::NoAnswer {
                        unreachable: false,
                        why: format!("reading the body: {e}"),
                    },
                }
            }
            Err(e) => Outcome::NoAnswer {
                unreachable: e.is_connect(),
                why: e.to_string(),
            },
        };
        self.ops.count(kind, &outcome.label());
        outcome
    }

    /// Reads a session's whole log and turns (through `node`), paging.
    pub async fn read_back(
        &self,
        node: usize,
        session: &str,
    ) -> anyhow::Result<Option<(Vec<LogEntry>, Vec<TurnRecord>)>> {
        let mut log = Vec::new();
        let mut after = 0u64;
        loop {
            let path = format!("/v1/sessions/{session}/entries?after={after}&limit=1000");
            match self
                .call("read_back", node, Method::GET, &path, None, None)
                .await
            {
                Outcome::Answer { status: 404, .. } => return Ok(None),
                Outcome::Answer { status: 200, body } => {
                    let page: Vec<LogEntry> = serde_json::from_value(body["entries"].clone())
                        .with_context(|| format!("entries of {session}"))?;
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    log.extend(page);
                }
                other => anyhow::bail!("reading the entries of {session}: {other:?}"),
            }
        }
        let path = format!("/v1/sessions/{session}/turns");
        let turns = match self
            .call("read_back", node, Method::GET, &path, None, None)
            .await
        {
            Outcome::Answer { status: 200, body } => serde_json::from_value(body["turns"].clone())
                .with_context(|| format!("turns of {session}"))?,
            Outcome::Answer { status: 404, .. } => return Ok(None),
            other => anyhow::bail!("reading the turns of {session}: {other:?}"),
        };
        Ok(Some((log, turns)))
    }

    /// Opens the stream after `after` (as `Last-Event-ID`) and records what
    /// it receives until `hold` has passed or the connection ends. `None`
    /// when it could not be opened.
    pub async fn read_stream(
        &self,
        node: usize,
        session: &str,
        after: u64,
        hold: Duration,
    ) -> Option<StreamRead> {
        let rb = self
            .http
            .get(format!(
                "{}/v1/sessions/{session}/stream",
                self.urls[node % self.urls.len()]
            ))
            .header("Last-Event-ID", after.to_string());
        let rb = match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        let resp = match tokio::time::timeout(Duration::from_secs(5), rb.send()).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let why = if e.is_connect() {
                    "unreachable"
                } else {
                    "no answer"
                };
                self.ops.count("stream", why);
                return None;
            }
            Err(_) => {
                self.ops.count("stream", "no answer");
                return None;
            }
        };
        let status = resp.status().as_u16();
        self.ops.count("stream", &status.to_string());
        if status != 200 {
            return None;
        }
        let mut events = Vec::new();
        let mut stream = resp.bytes_stream().eventsource();
        let deadline = tokio::time::Instant::now() + hold;
        while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, stream.next()).await {
            match ev.event.as_str() {
                "entry" => match serde_json::from_str::<LogEntry>(&ev.data) {
                    Ok(e) => events.push(StreamEvent::Entry(e)),
                    Err(_) => self.ops.count("stream", "malformed entry"),
                },
                "delta" => {
                    let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                    if let Some(t) = data["turn_id"].as_str() {
                        events.push(StreamEvent::Delta {
                            turn_id: t.to_owned(),
                        });
                    }
                }
                _ => {}
            }
        }
        Some(StreamRead { after, events })
    }
}
