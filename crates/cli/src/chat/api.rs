//! The chat's HTTP calls, and the one place a failed call becomes a
//! sentence: a server that cannot be reached, or the server's own JSON
//! error, never a raw error chain.

use std::time::Duration;

use serde_json::{json, Value};

/// How long a message post keeps retrying (same `Idempotency-Key`, so a
/// retry never stores it twice) while the server cannot be reached.
const POST_RETRY_FOR: Duration = Duration::from_secs(20);

/// A failed call, said in one line.
#[derive(Debug)]
pub enum CallError {
    /// The server could not be reached or the connection broke.
    Unreachable(String),
    /// The server answered with an error.
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(why) => f.write_str(why),
            Self::Refused {
                status,
                code,
                message,
            } => write!(f, "the server refused ({status} {code}): {message}"),
        }
    }
}

/// The innermost cause of an error: the part a person can act on
/// ("Connection refused"), without the layers above it.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The server's answers, for one base URL and token.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A transport failure, said in one line.
    pub fn unreachable(&self, e: &reqwest::Error) -> CallError {
        let why = if e.is_timeout() {
            "did not answer in time".to_owned()
        } else if e.is_connect() {
            format!("cannot be reached ({})", root_cause(e))
        } else {
            format!("broke the connection ({})", root_cause(e))
        };
        CallError::Unreachable(format!("the server at {} {why}", self.base))
    }

    /// Sends; a success's JSON body (`Null` if empty), or the error.
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value), CallError> {
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if status.is_success() {
            return Ok((status.as_u16(), body));
        }
        let error = &body["error"];
        Err(CallError::Refused {
            status: status.as_u16(),
            code: error["code"].as_str().unwrap_or("error").to_owned(),
            message: error["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    status
                        .canonical_reason()
                        .unwrap_or("no reason given")
                        .to_owned()
                }),
        })
    }

    pub async fn create_session(&self, body: &Value) -> Result<Value, CallError> {
        let req = self
            .request(reqwest::Method::POST, "/v1/sessions")
            .json(body);
        Ok(self.call(req).await?.1)
    }

    pub async fn session(&self, id: &str) -> Result<Value, CallError> {
        let req = self.request(reqwest::Method::GET, &format!("/v1/sessions/{id}"));
        Ok(self.call(req).await?.1)
    }

    /// The caller's sessions, newest first (the first page).
    pub async fn sessions(&self) -> Result<Vec<Value>, CallError> {
        let req = self.request(reqwest::Method::GET, "/v1/sessions?limit=20");
        let (_, body) = self.call(req).await?;
        Ok(body["sessions"].as_array().cloned().unwrap_or_default())
    }

    /// Every entry of a session up to now, paging through.
    pub async fn entries(&self, id: &str) -> Result<Vec<Value>, CallError> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let path = format!("/v1/sessions/{id}/entries?after={after}&limit=1000");
            let (_, body) = self.call(self.request(reqwest::Method::GET, &path)).await?;
            let page = body["entries"].as_array().cloned().unwrap_or_default();
            match page.last().and_then(|e| e["seq"].as_u64()) {
                Some(last) => after = last,
                None => return Ok(out),
            }
            out.extend(page);
        }
    }

    /// Posts a message; retries while the server cannot be reached, under
    /// one `Idempotency-Key`. `on_retry` is told once, at the first retry.
    pub async fn post_message(
        &self,
        session: &str,
        body: &Value,
        mut on_retry: impl FnMut(&CallError),
    ) -> Result<Value, CallError> {
        let key = uuid::Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + POST_RETRY_FOR;
        let mut pause = Duration::from_millis(100);
        let mut told = false;
        loop {
            let req = self
                .request(
                    reqwest::Method::POST,
                    &format!("/v1/sessions/{session}/messages"),
                )
                .header("Idempotency-Key", &key)
                .json(body);
            match self.call(req).await {
                Err(e @ CallError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                    if !told {
                        on_retry(&e);
                        told = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other.map(|(_, v)| v),
            }
        }
    }

    /// Cancels `turn`; whether it was still running.
    pub async fn cancel(&self, session: &str, turn: &str) -> Result<bool, CallError> {
        let req = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/sessions/{session}/cancel"),
            )
            .json(&json!({ "turn_id": turn }));
        let (_, body) = self.call(req).await?;
        Ok(body["cancelled"] == true)
    }

    pub async fn answer(
        &self,
        session: &str,
        request: &str,
        option: &str,
    ) -> Result<(), CallError> {
        let req = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/sessions/{session}/permissions/{request}"),
            )
            .json(&json!({ "option_id": option }));
        self.call(req).await.map(|_| ())
    }
}
