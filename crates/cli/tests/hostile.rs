//! Hostile and malformed input, on both stores: every case gets a `4xx`
//! JSON error (also those hyper raises before the router), and nothing is
//! written. Also the connection limits: a slow-loris client is cut off at
//! the header timeout, an idle connection at the idle timeout (a live
//! stream never), connections past the cap get `503`, and SIGTERM never
//! waits on a half-sent request.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use baton_cli::{App, ServeConfig};
use baton_testkit::pg::PgSchema;
use common::{spawn_binary, Client, PATIENCE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server embedded on `127.0.0.1:0`, on SQLite or PostgreSQL.
struct Server {
    client: Client,
    addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn server(pg: Option<&PgSchema>, tune: impl FnOnce(&mut ServeConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::embedded(dir.path().join("baton.db").to_string_lossy());
    if let Some(schema) = pg {
        cfg.database_url = Some(schema.url().to_owned());
        cfg.db = None;
    }
    cfg.demo_word_delay_ms = 1;
    cfg.shutdown_grace_ms = 0;
    tune(&mut cfg);
    let app = App::build(&cfg).await.expect("building the app");
    let addr = app.addr().to_string();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    Server {
        client: Client::new(format!("http://{addr}")),
        addr,
        stop,
        task,
        _dir: dir,
    }
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// The stores to run on: SQLite, and PostgreSQL when `DATABASE_URL` is set
/// (required with `BATON_REQUIRE_POSTGRES=1`).
async fn stores(test: &str) -> Vec<Option<PgSchema>> {
    let mut out = vec![None];
    if let Some(url) = baton_testkit::pg::database_url(test) {
        out.push(Some(PgSchema::create(&url).await));
    }
    out
}

/// Sends `bytes` on a fresh connection and reads until the server closes
/// (or `PATIENCE`); returns what it answered.
async fn raw(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_answer(&mut s).await
}

/// Reads one whole answer: its head, then `content-length` bytes.
async fn read_answer(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = find(&out, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse::<usize>().unwrap())
                    .unwrap_or(0);
                if out.len() >= end + 4 + len {
                    return;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("no answer in time");
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits a raw answer into its status, head and JSON body.
fn parse(what: &str, answer: &[u8]) -> (u16, String, Value) {
    let end = find(answer, b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "{what}: no whole head: {:?}",
            String::from_utf8_lossy(answer)
        )
    });
    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let status = head[9..12].parse().unwrap();
    let body = serde_json::from_slice(&answer[end + 4..]).unwrap_or_else(|_| {
        panic!(
            "{what}: the body is not JSON: {:?}",
            String::from_utf8_lossy(answer)
        )
    });
    (status, head, body)
}

#[track_caller]
fn assert_error(what: &str, status: u16, body: &Value, want: u16, code: &str) {
    assert_eq!(status, want, "{what}: status; body {body}");
    assert_eq!(body["error"]["code"], code, "{what}: code; body {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: a message; body {body}"
    );
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{what}: {body}");
}

/// What the store holds for the owner: the session list and one log.
async fn snapshot(c: &Client, sid: &str) -> (Value, Vec<Value>) {
    let (status, list) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    (list, c.entries(sid).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_json_errors_and_write_nothing_on_both_stores() {
    for pg in stores("hostile_requests_get_json_errors_and_write_nothing_on_both_stores").await {
        let store = if pg.is_some() { "postgres" } else { "sqlite" };
        let srv = server(pg.as_ref(), |c| {
            c.tokens = vec![("alice".into(), "s3cret".into())];
            c.body_timeout_ms = 300;
        })
        .await;
        let c = srv.client.with_token("s3cret");
        let sid = c.create_session_id(json!({"message": "hello"})).await;
        c.wait_idle(&sid).await;
        let before = snapshot(&c, &sid).await;
        let messages = format!("/v1/sessions/{sid}/messages");

        // Bodies through the HTTP client: (what, path, content type, body).
        let bodies: Vec<(&str, &str, Option<&str>, &str)> = vec![
            (
                "create: an empty array",
                "/v1/sessions",
                Some("application/json"),
                "[]",
            ),
            (
                "create: an array read by position",
                "/v1/sessions",
                Some("application/json"),
                "[null, \"reject\"]",
            ),
            (
                "create: a string",
                "/v1/sessions",
                Some("application/json"),
                "\"hi\"",
            ),
            (
                "create: null",
                "/v1/sessions",
                Some("application/json"),
                "null",
            ),
            (
                "post: an array",
                &messages,
                Some("application/json"),
                "[\"x\"]",
            ),
            ("post: a number", &messages, Some("application/json"), "5"),
            ("create: no Content-Type", "/v1/sessions", None, "{}"),
            (
                "post: no Content-Type",
                &messages,
                None,
                "{\"content\":\"x\"}",
            ),
            (
                "create: application/jsonx",
                "/v1/sessions",
                Some("application/jsonx"),
                "{}",
            ),
            (
                "post: application/json-patch+json",
                &messages,
                Some("application/json-patch+json"),
                "{\"content\":\"x\"}",
            ),
            (
                "post: text/plain",
                &messages,
                Some("text/plain"),
                "{\"content\":\"x\"}",
            ),
            (
                "post: NUL in content",
                &messages,
                Some("application/json"),
                "{\"content\":\"a\\u0000b\"}",
            ),
            (
                "create: NUL in the message",
                "/v1/sessions",
                Some("application/json"),
                "{\"message\":\"\\u0000\"}",
            ),
            (
                "create: NUL in a metadata value",
                "/v1/sessions",
                Some("application/json"),
                "{\"metadata\":{\"k\":[\"a\\u0000\"]}}",
            ),
            (
                "create: NUL in a metadata key",
                "/v1/sessions",
                Some("application/json"),
                "{\"metadata\":{\"k\\u0000\":1}}",
            ),
            (
                "create: NUL in the agent",
                "/v1/sessions",
                Some("application/json"),
                "{\"agent\":\"demo\\u0000\"}",
            ),
        ];
        for (what, path, ctype, body) in &bodies {
            let what = format!("{store}: {what}");
            let mut rb = c.req(Method::POST, path).body(body.to_string());
            if let Some(t) = ctype {
                rb = rb.header("Content-Type", *t);
            }
            let (status, v) = c.send(rb).await;
            assert_error(&what, status.as_u16(), &v, 400, "invalid_request");
        }

        // Authentication: the scheme is case-insensitive; a 401 says how.
        for (what, auth) in [
            ("no token", None),
            ("wrong token", Some("Bearer nope")),
            ("not bearer", Some("Basic czNjcmV0")),
        ] {
            let mut rb = srv.client.req(Method::GET, "/v1/sessions");
            if let Some(a) = auth {
                rb = rb.header("Authorization", a);
            }
            let resp = rb.send().await.unwrap();
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{store}: {what}"
            );
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            assert_error(&format!("{store}: {what}"), status, &v, 401, "unauthorized");
        }
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let (status, v) = c
                .send(
                    srv.client
                        .req(Method::GET, &format!("/v1/sessions/{sid}"))
                        .header("Authorization", format!("{scheme} s3cret")),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{store}: {scheme}: {v}");
        }

        // A method the route does not have.
        let (status, v) = c.send(c.req(Method::PUT, &messages)).await;
        assert_error(
            &format!("{store}: PUT messages"),
            status.as_u16(),
            &v,
            405,
            "method_not_allowed",
        );

        // Two different Last-Event-ID headers (the same one twice is fine).
        let stream = format!("/v1/sessions/{sid}/stream");
        let (status, v) = c
            .send(
                c.req(Method::GET, &stream)
                    .header("Last-Event-ID", "1")
                    .header("Last-Event-ID", "2"),
            )
            .await;
        assert_error(
            &format!("{store}: two Last-Event-IDs"),
            status.as_u16(),
            &v,
            400,
            "invalid_request",
        );
        let resp = c
            .req(Method::GET, &stream)
            .header("Last-Event-ID", "1")
            .header("Last-Event-ID", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{store}: the same Last-Event-ID twice"
        );
        drop(resp);

        // Raw requests: what hyper refuses before the router, and what a
        // client library would not send.
        let auth = "Authorization: Bearer s3cret\r\n";
        let post_head = |len: &str, extra: &str| {
            format!("POST {messages} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {len}\r\n{extra}\r\n")
        };
        let big_header = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(80 * 1024)
        );
        let raws: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            ("a garbage request line", b"GARBAGE\r\n\r\n".to_vec(), 400, "invalid_request"),
            ("a binary request line", b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n".to_vec(), 400, "invalid_request"),
            ("a NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(), 400, "invalid_request"),
            ("a control byte in a header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n".to_vec(), 400, "invalid_request"),
            ("a duplicate Content-Length", format!("POST {messages} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 15\r\nContent-Length: 16\r\n\r\n{{\"content\":\"x\"}}").into_bytes(), 400, "invalid_request"),
            ("an oversized header", big_header.into_bytes(), 431, "header_too_large"),
            ("Content-Length 10^12 with Expect: 100-continue", post_head("1000000000000", "Expect: 100-continue\r\n").into_bytes(), 413, "payload_too_large"),
            ("Content-Length 10^12, body not sent", post_head("1000000000000", "").into_bytes(), 413, "payload_too_large"),
            ("a body that stops half-way", format!("{}{{\"content\":", post_head("100", "")).into_bytes(), 408, "request_timeout"),
        ];
        for (what, bytes, want, code) in &raws {
            let what = format!("{store}: {what}");
            let answer = raw(&srv.addr, bytes).await;
            // No `100 Continue` comes before the refusal.
            assert!(
                !answer.starts_with(b"HTTP/1.1 100"),
                "{what}: {:?}",
                String::from_utf8_lossy(&answer)
            );
            let (status, head, body) = parse(&what, &answer);
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/json"),
                "{what}: {head}"
            );
            assert_error(&what, status, &body, *want, code);
        }

        // Nothing was written.
        assert_eq!(snapshot(&c, &sid).await, before, "{store}: nothing written");

        // Controls: the well-formed forms are accepted, so the refusals
        // above are about the input.
        let (status, v) = c
            .send(
                c.req(Method::POST, &messages)
                    .header("Content-Type", "Application/JSON; charset=utf-8")
                    .body("{\"content\":\"typed\"}"),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{store}: {v}");
        let (status, v) = c
            .send(c.req(Method::POST, &format!("/v1/sessions/{sid}/cancel")))
            .await;
        assert!(
            status.is_success(),
            "{store}: a cancel without a body needs no type: {status} {v}"
        );
        // A body within the limit gets its `100 Continue`, then is stored.
        let mut s = TcpStream::connect(&srv.addr).await.unwrap();
        s.write_all(post_head("19", "Expect: 100-continue\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_answer(&mut s).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 100 Continue"),
            "{store}: {:?}",
            String::from_utf8_lossy(&answer)
        );
        s.write_all(b"{\"content\":\"asked\"}").await.unwrap();
        let answer = read_answer(&mut s).await;
        let (status, _, v) = parse("a small body with Expect", &answer);
        assert_eq!(status, 201, "{store}: {v}");
        srv.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_client_is_cut_off_at_the_header_timeout() {
    let srv = server(None, |c| {
        c.header_timeout_ms = 500;
        c.idle_timeout_ms = 600_000;
    })
    .await;
    let mut s = TcpStream::connect(&srv.addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(2_000)
    );
    // One byte each 50 ms: the whole head would take 100 s.
    let cut = tokio::time::timeout(PATIENCE, async {
        for (i, b) in head.bytes().enumerate() {
            if s.write_all(&[b]).await.is_err() {
                return i;
            }
            let mut probe = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(50), s.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return i,
                Ok(Ok(n)) => panic!("the server answered a half-sent head: {:?}", &probe[..n]),
                Err(_) => {}
            }
        }
        head.len()
    })
    .await
    .expect("the connection was not cut off within PATIENCE");
    assert!(cut < head.len(), "the whole head went through");
    // The server still serves others.
    let (status, _) = srv
        .client
        .send(srv.client.req(Method::GET, "/healthz"))
        .await;
    assert_eq!(status, StatusCode::OK);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_but_a_live_stream_stays() {
    let srv = server(None, |c| {
        c.idle_timeout_ms = 300;
        c.header_timeout_ms = 600_000;
    })
    .await;
    let c = srv.client.clone();
    let sid = c.create_session_id(json!({})).await;
    // A stream idle far longer than the idle timeout still delivers.
    let mut stream = c.open_stream(&sid, None).await;
    let mut idle = TcpStream::connect(&srv.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut idle).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // Kept alive, then closed by the server once idle.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
        .await
        .expect("the idle connection was never closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    let (status, v) = c.post(&sid, "still there", None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let got = stream.until_entry(|e| e["content"] == "still there").await;
    assert!(!got.is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_a_json_503() {
    let srv = server(None, |c| c.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut s).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        held.push(s);
    }
    let answer = raw(&srv.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, _, body) = parse("third connection", &answer);
    assert_error(
        "third connection",
        status,
        &body,
        503,
        "too_many_connections",
    );
    // A connection let go frees its place.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = raw(
            &srv.addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never reused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_on_half_sent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = spawn_binary(
        &dir.path().join("baton.db"),
        &[
            "--shutdown-grace-ms",
            "1000",
            "--header-timeout-ms",
            "600000",
            "--body-timeout-ms",
            "600000",
            "--idle-timeout-ms",
            "600000",
        ],
    )
    .await;
    let c = srv.client.clone();
    let sid = c.create_session_id(json!({})).await;
    let addr = c.base.trim_start_matches("http://").to_owned();
    // Half a head, and a whole head with half its body.
    let mut half_head = TcpStream::connect(&addr).await.unwrap();
    half_head
        .write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    let mut half_body = TcpStream::connect(&addr).await.unwrap();
    half_body
        .write_all(format!("POST /v1/sessions/{sid}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"content\":").as_bytes())
        .await
        .unwrap();
    // The server has the second request's head before the signal.
    c.wait_session(&sid, |_| true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    srv.signal();
    // `wait` fails the test if the server is still running after PATIENCE.
    assert!(
        srv.wait().await,
        "SIGTERM exits 0 with half-sent requests open"
    );
    drop((half_head, half_body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_stream_ends_at_shutdown_with_the_shutdown_entry() {
    for pg in stores("a_live_stream_ends_at_shutdown_with_the_shutdown_entry").await {
        let store = if pg.is_some() { "postgres" } else { "sqlite" };
        let srv = server(pg.as_ref(), |_| {}).await;
        let c = srv.client.clone();
        let sid = c
            .create_session_id(json!({"message": "/hang until shutdown"}))
            .await;
        let mut stream = c.open_stream(&sid, None).await;
        stream.until_entry(|e| e["type"] == "turn_started").await;
        let stopping = tokio::spawn(srv.stop());
        let mut last = None;
        while let Some(ev) = stream.next().await {
            if ev.event == "entry" {
                last = Some(ev.data);
            }
        }
        stopping.await.unwrap();
        let last = last.unwrap();
        assert_eq!(last["type"], "turn_ended", "{store}: {last}");
        assert_eq!(last["status"], "cancelled", "{store}: {last}");
        assert_eq!(last["reason"], "shutdown", "{store}: {last}");
    }
}
