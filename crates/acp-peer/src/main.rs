//! Offline ACP test agent on the agent side of the `agent-client-protocol`
//! crate (5.0.0, `stdio` feature).
//!
//! Baton's interop tests spawn this binary and drive it over stdio. It never
//! calls a model: it echoes, and it can be told to misbehave by directives at
//! the start of the prompt text. Behaviour is identical to the Python peer
//! (`tests/acp-peers/python/peer.py`) and the TypeScript peer
//! (`tests/acp-peers/ts/peer.mjs`); see `tests/acp-peers/README.md` for the
//! contract.
//!
//! stdout is the JSON-RPC channel: nothing else may be printed there.
//! Diagnostics go to stderr.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    AgentCapabilities, CancelNotification, Content, ContentBlock, ContentChunk, Implementation,
    InitializeRequest, InitializeResponse, LoadSessionRequest, LoadSessionResponse,
    NewSessionRequest, NewSessionResponse, PermissionOption, PermissionOptionKind, PromptRequest,
    PromptResponse, RequestPermissionOutcome, RequestPermissionRequest, SessionId,
    SessionNotification, SessionUpdate, StopReason, TextContent, ToolCall, ToolCallContent,
    ToolCallStatus, ToolCallUpdate, ToolCallUpdateFields, ToolKind,
};
use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{Agent, Client, Stdio};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const PEER_NAME: &str = "baton-acp-peer-rust";

fn log(message: &str) {
    eprintln!("[{PEER_NAME}] {message}");
}

fn main() -> ExitCode {
    if std::env::var("ACP_PEER_CRASH_ON_START").as_deref() == Ok("1") {
        eprintln!("peer refuses to start");
        return ExitCode::from(4);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log(&format!("cannot start the tokio runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let config = Config::from_env();
    if !config.stdin_delay.is_zero() {
        // Slow cold start: stdin is not read (nor stdout written) until then.
        std::thread::sleep(config.stdin_delay);
    }
    let peer = Arc::new(Peer::new(config));
    match runtime.block_on(serve(peer)) {
        // stdin closed: the client is gone. Pending turns (/hang,
        // /ignore-cancel) are dropped with the runtime.
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log(&format!("connection failed: {err:?}"));
            ExitCode::FAILURE
        }
    }
}

async fn serve(peer: Arc<Peer>) -> Result<(), agent_client_protocol::Error> {
    let on_initialize = peer.clone();
    let on_new = peer.clone();
    let on_load = peer.clone();
    let on_cancel = peer.clone();
    let on_prompt = peer;
    Agent
        .v1()
        .name(PEER_NAME)
        .on_receive_request(
            async move |_request: InitializeRequest,
                        responder: Responder<InitializeResponse>,
                        cx: ConnectionTo<Client>| {
                let response = InitializeResponse::new(ProtocolVersion::V1)
                    .agent_capabilities(
                        AgentCapabilities::new().load_session(on_initialize.config.load_session),
                    )
                    .agent_info(Implementation::new(PEER_NAME, env!("CARGO_PKG_VERSION")));
                let delay = on_initialize.config.init_delay;
                if delay.is_zero() {
                    return responder.respond(response);
                }
                // Answer later from a task: the handler holds the dispatch loop.
                cx.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(err) = responder.respond(response) {
                        log(&format!("cannot answer initialize: {err:?}"));
                    }
                    Ok(())
                })
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |_request: NewSessionRequest,
                        responder: Responder<NewSessionResponse>,
                        _cx: ConnectionTo<Client>| {
                let id = on_new.new_session();
                responder.respond(NewSessionResponse::new(id))
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |request: LoadSessionRequest,
                        responder: Responder<LoadSessionResponse>,
                        cx: ConnectionTo<Client>| {
                on_load.load_session(request, responder, &cx)
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_notification(
            async move |notification: CancelNotification, _cx: ConnectionTo<Client>| {
                on_cancel.cancel(&notification.session_id);
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .on_receive_request(
            async move |request: PromptRequest,
                        responder: Responder<PromptResponse>,
                        cx: ConnectionTo<Client>| {
                // Handlers hold the dispatch loop: run the turn in a task so
                // that session/cancel and the permission response can arrive.
                let turn = match on_prompt.start_turn(&request.session_id, cx.clone()) {
                    Ok(turn) => turn,
                    Err(err) => return responder.respond_with_error(err),
                };
                let peer = on_prompt.clone();
                cx.spawn(async move {
                    peer.run_prompt(turn, request, responder).await;
                    // Never fail the task: a failed task shuts the connection.
                    Ok(())
                })
            },
            agent_client_protocol::on_receive_request!(),
        )
        .connect_to(Stdio::new())
        .await
}

struct Config {
    load_session: bool,
    state_dir: Option<PathBuf>,
    delay: Duration,
    /// Sleep at start-up, before stdin is read.
    stdin_delay: Duration,
    /// Wait before answering `initialize`.
    init_delay: Duration,
}

impl Config {
    fn from_env() -> Self {
        Self {
            load_session: std::env::var("ACP_PEER_LOAD_SESSION").as_deref() == Ok("1"),
            state_dir: std::env::var_os("ACP_PEER_STATE_DIR")
                .filter(|dir| !dir.is_empty())
                .map(PathBuf::from),
            delay: env_ms("ACP_PEER_DELAY_MS", 5.0),
            stdin_delay: env_ms("ACP_PEER_STDIN_DELAY_MS", 0.0),
            init_delay: env_ms("ACP_PEER_INIT_DELAY_MS", 0.0),
        }
    }
}

/// A duration in (possibly fractional) milliseconds from the environment;
/// `default` ms when unset, empty or bad.
fn env_ms(name: &str, default: f64) -> Duration {
    let fallback = Duration::from_secs_f64(default / 1000.0);
    let raw = match std::env::var(name) {
        Ok(raw) if !raw.is_empty() => raw,
        _ => return fallback,
    };
    // Negative, NaN, infinite and too large values are refused.
    match raw
        .parse::<f64>()
        .map(|ms| Duration::try_from_secs_f64(ms / 1000.0))
    {
        Ok(Ok(delay)) => delay,
        _ => {
            log(&format!("ignoring bad {name}={raw:?}"));
            fallback
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    role: String,
    text: String,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(rename = "sessionId")]
    session_id: String,
    history: Vec<Entry>,
}

#[derive(Default)]
struct Session {
    history: Vec<Entry>,
    /// Cancel switches of the running turns, by turn number.
    turns: HashMap<u64, watch::Sender<bool>>,
}

struct Peer {
    config: Config,
    sessions: Mutex<HashMap<String, Session>>,
    next_turn: AtomicU64,
}

/// One `session/prompt` being served.
struct Turn {
    number: u64,
    session_id: SessionId,
    cx: ConnectionTo<Client>,
    cancel: watch::Receiver<bool>,
    /// Agent text streamed before the response.
    sent: Vec<String>,
}

enum Ending {
    Stop(StopReason),
    /// `/ignore-cancel`: never answer.
    Never,
}

#[derive(Default)]
struct Directives {
    slow: Option<u64>,
    hang: bool,
    late: bool,
    ignore_cancel: bool,
    die: bool,
    tool: bool,
    permission: bool,
    ask_permission: bool,
    after_done: bool,
    chatty: bool,
    chatty_hang: bool,
    think: bool,
}

/// One update of a paced sequence.
enum Step {
    /// An agent text chunk, recorded in the history.
    Chunk(String),
    Update(Box<SessionUpdate>),
}

fn text_block(text: &str) -> ContentBlock {
    ContentBlock::Text(TextContent::new(text))
}

fn agent_chunk(text: &str) -> SessionUpdate {
    SessionUpdate::AgentMessageChunk(ContentChunk::new(text_block(text)))
}

fn tool_call(id: &'static str, title: &str, kind: ToolKind) -> SessionUpdate {
    SessionUpdate::ToolCall(
        ToolCall::new(id, title)
            .kind(kind)
            .status(ToolCallStatus::Pending),
    )
}

fn tool_done(id: &'static str, text: &str) -> SessionUpdate {
    SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
        id,
        ToolCallUpdateFields::new()
            .status(ToolCallStatus::Completed)
            .content(vec![ToolCallContent::Content(Content::new(text_block(
                text,
            )))]),
    ))
}

/// `/chatty`: agent text between tool calls. `/chatty-hang` stops at the
/// first tool call, left pending.
fn chatty_steps(hang: bool) -> Vec<Step> {
    let mut steps = vec![
        Step::Chunk("Let me look. ".into()),
        Step::Update(Box::new(tool_call("chat-1", "grep", ToolKind::Search))),
    ];
    if !hang {
        steps.extend([
            Step::Update(Box::new(tool_done("chat-1", "found 3 matches"))),
            Step::Chunk("Found them. ".into()),
            Step::Update(Box::new(tool_call("chat-2", "read", ToolKind::Read))),
            Step::Update(Box::new(tool_done("chat-2", "file contents"))),
        ]);
    }
    steps
}

impl Peer {
    fn new(config: Config) -> Self {
        Self {
            config,
            sessions: Mutex::new(HashMap::new()),
            next_turn: AtomicU64::new(1),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_path(&self, id: &str) -> Option<PathBuf> {
        let safe = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        match &self.config.state_dir {
            Some(dir) if safe => Some(dir.join(format!("{id}.json"))),
            _ => None,
        }
    }

    fn save(&self, id: &str, history: &[Entry]) {
        let Some(path) = self.state_path(id) else {
            return;
        };
        let state = StateFile {
            session_id: id.to_owned(),
            history: history.to_vec(),
        };
        if let Err(err) = write_state(&path, &state) {
            log(&format!("cannot save {}: {err}", path.display()));
        }
    }

    fn read_state(&self, id: &str) -> Option<Session> {
        let path = self.state_path(id)?;
        let raw = std::fs::read_to_string(path).ok()?;
        let state: StateFile = serde_json::from_str(&raw).ok()?;
        Some(Session {
            history: state.history,
            turns: HashMap::new(),
        })
    }

    fn new_session(&self) -> SessionId {
        let id = format!("sess-{}", uuid::Uuid::new_v4().simple());
        self.save(&id, &[]);
        self.sessions().insert(id.clone(), Session::default());
        SessionId::new(id)
    }

    /// Makes sure the session is in memory, reading it from the state
    /// directory if needed; false if it exists nowhere.
    fn ensure_session(&self, id: &str) -> bool {
        if self.sessions().contains_key(id) {
            return true;
        }
        let Some(session) = self.read_state(id) else {
            return false;
        };
        self.sessions().entry(id.to_owned()).or_insert(session);
        true
    }

    fn load_session(
        &self,
        request: LoadSessionRequest,
        responder: Responder<LoadSessionResponse>,
        cx: &ConnectionTo<Client>,
    ) -> Result<(), agent_client_protocol::Error> {
        if !self.config.load_session {
            return responder.respond_with_error(agent_client_protocol::Error::method_not_found());
        }
        let id = request.session_id;
        if !self.ensure_session(&id.0) {
            return responder.respond_with_error(
                agent_client_protocol::v1::schema::Error::session_not_found(id).into(),
            );
        }
        let history = self
            .sessions()
            .get(&*id.0)
            .map(|session| session.history.clone())
            .unwrap_or_default();
        // The replay is queued before the response on the same outgoing
        // channel, so the client sees every update before the response.
        for entry in history {
            let update = if entry.role == "user" {
                SessionUpdate::UserMessageChunk(ContentChunk::new(text_block(&entry.text)))
            } else {
                agent_chunk(&entry.text)
            };
            cx.send_notification(SessionNotification::new(id.clone(), update))?;
        }
        responder.respond(LoadSessionResponse::new())
    }

    fn cancel(&self, id: &SessionId) {
        if let Some(session) = self.sessions().get(&*id.0) {
            for switch in session.turns.values() {
                switch.send_replace(true);
            }
        }
    }

    fn start_turn(
        &self,
        id: &SessionId,
        cx: ConnectionTo<Client>,
    ) -> Result<Turn, agent_client_protocol::Error> {
        if !self.ensure_session(&id.0) {
            return Err(
                agent_client_protocol::v1::schema::Error::session_not_found(id.clone()).into(),
            );
        }
        let number = self.next_turn.fetch_add(1, Ordering::Relaxed);
        let (switch, cancel) = watch::channel(false);
        if let Some(session) = self.sessions().get_mut(&*id.0) {
            session.turns.insert(number, switch);
        }
        Ok(Turn {
            number,
            session_id: id.clone(),
            cx,
            cancel,
            sent: Vec::new(),
        })
    }

    async fn run_prompt(
        &self,
        mut turn: Turn,
        request: PromptRequest,
        responder: Responder<PromptResponse>,
    ) {
        let text: String = request
            .prompt
            .iter()
            .filter_map(|block| match block {
                ContentBlock::Text(text) => Some(text.text.as_str()),
                _ => None,
            })
            .collect();
        let (directives, rest) = parse_directives(&text);
        let ending = self.run_turn(&mut turn, &directives, &rest).await;

        let id = turn.session_id.0.to_string();
        let history = {
            let mut sessions = self.sessions();
            let Some(session) = sessions.get_mut(&id) else {
                return;
            };
            session.turns.remove(&turn.number);
            if matches!(ending, Ok(Ending::Never)) {
                None
            } else {
                session.history.push(Entry {
                    role: "user".into(),
                    text: text.clone(),
                });
                let reply = turn.sent.concat();
                if !reply.is_empty() {
                    session.history.push(Entry {
                        role: "agent".into(),
                        text: reply,
                    });
                }
                Some(session.history.clone())
            }
        };
        if let Some(history) = history {
            self.save(&id, &history);
        }

        let result = match ending {
            Ok(Ending::Stop(stop)) => responder.respond(PromptResponse::new(stop)),
            Ok(Ending::Never) => {
                // Keep the responder alive: dropping it would answer the
                // request with an error.
                let _responder = responder;
                std::future::pending::<()>().await;
                Ok(())
            }
            Err(err) => responder.respond_with_error(err),
        };
        if let Err(err) = result {
            log(&format!("cannot answer session/prompt: {err:?}"));
        }
        if directives.late {
            // Same outgoing channel as the response: LATE2 follows it.
            if let Err(err) = turn.update(agent_chunk("LATE2")) {
                log(&format!("cannot send LATE2: {err:?}"));
            }
        }
        if directives.after_done {
            // An agent that talks after its answer; not recorded.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Err(err) = turn.update(agent_chunk("LATE-AFTER-DONE")) {
                log(&format!("cannot send LATE-AFTER-DONE: {err:?}"));
            }
        }
    }

    async fn run_turn(
        &self,
        turn: &mut Turn,
        directives: &Directives,
        rest: &str,
    ) -> Result<Ending, agent_client_protocol::Error> {
        let delay = directives
            .slow
            .map_or(self.config.delay, Duration::from_millis);
        let mut reply = format!("echo: {rest}");
        let first = split_chunks(&reply).into_iter().next().unwrap_or_default();

        if directives.die {
            turn.chunk(&first)?;
            // The chunk is queued for the writer task; give it time to reach
            // the pipe before the process goes away.
            tokio::time::sleep(Duration::from_millis(100)).await;
            eprintln!("peer dying on purpose");
            std::process::exit(3);
        }

        if directives.ignore_cancel {
            turn.chunk(&first)?;
            return Ok(Ending::Never);
        }

        if directives.hang || directives.late {
            turn.chunk(&first)?;
            turn.cancelled().await;
            if directives.late {
                turn.chunk("LATE")?;
            }
            return Ok(Ending::Stop(StopReason::Cancelled));
        }

        if directives.tool {
            turn.update(SessionUpdate::ToolCall(
                ToolCall::new("call-1", "grep")
                    .kind(ToolKind::Search)
                    .status(ToolCallStatus::Pending),
            ))?;
            turn.update(SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
                "call-1",
                ToolCallUpdateFields::new()
                    .status(ToolCallStatus::Completed)
                    .content(vec![ToolCallContent::Content(Content::new(text_block(
                        "found 3 matches",
                    )))]),
            )))?;
        }

        if directives.permission {
            turn.update(SessionUpdate::ToolCall(
                ToolCall::new("call-2", "write file")
                    .kind(ToolKind::Edit)
                    .status(ToolCallStatus::Pending),
            ))?;
            let request = RequestPermissionRequest::new(
                turn.session_id.clone(),
                ToolCallUpdate::new(
                    "call-2",
                    ToolCallUpdateFields::new()
                        .title("write file")
                        .kind(ToolKind::Edit)
                        .status(ToolCallStatus::Pending),
                ),
                vec![
                    PermissionOption::new(
                        "allow-once",
                        "Allow once",
                        PermissionOptionKind::AllowOnce,
                    ),
                    PermissionOption::new(
                        "reject-once",
                        "Reject once",
                        PermissionOptionKind::RejectOnce,
                    ),
                ],
            );
            // We run in a spawned task, outside the dispatch loop, so waiting
            // for the client's answer cannot deadlock.
            let response = turn.cx.send_request(request).block_task().await?;
            if turn.is_cancelled() {
                return Ok(Ending::Stop(StopReason::Cancelled));
            }
            reply = match response.outcome {
                RequestPermissionOutcome::Selected(selected)
                    if &*selected.option_id.0 == "allow-once" =>
                {
                    "permission granted".to_owned()
                }
                RequestPermissionOutcome::Selected(_) => "permission denied".to_owned(),
                _ => return Ok(Ending::Stop(StopReason::Cancelled)),
            };
        }

        if directives.ask_permission {
            turn.update(SessionUpdate::ToolCall(
                ToolCall::new("call-3", "run command")
                    .kind(ToolKind::Execute)
                    .status(ToolCallStatus::Pending),
            ))?;
            let option = |id: &str, name: &str, kind| {
                PermissionOption::new(id.to_owned(), name.to_owned(), kind)
            };
            let request = RequestPermissionRequest::new(
                turn.session_id.clone(),
                ToolCallUpdate::new(
                    "call-3",
                    ToolCallUpdateFields::new()
                        .title("run command")
                        .kind(ToolKind::Execute)
                        .status(ToolCallStatus::Pending),
                ),
                vec![
                    option("allow-once", "Allow once", PermissionOptionKind::AllowOnce),
                    option(
                        "allow-always",
                        "Allow always",
                        PermissionOptionKind::AllowAlways,
                    ),
                    option(
                        "reject-once",
                        "Reject once",
                        PermissionOptionKind::RejectOnce,
                    ),
                    option(
                        "reject-always",
                        "Reject always",
                        PermissionOptionKind::RejectAlways,
                    ),
                ],
            );
            let response = turn.cx.send_request(request).block_task().await?;
            let chosen = match response.outcome {
                RequestPermissionOutcome::Selected(selected) => selected.option_id.0.to_string(),
                _ => "cancelled".to_owned(),
            };
            // `/ask-permission` appends the outcome it received here, one
            // line each.
            if let Ok(path) = std::env::var("ACP_PEER_PERMISSION_LOG") {
                use std::io::Write;
                let logged = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| writeln!(f, "{chosen}"));
                if let Err(e) = logged {
                    eprintln!("cannot append to {path}: {e}");
                }
            }
            if turn.is_cancelled() {
                return Ok(Ending::Stop(StopReason::Cancelled));
            }
            reply = format!("permission: {chosen}");
        }

        if directives.chatty_hang {
            if turn.play(chatty_steps(true), delay).await? {
                // The tool call stays open.
                turn.cancelled().await;
            }
            return Ok(Ending::Stop(StopReason::Cancelled));
        }

        // `/think`: one thought chunk before everything else the turn says.
        let mut steps = Vec::new();
        if directives.think {
            steps.push(Step::Update(Box::new(SessionUpdate::AgentThoughtChunk(
                ContentChunk::new(text_block("Thinking it over.")),
            ))));
        }
        if directives.chatty {
            steps.extend(chatty_steps(false));
        }
        steps.extend(split_chunks(&reply).into_iter().map(Step::Chunk));
        if turn.play(steps, delay).await? {
            Ok(Ending::Stop(StopReason::EndTurn))
        } else {
            Ok(Ending::Stop(StopReason::Cancelled))
        }
    }
}

impl Turn {
    fn update(&self, update: SessionUpdate) -> Result<(), agent_client_protocol::Error> {
        self.cx
            .send_notification(SessionNotification::new(self.session_id.clone(), update))
    }

    fn chunk(&mut self, text: &str) -> Result<(), agent_client_protocol::Error> {
        self.update(agent_chunk(text))?;
        self.sent.push(text.to_owned());
        Ok(())
    }

    fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    async fn cancelled(&mut self) {
        // Err only if the switch was dropped, which happens after the turn.
        if self.cancel.wait_for(|cancelled| *cancelled).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps, waking early on cancel.
    async fn pause(&mut self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.cancelled() => {}
        }
    }

    /// Sends the steps `delay` apart; false if cancelled midway.
    async fn play(
        &mut self,
        steps: Vec<Step>,
        delay: Duration,
    ) -> Result<bool, agent_client_protocol::Error> {
        for (i, step) in steps.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                self.pause(delay).await;
            }
            if self.is_cancelled() {
                return Ok(false);
            }
            match step {
                Step::Chunk(text) => self.chunk(&text)?,
                Step::Update(update) => self.update(*update)?,
            }
        }
        Ok(!self.is_cancelled())
    }
}

fn write_state(path: &Path, state: &StateFile) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(state)?)?;
    std::fs::rename(tmp, path)
}

/// Splits off the first whitespace-separated word; the rest loses its
/// leading whitespace.
fn split_word(text: &str) -> (&str, &str) {
    match text.find(char::is_whitespace) {
        Some(at) => (&text[..at], text[at..].trim_start()),
        None => (text, ""),
    }
}

/// Strips the directives at the start of the prompt text (they may be
/// chained: `/slow 50 /tool hello`); returns them and the rest of the text.
fn parse_directives(text: &str) -> (Directives, String) {
    let mut directives = Directives::default();
    let mut rest = text.trim_start();
    while rest.starts_with('/') {
        let (word, after) = split_word(rest);
        match word {
            "/hang" => directives.hang = true,
            "/late" => directives.late = true,
            "/ignore-cancel" => directives.ignore_cancel = true,
            "/die" => directives.die = true,
            "/tool" => directives.tool = true,
            "/permission" => directives.permission = true,
            "/ask-permission" => directives.ask_permission = true,
            "/after-done" => directives.after_done = true,
            "/chatty" => directives.chatty = true,
            "/chatty-hang" => directives.chatty_hang = true,
            "/think" => directives.think = true,
            "/slow" => {
                let (arg, after_arg) = split_word(after);
                match arg.parse::<u64>() {
                    Ok(ms) if arg.bytes().all(|b| b.is_ascii_digit()) => {
                        directives.slow = Some(ms);
                        rest = after_arg;
                        continue;
                    }
                    _ => break,
                }
            }
            // Not a directive: part of the text to echo.
            _ => break,
        }
        rest = after;
    }
    (directives, rest.to_owned())
}

/// One chunk per word, each carrying the whitespace that follows it, so the
/// chunks concatenate to the exact reply.
fn split_chunks(reply: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut seen_word = false;
    let mut after_word_space = false;
    for c in reply.chars() {
        if c.is_whitespace() {
            if seen_word {
                after_word_space = true;
            }
        } else {
            if after_word_space {
                chunks.push(std::mem::take(&mut current));
                after_word_space = false;
            }
            seen_word = true;
        }
        current.push(c);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_concatenate_to_the_reply() {
        assert_eq!(
            split_chunks("echo: hello  big world "),
            vec!["echo: ", "hello  ", "big ", "world "]
        );
        assert_eq!(split_chunks("  a b"), vec!["  a ", "b"]);
        assert_eq!(split_chunks("echo: "), vec!["echo: "]);
        assert!(split_chunks("").is_empty());
    }

    #[test]
    fn directives_are_stripped() {
        let (d, rest) = parse_directives("/slow 50 /tool  hello world");
        assert_eq!(d.slow, Some(50));
        assert!(d.tool);
        assert_eq!(rest, "hello world");
        let (d, rest) = parse_directives("/slow x hi");
        assert_eq!(d.slow, None);
        assert_eq!(rest, "/slow x hi");
        let (d, rest) = parse_directives("/unknown hi");
        assert!(!d.hang);
        assert_eq!(rest, "/unknown hi");
        let (d, rest) = parse_directives("/hang");
        assert!(d.hang);
        assert_eq!(rest, "");
        let (d, rest) = parse_directives("/chatty-hang /after-done /chatty hi");
        assert!(d.chatty_hang && d.after_done && d.chatty);
        assert_eq!(rest, "hi");
    }
}
