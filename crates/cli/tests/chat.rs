//! `baton chat` end to end: in a pseudo-terminal (the screen read back
//! through a terminal emulator, row by row), and with piped input.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{spawn_app, spawn_binary, spawn_binary_at, Client, PATIENCE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const ROWS: u16 = 24;
const COLS: u16 = 80;

/// `baton chat` in a pseudo-terminal, and the screen it draws.
struct Term {
    session: expectrl::Session,
    parser: vt100::Parser,
}

impl Term {
    fn spawn(args: &[&str]) -> Self {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.args(args)
            .env("TERM", "xterm")
            .env_remove("BATON_TOKEN");
        let mut session = expectrl::Session::spawn(cmd).unwrap();
        session
            .get_process_mut()
            .set_window_size(COLS, ROWS)
            .unwrap();
        Self {
            session,
            parser: vt100::Parser::new(ROWS, COLS, 0),
        }
    }

    /// Feeds what the chat printed so far to the emulator.
    fn pump(&mut self) {
        let mut buf = [0u8; 8192];
        // `WouldBlock` (nothing more yet) or EOF (the chat exited) end it.
        while let Ok(n @ 1..) = self.session.try_read(&mut buf) {
            self.parser.process(&buf[..n]);
        }
    }

    /// The screen's rows, trailing blanks trimmed.
    fn rows(&self) -> Vec<String> {
        self.parser
            .screen()
            .rows(0, COLS)
            .map(|r| r.trim_end().to_owned())
            .collect()
    }

    /// Waits until the screen satisfies `pred`; returns its rows then.
    fn wait(&mut self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        tokio::task::block_in_place(|| {
            let deadline = Instant::now() + PATIENCE;
            loop {
                self.pump();
                let rows = self.rows();
                if pred(&rows) {
                    return rows;
                }
                assert!(
                    Instant::now() < deadline,
                    "never saw {what}; the screen:\n{}",
                    rows.join("\n")
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    /// Waits until a row is `row` exactly.
    fn wait_row(&mut self, row: &str) -> Vec<String> {
        self.wait(&format!("the row {row:?}"), |rows| {
            rows.iter().any(|r| r == row)
        })
    }

    /// Waits until a row contains `text`.
    fn wait_text(&mut self, text: &str) -> Vec<String> {
        self.wait(&format!("{text:?}"), |rows| {
            rows.iter().any(|r| r.contains(text))
        })
    }

    /// Types `keys` one at a time, as a person does, each seen on the
    /// prompt row before the next (a line editor that gets several bytes in
    /// one read may hold some back until the next event: rustyline 18's
    /// external printer does, for input that is not a bracketed paste).
    /// `\r` enters the line; Ctrl-U clears it.
    fn send(&mut self, keys: &str) {
        let mut typed = String::new();
        for c in keys.chars() {
            self.session.send(c.to_string()).unwrap();
            match c {
                '\r' => typed.clear(),
                '\x15' => {
                    typed.clear();
                    self.wait("the line cleared", |rows| prompt_row(rows) == "you>");
                }
                c => {
                    typed.push(c);
                    let want = format!("you> {typed}");
                    let col = u16::try_from(want.chars().count()).unwrap();
                    self.wait(&format!("{want:?} typed"), |rows| {
                        prompt_row(rows).trim_end() == want.trim_end()
                    });
                    // A space shows only as the cursor moving on.
                    tokio::task::block_in_place(|| {
                        let deadline = Instant::now() + PATIENCE;
                        while self.parser.screen().cursor_position().1 != col {
                            assert!(
                                Instant::now() < deadline,
                                "{want:?}: the cursor never moved"
                            );
                            std::thread::sleep(Duration::from_millis(5));
                            self.pump();
                        }
                    });
                }
            }
        }
    }

    /// The session id the chat announced.
    fn session_id(&mut self) -> String {
        let rows = self.wait_text("[session ");
        let row = rows.iter().find(|r| r.contains("[session ")).unwrap();
        row.trim_start_matches("[session ")
            .trim_end_matches(']')
            .to_owned()
    }

    /// Waits for the chat to exit; whether it exited 0.
    fn exited_ok(&mut self) -> bool {
        tokio::task::block_in_place(|| {
            let deadline = Instant::now() + PATIENCE;
            loop {
                self.pump();
                match self.session.get_process().status().unwrap() {
                    expectrl::WaitStatus::StillAlive => {}
                    expectrl::WaitStatus::Exited(_, code) => return code == 0,
                    other => panic!("the chat ended {other:?}"),
                }
                assert!(Instant::now() < deadline, "the chat did not exit");
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }
}

/// The prompt row: the last row that starts with the prompt.
fn prompt_row(rows: &[String]) -> &str {
    rows.iter()
        .rev()
        .find(|r| r.starts_with("you>"))
        .map(String::as_str)
        .unwrap_or("")
}

/// The user messages stored in a session.
async fn user_messages(c: &Client, id: &str) -> Vec<String> {
    c.entries(id)
        .await
        .iter()
        .filter(|e| e["type"] == "message" && e["role"] == "user")
        .map(|e| e["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Typing while a reply streams: the reply prints above the prompt, the
/// typed line stays on the prompt row, and neither lands in the other;
/// another client's message shows as it arrives; `/help` and `/cancel` are
/// handled here, never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_keeps_the_typed_line_apart_from_the_streamed_reply() {
    let app = spawn_app(|_| {}).await;
    let c = app.client.clone();
    let mut t = Term::spawn(&["chat", "--url", &c.base]);
    let id = t.session_id();
    t.wait("the prompt", |rows| prompt_row(rows) == "you>");

    t.send("/help\r");
    t.wait_text("/cancel        cancel the running turn");
    t.send("/cancel\r");
    t.wait_row("[nothing to cancel: no turn is running]");

    // The turn streams its echo, then waits (until cancelled).
    t.send("/hang alpha beta gamma\r");
    t.wait_row("agent> echo: alpha beta gamma");
    t.send("typed while streaming");
    t.wait("the typed line", |rows| {
        prompt_row(rows) == "you> typed while streaming"
    });

    // Another client hands words to the running turn: the agent streams
    // them now, after the line was typed.
    let (status, v) = c.post(&id, "more words here", Some("steer"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["disposition"]["type"], "steered", "{v}");
    let rows = t.wait_row("       echo: more words here");
    assert!(
        rows.contains(&"other> more words here".to_owned()),
        "{rows:#?}"
    );
    assert!(
        rows.contains(&"agent> echo: alpha beta gamma".to_owned()),
        "{rows:#?}"
    );
    assert_eq!(prompt_row(&rows), "you> typed while streaming", "{rows:#?}");
    for row in &rows {
        assert!(
            !(row.contains("typed") && row.contains("echo")),
            "the typed line and the reply share a row: {rows:#?}"
        );
    }
    let reply_row = rows.iter().position(|r| r.contains("echo: more")).unwrap();
    let prompt = rows.iter().rposition(|r| r.starts_with("you>")).unwrap();
    assert!(
        reply_row < prompt,
        "the reply prints above the prompt: {rows:#?}"
    );

    // Ctrl-U clears the typed line; the cancel goes to the turn running.
    t.send("\x15/cancel\r");
    t.wait_row("[cancelling…]");
    t.wait_row("[turn cancelled: cancelled by user]");
    t.send("/policy nope\r");
    t.wait_text("unknown policy \"nope\"");
    t.send("/quit\r");
    assert!(t.exited_ok());

    assert_eq!(
        user_messages(&c, &id).await,
        ["/hang alpha beta gamma", "more words here"],
        "only the messages reached the session, no command"
    );
    app.stop().await;
}

/// A server that dies mid-turn: the chat says it is reconnecting (no raw
/// error), resumes after the last entry it saw when the server is back on
/// the same port, shows how the cut turn ended, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_resumes_when_the_server_restarts_mid_turn() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let server = spawn_binary(&db, &[]).await;
    let base = server.client.base.clone();
    let mut t = Term::spawn(&["chat", "--url", &base]);
    let id = t.session_id();
    t.wait("the prompt", |rows| prompt_row(rows) == "you>");
    t.send("/hang wait here\r");
    t.wait_row("agent> echo: wait here");

    server.kill9().await;
    t.wait_text("[reconnecting… (");
    let listen = base.trim_start_matches("http://").to_owned();
    let second = spawn_binary_at(&db, &listen, &[]).await;
    t.wait_text("[reconnected; resumed after entry ");
    let rows = t.wait_text("[turn lost");

    t.send("after the restart\r");
    t.wait_row("agent> echo: after the restart");
    let rows_after = t.wait_row("[turn completed]");
    for row in rows.iter().chain(&rows_after) {
        for raw in ["Caused by", "error sending request", "hyper", "reqwest"] {
            assert!(!row.contains(raw), "a raw error on screen: {rows_after:#?}");
        }
    }
    t.send("/quit\r");
    assert!(t.exited_ok());
    let turns = second.client.turns(&id).await;
    let statuses: Vec<&str> = turns
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["lost", "completed"]);
    assert!(second.terminate().await);
}

/// Runs `baton chat ARGS` with `input` on stdin; exit code, stdout, stderr.
async fn piped(args: &[&str], input: &str) -> (i32, String, String) {
    let mut chat = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("chat")
        .args(args)
        .env_remove("BATON_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    // A chat that refuses its flags exits without reading its input.
    let _ = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    let out = tokio::time::timeout(PATIENCE, chat.wait_with_output())
        .await
        .expect("the chat did not exit")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Invalid flags are refused before the server is contacted: nothing is
/// created, and the message says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_refuses_bad_flags_before_contacting_the_server() {
    let app = spawn_app(|_| {}).await;
    let c = app.client.clone();
    let url = c.base.clone();
    for (args, says) in [
        (
            vec!["--url", &url, "--policy", "nope"],
            "unknown policy \"nope\": expected queue, merge, interrupt, reject or steer",
        ),
        (
            vec!["--url", &url, "--permission", "maybe"],
            "permission policy must be allow, deny or ask",
        ),
        (vec!["--url", &url, "--session", "not-an-id"], "--session"),
        (vec!["--url", "localhost:7700"], "http:// or https://"),
    ] {
        let (code, stdout, stderr) = piped(&args, "hello\n").await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
    let (status, v) = c.send(c.req(Method::GET, "/v1/sessions")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["sessions"], json!([]), "no session was created: {v}");
    app.stop().await;
}

/// Piped input: each line is sent and its turn awaited; the replies go to
/// stdout, and the exit status says how the turn ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_chat_prints_each_reply_and_exits_with_how_the_turn_ended() {
    let app = spawn_app(|_| {}).await;
    let url = app.client.base.clone();

    let (code, stdout, stderr) = piped(&["--url", &url], "hi\n").await;
    assert_eq!((code, stdout.as_str()), (0, "echo: hi\n"), "{stderr}");
    assert!(stderr.contains("[turn completed]"), "{stderr}");

    let (code, stdout, stderr) = piped(&["--url", &url], "one\n/help\n/policy merge\ntwo\n").await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "echo: one\necho: two\n");
    assert!(stderr.contains("/steer TEXT"), "the help: {stderr}");
    assert!(stderr.contains("[policy: merge]"), "{stderr}");

    // A failed turn stops the chat: the line after it is never sent.
    let (code, stdout, stderr) = piped(&["--url", &url], "/fail oops\nnever sent\n").await;
    assert_eq!(code, 3, "{stdout} {stderr}");
    assert!(
        stderr.contains("[turn failed: the demo agent failed on purpose (/fail)]"),
        "{stderr}"
    );
    let sessions = app
        .client
        .send(app.client.req(Method::GET, "/v1/sessions"))
        .await
        .1;
    for s in sessions["sessions"].as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let sent = user_messages(&app.client, id).await;
        assert!(
            !sent.iter().any(|m| m == "never sent" || m == "/help"),
            "{sent:?}"
        );
    }

    // A turn cancelled by another client: exit status 4.
    let chat = {
        let url = url.clone();
        tokio::spawn(async move { piped(&["--url", &url], "/hang until cancelled\n").await })
    };
    let c = app.client.clone();
    let id = loop {
        let (_, v) = c
            .send(c.req(Method::GET, "/v1/sessions?status=running"))
            .await;
        if let Some(id) = v["sessions"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    c.wait_entry(&id, |e| e["type"] == "turn_started").await;
    let (status, v) = c.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let (code, _, stderr) = chat.await.unwrap();
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("[turn cancelled: cancelled by user]"),
        "{stderr}"
    );

    // A message the server refuses: exit status 1, said in one line.
    let busy = c.create_session_id(json!({"message": "/hang busy"})).await;
    c.wait_entry(&busy, |e| e["type"] == "turn_started").await;
    let (code, _, stderr) = piped(
        &["--url", &url, "--session", &busy, "--policy", "reject"],
        "refused\n",
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("[not sent: the server refused (409 session_busy)"),
        "{stderr}"
    );
    c.cancel(&busy).await;
    c.wait_idle(&busy).await;
    app.stop().await;
}

/// `--session ID` shows the transcript so far, labelled by speaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_session_shows_its_history() {
    let app = spawn_app(|_| {}).await;
    let c = app.client.clone();
    let id = c.create_session_id(json!({"message": "first"})).await;
    c.wait_idle(&id).await;
    let (status, _) = c.post(&id, "/fail second", None, None).await;
    assert_eq!(status, StatusCode::CREATED);
    c.wait_idle(&id).await;
    let entries: Vec<Value> = c.entries(&id).await;

    let (code, stdout, stderr) = piped(&["--url", &c.base, "--session", &id], "").await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "", "the history is not a reply");
    let shown: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        shown,
        [
            "you> first",
            "agent> echo: first",
            "you> /fail second",
            "[turn failed: the demo agent failed on purpose (/fail)]",
            &format!("[resumed session {id}: {} entries]", entries.len()),
        ],
        "{stderr}"
    );

    // In a terminal too, above the prompt.
    let mut t = Term::spawn(&["chat", "--url", &c.base, "--session", &id]);
    let rows = t.wait("the prompt", |rows| prompt_row(rows) == "you>");
    for line in ["you> first", "agent> echo: first", "you> /fail second"] {
        assert!(rows.contains(&line.to_owned()), "{rows:#?}");
    }
    t.send("/quit\r");
    assert!(t.exited_ok());
    app.stop().await;
}

/// A piped chat whose server dies mid-turn reconnects when it is back and
/// exits with the turn's end: lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_chat_reports_a_turn_lost_to_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("baton.db");
    let server = spawn_binary(&db, &[]).await;
    let base = server.client.base.clone();
    let c = server.client.clone();
    let chat = {
        let base = base.clone();
        tokio::spawn(async move { piped(&["--url", &base], "/hang cut short\n").await })
    };
    let id = loop {
        let (_, v) = c
            .send(c.req(Method::GET, "/v1/sessions?status=running"))
            .await;
        if let Some(id) = v["sessions"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    c.wait_entry(&id, |e| e["type"] == "turn_started").await;
    server.kill9().await;
    let listen = base.trim_start_matches("http://").to_owned();
    let second = spawn_binary_at(&db, &listen, &[]).await;
    let (code, stdout, stderr) = chat.await.unwrap();
    assert_eq!(code, 6, "{stdout} {stderr}");
    assert!(stderr.contains("[reconnecting… ("), "{stderr}");
    assert!(stderr.contains("[turn lost"), "{stderr}");
    assert!(!stderr.contains("Caused by"), "{stderr}");
    assert!(second.terminate().await);
}

/// The piped chat's exit status for a turn that timed out (5), and the
/// status line of one forced off because its agent ignored the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_chat_exits_with_timed_out_and_says_when_a_stop_was_forced() {
    let app = spawn_app(|cfg| {
        cfg.turn_timeout_ms = 300;
        cfg.cancel_drain_ms = 50;
    })
    .await;
    let url = app.client.base.clone();
    let (code, _, stderr) = piped(&["--url", &url], "/hang too long\n").await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("[turn timed out"), "{stderr}");

    let (code, _, stderr) = piped(&["--url", &url], "/stubborn deaf\n").await;
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("[turn timed out (forced): "), "{stderr}");
    app.stop().await;
}
