//! `baton chat`: a terminal client for one session.
//!
//! On a terminal it is a line editor (`rustyline`): the prompt and the line
//! being typed stay at the bottom while the session's stream prints above
//! them — the agent's reply as it streams, messages other clients post,
//! statuses (queued, interrupting, cancelling…, how each turn ended,
//! reconnecting…) — see [`screen`]. With `--session ID` the transcript so
//! far is shown first. Lines starting with a known `/command` are handled
//! here and never sent (`/help` lists them); every other line is a message.
//!
//! Without a terminal on stdin (`echo hi | baton chat`) each line is sent,
//! the chat waits for the turn that takes it to end, prints the reply on
//! stdout (statuses on stderr) and goes on; it stops at the first turn that
//! does not complete, and the exit status says how that turn ended
//! ([`exit`]).
//!
//! The stream is followed across server restarts ([`stream`]): a broken
//! stream says "reconnecting…" and resumes after the last entry seen. A
//! message is posted with an `Idempotency-Key` and retried for a while if
//! the server cannot be reached, so it is stored once. Every flag is
//! checked before the server is contacted.

mod api;
mod screen;
mod stream;

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use baton_core::{PermissionPolicy, Policy, SessionId};
use clap::Args;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use api::Api;
use screen::{labelled, Out, AGENT, OTHER, YOU};

/// The exit statuses of `baton chat`.
pub mod exit {
    /// Every turn completed (or nothing was sent), or `/quit`.
    pub const COMPLETED: u8 = 0;
    /// The server could not be reached or refused a request.
    pub const ERROR: u8 = 1;
    /// A flag is invalid (nothing was sent).
    pub const USAGE: u8 = 2;
    /// A turn ended `failed`.
    pub const FAILED: u8 = 3;
    /// A turn ended `cancelled` (by a user, an interrupt, a shutdown).
    pub const CANCELLED: u8 = 4;
    /// A turn ended `timed_out`.
    pub const TIMED_OUT: u8 = 5;
    /// A turn ended `lost` (its server died mid-turn).
    pub const LOST: u8 = 6;
}

const EXIT_HELP: &str = "\
Without a terminal on stdin, each line is sent and the chat waits for its
turn to end, prints the reply on stdout (statuses on stderr) and stops at
the first turn that does not complete. Exit status:
  0  every turn completed (or /quit)
  1  the server could not be reached, or refused a request
  2  invalid flags (nothing was sent)
  3  a turn failed
  4  a turn was cancelled
  5  a turn timed out
  6  a turn was lost (its server died mid-turn)";

const HELP: &str = "\
commands (never sent to the agent):
  /help          this list
  /cancel        cancel the running turn
  /steer TEXT    hand TEXT to the running turn
  /answer N|ID   answer the oldest waiting permission request
  /policy [P]    show or set the busy policy of your next messages
                 (queue, merge, interrupt, reject, steer)
  /sessions      list your sessions
  /quit          leave (the session stays: --session ID resumes it)
  //TEXT         send /TEXT as a message
any other line is sent to the agent; Ctrl-D leaves, Ctrl-C clears the line";

/// How long the non-interactive chat waits for a server that went away.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// `baton chat` flags.
#[derive(Clone, Debug, Args)]
#[command(after_help = EXIT_HELP)]
pub struct ChatArgs {
    /// The server (http:// or https://).
    #[arg(long, env = "BATON_URL", default_value = "http://127.0.0.1:7700", value_parser = parse_url)]
    pub url: String,
    /// A bearer token, if the server requires one.
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Continue this session (its transcript is shown first) instead of
    /// creating one.
    #[arg(long)]
    pub session: Option<SessionId>,
    /// The agent for a new session.
    #[arg(long, conflicts_with = "session")]
    pub agent: Option<String>,
    /// The busy policy of your messages: queue, merge, interrupt, reject or
    /// steer (`steer` hands each to the running turn, as `/steer TEXT`
    /// does for one). `/policy P` changes it.
    #[arg(long)]
    pub policy: Option<Policy>,
    /// What the agent's permission requests get in a new session: allow,
    /// deny or ask (you answer them here).
    #[arg(long, conflicts_with = "session")]
    pub permission: Option<PermissionPolicy>,
}

fn parse_url(s: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected an http:// or https:// URL with a host".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// A typed line, as the chat reads it.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    Empty,
    Help,
    Quit,
    Cancel,
    Sessions,
    Policy(Option<&'a str>),
    Answer(&'a str),
    /// `/steer` with its text (`None`: no text).
    Steer(Option<&'a str>),
    Message(&'a str),
}

/// Reads a line: a known `/command` with its argument, or a message (a
/// line starting `//` is the message after its first slash).
fn parse_line(line: &str) -> Line<'_> {
    let line = line.trim();
    if line.is_empty() {
        return Line::Empty;
    }
    if line.starts_with("//") {
        return Line::Message(&line[1..]);
    }
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    let arg = (!rest.is_empty()).then_some(rest);
    match word {
        "/help" | "/?" => Line::Help,
        "/quit" | "/exit" => Line::Quit,
        "/cancel" => Line::Cancel,
        "/sessions" => Line::Sessions,
        "/policy" => Line::Policy(arg),
        "/answer" => Line::Answer(rest),
        "/steer" => Line::Steer(arg),
        _ => Line::Message(line),
    }
}

/// A permission request the agent waits on: its id and its options' ids.
type Waiting = Vec<(String, Vec<String>)>;

/// How a permission request is shown: what it is for, then its options.
fn show_request(p: &Value) -> String {
    let title = p["title"].as_str().unwrap_or("a tool call");
    let call = p["tool_call_id"].as_str().unwrap_or("?");
    let mut out = format!("[permission asked: {title} (tool call {call})]");
    for (n, o) in p["options"].as_array().into_iter().flatten().enumerate() {
        out.push_str(&format!(
            "\n  {}) {} [{}]",
            n + 1,
            o["name"].as_str().unwrap_or("?"),
            o["kind"].as_str().unwrap_or("?")
        ));
    }
    out.push_str("\n  answer with /answer N");
    screen::sanitize(&out)
}

/// How a decision is shown.
fn show_decision(entry: &Value) -> String {
    let p = &entry["permission"];
    let by = p["decided_by"].as_str().unwrap_or("?");
    match p["option_id"].as_str() {
        Some(option) => format!("permission: {option} (by {by})"),
        None => format!(
            "permission cancelled (by {by}){}",
            entry["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    }
}

/// The request `/answer ARG` answers (the oldest waiting) and the option
/// it names: a number from the list shown, or an option id.
fn pick(waiting: &Waiting, arg: &str) -> Result<(String, String), String> {
    let Some((request, options)) = waiting.first() else {
        return Err("no permission request is waiting".into());
    };
    let option = match arg.parse::<usize>() {
        Ok(n) if (1..=options.len()).contains(&n) => options[n - 1].clone(),
        _ if options.iter().any(|o| o == arg) => arg.to_owned(),
        _ => return Err(format!("choose 1 to {} or an option id", options.len())),
    };
    Ok((request.clone(), option))
}

/// How a turn's end is said.
fn ended_text(status: &str, reason: &str) -> String {
    let status_text = status.replace('_', " ");
    // Some reasons repeat the status ("lost: the worker …").
    let reason = reason
        .strip_prefix(status)
        .and_then(|r| r.strip_prefix(": "))
        .unwrap_or(reason);
    match (status, reason) {
        ("completed", _) => "turn completed".to_owned(),
        // A turn whose agent ignored the cancel (or the timeout) is forced off.
        (_, r) if r.contains("forced") => format!("turn {status_text} (forced): {r}"),
        (_, "") => format!("turn {status_text}"),
        (_, r) => format!("turn {status_text}: {r}"),
    }
}

/// The exit status for a turn that ended `status`.
fn exit_code(status: &str) -> u8 {
    match status {
        "completed" => exit::COMPLETED,
        "failed" => exit::FAILED,
        "cancelled" => exit::CANCELLED,
        "timed_out" => exit::TIMED_OUT,
        "lost" => exit::LOST,
        _ => exit::ERROR,
    }
}

/// At most `n` characters of `text`, on one line.
fn short(text: &str, n: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= n {
        return one_line;
    }
    let mut s: String = one_line.chars().take(n).collect();
    s.push('…');
    s
}

/// A message of ours whose turn the non-interactive chat waits for.
#[derive(Debug)]
struct Awaited {
    seq: u64,
    /// The turn that took it, once known.
    turn: Option<String>,
}

/// Whether to go on after a line.
#[derive(PartialEq)]
enum Flow {
    Go,
    Quit,
}

/// The chat: what it knows of the session, and where it prints.
struct Chat {
    api: Api,
    session: String,
    out: Out,
    /// The policy of the next messages (`None`: the session's).
    policy: Option<Policy>,
    /// The turn this client last saw running: `/cancel` names it, so a
    /// cancel typed just as it ended never cancels the turn after it.
    running: Option<String>,
    waiting: Waiting,
    /// Our messages' seqs: the stream's copy of them is not shown again.
    own: HashSet<u64>,
    /// Our messages posted but not yet answered (their seq unknown): the
    /// stream may bring them before the answer does.
    posting: Vec<String>,
    /// Turns seen starting, with the seq range of their input.
    inputs: HashMap<String, (u64, u64)>,
    /// Turns seen ending, with their status.
    ended: HashMap<String, String>,
    /// Non-interactive: our messages whose turns have not ended.
    awaited: Vec<Awaited>,
    /// A message could not be sent (the non-interactive chat stops).
    unsent: bool,
}

impl Chat {
    /// Handles an entry: `live` from the stream, or from the history shown
    /// on resume.
    fn on_entry(&mut self, e: &Value, live: bool) {
        let turn = e["turn_id"].as_str().unwrap_or_default().to_owned();
        let content = e["content"].as_str().unwrap_or_default();
        match e["type"].as_str().unwrap_or_default() {
            "message" => match e["role"].as_str().unwrap_or_default() {
                "user" => {
                    let seq = e["seq"].as_u64().unwrap_or(0);
                    let mine = self.own.contains(&seq)
                        || match self.posting.iter().position(|c| c == content) {
                            Some(i) => {
                                self.posting.remove(i);
                                self.own.insert(seq);
                                true
                            }
                            None => false,
                        };
                    if !live {
                        self.out.note(&labelled(YOU, content));
                    } else if !mine {
                        self.out.note(&labelled(OTHER, content));
                    }
                }
                "assistant" if live => self.out.reply(&turn, content),
                "assistant" => self.out.note(&labelled(AGENT, content)),
                _ => self.out.note(&labelled("system> ", content)),
            },
            "turn_started" => {
                self.running = Some(turn.clone());
                let input = &e["input"];
                if let (Some(from), Some(to)) = (input["from"].as_u64(), input["to"].as_u64()) {
                    self.inputs.insert(turn, (from, to));
                }
            }
            "turn_ended" => {
                if self.running.as_deref() == Some(turn.as_str()) {
                    self.running = None;
                }
                self.waiting.clear();
                self.out.end_turn(&turn);
                let status = e["status"].as_str().unwrap_or("?");
                if live || status != "completed" {
                    self.out.status(&ended_text(
                        status,
                        e["reason"].as_str().unwrap_or_default(),
                    ));
                }
                self.ended.insert(turn, status.to_owned());
            }
            "permission_request" => {
                let p = &e["permission"];
                if live {
                    let options = p["options"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o["option_id"].as_str().map(str::to_owned))
                        .collect();
                    if let Some(id) = p["request_id"].as_str() {
                        self.waiting.push((id.to_owned(), options));
                    }
                    self.out.note(&show_request(p));
                } else {
                    let title = p["title"].as_str().unwrap_or("a tool call");
                    self.out.status(&format!("permission asked: {title}"));
                }
            }
            "permission_decision" => {
                let id = e["permission"]["request_id"].as_str();
                self.waiting.retain(|(r, _)| Some(r.as_str()) != id);
                self.out.status(&show_decision(e));
            }
            "tool_call" => {
                let name = e["tool"]["name"].as_str().unwrap_or("a tool");
                self.out.status(&format!("tool call: {name}"));
            }
            "tool_result" => self
                .out
                .status(&format!("tool result: {}", short(content, 200))),
            "thought" => self
                .out
                .status(&format!("thinking: {}", short(content, 200))),
            _ => {}
        }
    }

    /// Handles what the stream brings; `Some(code)` when the chat cannot go
    /// on (the session is gone, in the non-interactive chat).
    fn on_event(&mut self, ev: stream::Event, interactive: bool) -> Option<u8> {
        match ev {
            stream::Event::Entry(e) => self.on_entry(&e, true),
            stream::Event::Delta { turn, text } => self.out.delta(&turn, &text),
            stream::Event::Reconnecting(why) => {
                self.out.status(&format!("reconnecting… ({why})"));
            }
            stream::Event::Resumed(after) => self
                .out
                .status(&format!("reconnected; resumed after entry {after}")),
            stream::Event::Gone(why) => {
                self.out.status(&why);
                if !interactive {
                    return Some(exit::ERROR);
                }
                self.out
                    .status("the session is no longer followed; /quit to leave");
            }
        }
        None
    }

    /// Posts `text`; its seq, or `None` if it was not stored.
    async fn post(&mut self, text: &str, policy: Option<Policy>) -> Option<u64> {
        let mut body = json!({ "content": text });
        if let Some(p) = policy {
            body["policy"] = json!(p.as_str());
        }
        self.posting.push(text.to_owned());
        let out = self.out.clone();
        let answer = self
            .api
            .post_message(&self.session, &body, |e| {
                out.status(&format!("reconnecting… ({e})"))
            })
            .await;
        let stored = match answer {
            Ok(v) => v,
            Err(e) => {
                if let Some(i) = self.posting.iter().position(|c| c == text) {
                    self.posting.remove(i);
                }
                self.out.status(&format!("not sent: {e}"));
                self.unsent = true;
                return None;
            }
        };
        if let Some(i) = self.posting.iter().position(|c| c == text) {
            self.posting.remove(i);
        }
        let seq = stored["entry"]["seq"].as_u64().unwrap_or(0);
        self.own.insert(seq);
        let d = &stored["disposition"];
        let status = match d["type"].as_str().unwrap_or_default() {
            "queued" => Some(format!(
                "queued: position {}",
                d["position"].as_u64().unwrap_or(0)
            )),
            "merged" => Some("merged into the next turn".to_owned()),
            "interrupting" => Some("interrupting the running turn…".to_owned()),
            "steered" => Some("steered into the running turn".to_owned()),
            "pending" => Some("waiting for more messages before the turn starts".to_owned()),
            _ => None,
        };
        if let Some(s) = status {
            self.out.status(&s);
        }
        let turn = match d["type"].as_str() {
            Some("started" | "steered") => d["turn_id"].as_str().map(str::to_owned),
            _ => None,
        };
        self.awaited.push(Awaited { seq, turn });
        Some(seq)
    }

    /// Handles a typed line.
    async fn on_line(&mut self, line: &str) -> Flow {
        match parse_line(line) {
            Line::Empty => {}
            Line::Quit => return Flow::Quit,
            Line::Help => self.out.note(HELP),
            Line::Cancel => {
                let Some(turn) = self.running.clone() else {
                    self.out.status("nothing to cancel: no turn is running");
                    return Flow::Go;
                };
                match self.api.cancel(&self.session, &turn).await {
                    Ok(true) => self.out.status("cancelling…"),
                    Ok(false) => self
                        .out
                        .status("that turn had already ended; nothing cancelled"),
                    Err(e) => self.out.status(&format!("not cancelled: {e}")),
                }
            }
            Line::Sessions => match self.api.sessions().await {
                Ok(list) if list.is_empty() => self.out.status("no sessions"),
                Ok(list) => {
                    let rows: Vec<String> = list
                        .iter()
                        .map(|s| {
                            let id = s["id"].as_str().unwrap_or("?");
                            format!(
                                "  {id}  {} {} {} entries{}",
                                s["agent"].as_str().unwrap_or("?"),
                                s["status"].as_str().unwrap_or("?"),
                                s["last_seq"].as_u64().unwrap_or(0),
                                if id == self.session {
                                    "  (this one)"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect();
                    self.out.note(&screen::sanitize(&format!(
                        "sessions:\n{}",
                        rows.join("\n")
                    )));
                }
                Err(e) => self.out.status(&format!("cannot list the sessions: {e}")),
            },
            Line::Policy(None) => {
                let p = self
                    .policy
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "the session's own".to_owned());
                self.out.status(&format!("policy: {p}"));
            }
            Line::Policy(Some(p)) => match p.parse::<Policy>() {
                Ok(p) => {
                    self.policy = Some(p);
                    self.out.status(&format!("policy: {p}"));
                }
                Err(e) => self.out.status(&e.to_string()),
            },
            Line::Answer(arg) => match pick(&self.waiting, arg) {
                Ok((request, option)) => {
                    // The decision is shown when it comes back on the stream.
                    if let Err(e) = self.api.answer(&self.session, &request, &option).await {
                        self.out.status(&format!("not answered: {e}"));
                    }
                }
                Err(why) => self.out.status(&why),
            },
            Line::Steer(None) => self
                .out
                .status("/steer TEXT hands TEXT to the running turn"),
            Line::Steer(Some(text)) => {
                self.post(text, Some(Policy::Steer)).await;
            }
            Line::Message(text) => {
                self.post(text, self.policy).await;
            }
        }
        Flow::Go
    }

    /// Non-interactive: forgets our messages whose turns ended; the exit
    /// status of the first one that did not complete.
    fn settle(&mut self) -> Option<u8> {
        let mut failed = None;
        let inputs = &self.inputs;
        let ended = &self.ended;
        self.awaited.retain_mut(|a| {
            if a.turn.is_none() {
                a.turn = inputs
                    .iter()
                    .find(|(_, (from, to))| (*from..=*to).contains(&a.seq))
                    .map(|(t, _)| t.clone());
            }
            match a.turn.as_ref().and_then(|t| ended.get(t)) {
                Some(status) => {
                    let code = exit_code(status);
                    if code != exit::COMPLETED && failed.is_none() {
                        failed = Some(code);
                    }
                    false
                }
                None => true,
            }
        });
        failed
    }
}

/// Runs the chat; the exit status.
pub async fn run(args: ChatArgs) -> u8 {
    match start(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton chat: {e}");
            exit::ERROR
        }
    }
}

async fn start(args: ChatArgs) -> anyhow::Result<u8> {
    let api = Api::new(&args.url, args.token.clone());
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (session, history, running) = match &args.session {
        Some(id) => {
            let id = id.to_string();
            let s = api.session(&id).await.map_err(|e| anyhow!("{e}"))?;
            let entries = api.entries(&id).await.map_err(|e| anyhow!("{e}"))?;
            let running = s["turn_id"].as_str().map(str::to_owned);
            (id, entries, running)
        }
        None => {
            let mut body = json!({});
            if let Some(a) = &args.agent {
                body["agent"] = json!(a);
            }
            if let Some(p) = args.permission {
                body["permission"] = json!(p.as_str());
            }
            let s = api
                .create_session(&body)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let id = s["id"]
                .as_str()
                .context("the server's session has no id")?
                .to_owned();
            (id, Vec::new(), None)
        }
    };

    let mut editor = None;
    let out = if interactive {
        let mut rl = rustyline::DefaultEditor::new()
            .map_err(|e| anyhow!("cannot set up the terminal: {e}"))?;
        let printer = rl
            .create_external_printer()
            .map_err(|e| anyhow!("cannot set up the terminal: {e}"))?;
        let width = rl.dimensions().map(|(w, _)| usize::from(w)).unwrap_or(80);
        editor = Some(rl);
        Out::Terminal(Arc::new(Mutex::new(screen::Terminal::new(
            width,
            Box::new(printer),
        ))))
    } else {
        Out::Plain
    };

    let mut chat = Chat {
        api: api.clone(),
        session: session.clone(),
        out: out.clone(),
        policy: args.policy,
        running: None,
        waiting: Vec::new(),
        own: HashSet::new(),
        posting: Vec::new(),
        inputs: HashMap::new(),
        ended: HashMap::new(),
        awaited: Vec::new(),
        unsent: false,
    };
    let resumed = !history.is_empty() || args.session.is_some();
    for e in &history {
        chat.on_entry(e, false);
    }
    // What the history says runs, the session confirms (it may have ended
    // between the two reads: then the stream brings its end).
    chat.running = running;
    let after = history.last().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
    if resumed {
        chat.out.status(&format!(
            "resumed session {session}: {} entries{}",
            history.len(),
            if chat.running.is_some() {
                "; a turn is running"
            } else {
                ""
            }
        ));
    } else {
        chat.out.status(&format!("session {session}"));
    }
    let give_up = (!interactive).then_some(GIVE_UP_AFTER);
    let events = stream::follow(api, session, after, give_up);
    match editor {
        Some(rl) => {
            chat.out
                .status("/help lists the commands; Ctrl-D or /quit leaves");
            Ok(interactive_loop(chat, rl, events).await)
        }
        None => Ok(piped_loop(chat, events).await),
    }
}

/// What the line editor's thread hands over.
enum Input {
    Line(String),
    /// Ctrl-D, or the terminal went away.
    End,
}

/// Reads lines on a thread of its own (the editor blocks), so the stream
/// prints meanwhile. The thread stops by itself after `/quit` or Ctrl-D,
/// so the terminal is always given back in its normal mode.
fn read_lines(mut rl: rustyline::DefaultEditor, out: Out) -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || loop {
        if let (Some((w, _)), Out::Terminal(t)) = (rl.dimensions(), &out) {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .screen
                .set_width(usize::from(w));
        }
        match rl.readline(YOU) {
            Ok(line) => {
                if let Out::Terminal(t) = &out {
                    t.lock().unwrap_or_else(|p| p.into_inner()).screen.detach();
                }
                let quit = parse_line(&line) == Line::Quit;
                if !line.trim().is_empty() {
                    let _ = rl.add_history_entry(line.as_str());
                }
                if tx.blocking_send(Input::Line(line)).is_err() || quit {
                    return;
                }
            }
            // Ctrl-C clears the line being typed.
            Err(rustyline::error::ReadlineError::Interrupted) => {}
            Err(_) => {
                let _ = tx.blocking_send(Input::End);
                return;
            }
        }
    });
    rx
}

async fn interactive_loop(
    mut chat: Chat,
    rl: rustyline::DefaultEditor,
    mut events: mpsc::UnboundedReceiver<stream::Event>,
) -> u8 {
    let mut lines = read_lines(rl, chat.out.clone());
    let mut following = true;
    loop {
        tokio::select! {
            ev = events.recv(), if following => match ev {
                Some(ev) => {
                    chat.on_event(ev, true);
                }
                None => following = false,
            },
            input = lines.recv() => match input {
                Some(Input::Line(line)) => {
                    if chat.on_line(&line).await == Flow::Quit {
                        return exit::COMPLETED;
                    }
                }
                Some(Input::End) | None => return exit::COMPLETED,
            },
        }
    }
}

async fn piped_loop(mut chat: Chat, mut events: mpsc::UnboundedReceiver<stream::Event>) -> u8 {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut input_open = true;
    let mut cancelled_for_eof = false;
    loop {
        if let Some(code) = chat.settle() {
            return code;
        }
        if chat.awaited.is_empty() {
            if !input_open {
                return exit::COMPLETED;
            }
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if chat.on_line(&line).await == Flow::Quit {
                        // The turns already sent still end first.
                        input_open = false;
                    }
                    if chat.unsent {
                        return exit::ERROR;
                    }
                }
                Ok(None) => input_open = false,
                Err(e) => {
                    eprintln!("baton chat: reading the input: {e}");
                    return exit::ERROR;
                }
            }
            continue;
        }
        // A turn of ours runs. Input is read only when the agent waits on
        // a permission: the next lines answer it.
        let answer_needed = !chat.waiting.is_empty();
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => {
                    if let Some(code) = chat.on_event(ev, false) {
                        return code;
                    }
                }
                None => return exit::ERROR,
            },
            line = lines.next_line(), if answer_needed && input_open => match line {
                Ok(Some(line)) => {
                    if chat.on_line(&line).await == Flow::Quit {
                        input_open = false;
                    }
                }
                Ok(None) => input_open = false,
                Err(e) => {
                    eprintln!("baton chat: reading the input: {e}");
                    return exit::ERROR;
                }
            },
        }
        if answer_needed && !input_open && !cancelled_for_eof {
            cancelled_for_eof = true;
            chat.out
                .status("the input ended while a permission request waits: cancelling the turn");
            chat.on_line("/cancel").await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_names_an_option_by_number_or_id() {
        let mut waiting: Waiting = Vec::new();
        assert!(pick(&waiting, "1").is_err(), "nothing waits");
        waiting.extend([
            ("r1".to_owned(), vec!["yes".to_owned(), "no".to_owned()]),
            ("r2".to_owned(), vec!["ok".to_owned()]),
        ]);
        assert_eq!(pick(&waiting, "2"), Ok(("r1".into(), "no".into())));
        assert_eq!(pick(&waiting, "yes"), Ok(("r1".into(), "yes".into())));
        assert!(pick(&waiting, "3").is_err());
        assert!(pick(&waiting, "0").is_err());
        assert!(
            pick(&waiting, "ok").is_err(),
            "the oldest request's options"
        );
    }

    #[test]
    fn local_commands_are_told_from_messages() {
        assert_eq!(
            parse_line("/steer  also check the tests "),
            Line::Steer(Some("also check the tests"))
        );
        assert_eq!(parse_line("/steer"), Line::Steer(None));
        assert_eq!(parse_line("/steer   "), Line::Steer(None));
        assert_eq!(
            parse_line("/steering wheel"),
            Line::Message("/steering wheel")
        );
        assert_eq!(parse_line("  /help "), Line::Help);
        assert_eq!(parse_line("/cancel"), Line::Cancel);
        assert_eq!(parse_line("/quit"), Line::Quit);
        assert_eq!(parse_line("/sessions"), Line::Sessions);
        assert_eq!(parse_line("/policy"), Line::Policy(None));
        assert_eq!(parse_line("/policy merge"), Line::Policy(Some("merge")));
        assert_eq!(parse_line("/answer 2"), Line::Answer("2"));
        // The agent's own directives are messages.
        assert_eq!(parse_line("/sleep 500 hi"), Line::Message("/sleep 500 hi"));
        assert_eq!(parse_line("//help"), Line::Message("/help"));
        assert_eq!(parse_line("hello"), Line::Message("hello"));
        assert_eq!(parse_line("   "), Line::Empty);
    }

    #[test]
    fn each_turn_end_has_its_exit_status() {
        let codes: Vec<u8> = ["completed", "failed", "cancelled", "timed_out", "lost"]
            .into_iter()
            .map(exit_code)
            .collect();
        assert_eq!(codes, [0, 3, 4, 5, 6]);
        assert_eq!(
            ended_text(
                "cancelled",
                "cancelled by user; forced: the agent did not stop within the drain deadline"
            ),
            "turn cancelled (forced): cancelled by user; forced: the agent did not stop within the drain deadline"
        );
        assert_eq!(ended_text("timed_out", ""), "turn timed out");
        assert_eq!(
            ended_text("lost", "lost: the worker vanished"),
            "turn lost: the worker vanished"
        );
    }

    #[test]
    fn a_url_must_be_http_with_a_host() {
        assert!(parse_url("http://127.0.0.1:7700/").is_ok());
        assert!(parse_url("localhost:7700").is_err());
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("nope").is_err());
    }
}
