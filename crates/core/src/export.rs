//! Transcripts for model APIs: a session's log rendered as OpenAI Chat
//! Completions messages ([`openai`]) or as an Anthropic Messages API request
//! ([`anthropic`]), and the structural rules of each API as checks
//! ([`check`]) that tests and clients can run on any export.
//!
//! Both formats come from one pass over the log ([`Options`] picks the
//! range, the running turn and thoughts), which keeps what the APIs require:
//! every tool call is followed by its result before anything else, so text,
//! notes and calls that the agent produced while other calls were open are
//! held back until those calls are answered (the one reordering the formats
//! force). Permission requests and decisions are rendered inside the text of
//! the result of the tool call they are about, never as a message between a
//! call and its result. A user message is rendered where the turn that
//! consumed it starts (a message posted mid-turn waited for a later turn).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::{json, Map, Value};

use crate::{Entry, EntryType, PermissionInfo, Role, Seq, TurnId};

/// What to export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Only entries after this seq.
    pub after: Seq,
    /// Only entries up to this seq (inclusive).
    pub upto: Option<Seq>,
    /// Include the turn still running (its open calls get a placeholder
    /// result); by default it is left out whole.
    pub include_running: bool,
    /// Include the agent's thoughts, as text marked `<thinking>`.
    pub include_thoughts: bool,
}

/// A tool call as exported: its id made valid and unique, its name valid.
#[derive(Clone, Debug, PartialEq)]
struct Call {
    id: String,
    name: String,
    arguments: Option<Value>,
}

/// One message of the format-neutral transcript both formats render.
#[derive(Clone, Debug, PartialEq)]
enum Msg {
    User(String),
    Assistant {
        text: String,
        calls: Vec<Call>,
    },
    Tool {
        id: String,
        text: String,
        error: bool,
    },
    Note(String),
}

/// What one entry contributes, before pairing.
#[derive(Clone, Debug)]
enum Item {
    User(String),
    Text(String),
    Call {
        log_id: String,
        name: Option<String>,
        arguments: Option<Value>,
    },
    Result {
        log_id: String,
        text: String,
        error: bool,
    },
    /// A note about tool call `call` (a permission request or decision).
    About {
        call: Option<String>,
        text: String,
    },
    Note(String),
}

/// Text of a result whose call is exported but whose result is not.
const NO_RESULT: &str = "no result in this export: the call is still running, or its result lies outside the exported range";

/// Builds the neutral transcript, keeping every call paired with its result.
#[derive(Default)]
struct Pairing {
    out: Vec<Msg>,
    /// The assistant message that still takes text and calls.
    open: Option<usize>,
    /// Exported calls without a result yet: (log id, export id).
    pending: Vec<(String, String)>,
    /// Notes to put in front of a pending call's result, by log id.
    about: HashMap<String, Vec<String>>,
    /// Items held back while calls are pending.
    held: VecDeque<Item>,
    used_ids: HashSet<String>,
}

impl Pairing {
    fn feed(&mut self, item: Item) {
        if !self.pending.is_empty() {
            match &item {
                Item::Result { log_id, .. } if self.is_pending(log_id) => {}
                Item::About {
                    call: Some(call), ..
                } if self.is_pending(call) && !self.holds_call(call) => {}
                // A call joins the assistant message of the pending ones
                // while nothing was held back since (order kept).
                Item::Call { .. } if self.open.is_some() && self.held.is_empty() => {}
                _ => {
                    self.held.push_back(item);
                    return;
                }
            }
        }
        match item {
            Item::User(text) => {
                self.out.push(Msg::User(text));
                self.open = None;
            }
            Item::Note(text) => {
                self.out.push(Msg::Note(text));
                self.open = None;
            }
            Item::Text(t) => match self.open.and_then(|i| self.out.get_mut(i)) {
                Some(Msg::Assistant { text, calls }) if calls.is_empty() => {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&t);
                }
                _ => {
                    self.out.push(Msg::Assistant {
                        text: t,
                        calls: Vec::new(),
                    });
                    self.open = Some(self.out.len() - 1);
                }
            },
            Item::Call {
                log_id,
                name,
                arguments,
            } => {
                let call = Call {
                    id: self.unique_id(&log_id),
                    name: tool_name(name.as_deref()),
                    arguments,
                };
                self.pending.push((log_id, call.id.clone()));
                match self.open.and_then(|i| self.out.get_mut(i)) {
                    Some(Msg::Assistant { calls, .. }) => calls.push(call),
                    _ => {
                        self.out.push(Msg::Assistant {
                            text: String::new(),
                            calls: vec![call],
                        });
                        self.open = Some(self.out.len() - 1);
                    }
                }
            }
            Item::Result {
                log_id,
                text,
                error,
            } => match self.pending.iter().position(|(l, _)| *l == log_id) {
                Some(i) => {
                    let (_, id) = self.pending.remove(i);
                    self.answer(&log_id, id, text, error);
                }
                // A result of no exported call (outside the range, or a
                // second one): a note, never an unpaired result.
                None => self.feed(Item::Note(format!("tool result for {log_id}: {text}"))),
            },
            Item::About { call, text } => match call.filter(|c| self.is_pending(c)) {
                Some(c) => self.about.entry(c).or_default().push(text),
                None => self.feed(Item::Note(text)),
            },
        }
    }

    fn answer(&mut self, log_id: &str, id: String, text: String, error: bool) {
        let mut notes = self.about.remove(log_id).unwrap_or_default();
        notes.push(text);
        self.out.push(Msg::Tool {
            id,
            text: notes.join("\n"),
            error,
        });
        self.open = None;
        if self.pending.is_empty() {
            for item in std::mem::take(&mut self.held) {
                self.feed(item);
            }
        }
    }

    fn is_pending(&self, log_id: &str) -> bool {
        self.pending.iter().any(|(l, _)| l == log_id)
    }

    fn holds_call(&self, log_id: &str) -> bool {
        self.held
            .iter()
            .any(|i| matches!(i, Item::Call { log_id: l, .. } if l == log_id))
    }

    /// An id both APIs accept (`[A-Za-z0-9_-]+`), unique in the export.
    fn unique_id(&mut self, raw: &str) -> String {
        let mut base: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if base.is_empty() {
            base = "call".to_owned();
        }
        let mut id = base.clone();
        let mut n = 1;
        while !self.used_ids.insert(id.clone()) {
            n += 1;
            id = format!("{base}_{n}");
        }
        id
    }

    /// Answers what is still open with a placeholder, then what was held.
    fn finish(mut self) -> Vec<Msg> {
        while !self.pending.is_empty() {
            let (log_id, id) = self.pending.remove(0);
            self.answer(&log_id, id, NO_RESULT.to_owned(), false);
        }
        self.out
    }
}

/// A tool name both APIs accept: `[A-Za-z0-9_-]{1,64}` (an ACP tool call's
/// title, such as "write file", becomes `write_file`).
fn tool_name(raw: Option<&str>) -> String {
    let name: String = raw
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "tool".to_owned()
    } else {
        name
    }
}

/// The turn that started and has not ended, if any.
fn running_turn(log: &[Entry]) -> Option<TurnId> {
    let mut running = None;
    for e in log {
        match e.kind {
            EntryType::TurnStarted => running = e.turn_id,
            EntryType::TurnEnded if e.turn_id == running => running = None,
            _ => {}
        }
    }
    running
}

fn permission_text(
    kind: EntryType,
    p: &PermissionInfo,
    requests: &HashMap<String, PermissionInfo>,
) -> String {
    let title = p.title.as_deref().unwrap_or("a tool call");
    if kind == EntryType::PermissionRequest {
        let options: Vec<String> = p
            .options
            .iter()
            .map(|o| format!("{} ({})", o.name, o.kind))
            .collect();
        return format!(
            "[permission requested for {title}; options: {}]",
            options.join(", ")
        );
    }
    let by = p.decided_by.as_deref().unwrap_or("unknown");
    let chosen = requests
        .get(&p.request_id)
        .and_then(|r| p.chosen(r))
        .map(|o| format!("{} ({})", o.name, o.kind))
        .or_else(|| p.option_id.clone());
    match (p.outcome.as_deref(), chosen) {
        (Some("selected"), Some(option)) => {
            format!("[permission for {title}: {option}, decided by {by}]")
        }
        _ => format!("[permission for {title}: cancelled, decided by {by}]"),
    }
}

/// The log as the neutral transcript.
fn transcript(log: &[Entry], opts: &Options) -> Vec<Msg> {
    let running = if opts.include_running {
        None
    } else {
        running_turn(log)
    };
    let chosen: Vec<&Entry> = log
        .iter()
        .filter(|e| e.seq > opts.after && opts.upto.is_none_or(|u| e.seq <= u))
        .filter(|e| running.is_none() || e.turn_id != running)
        .collect();
    // User messages consumed by a turn in the export wait for its start.
    let consumed: Vec<(Seq, Seq)> = chosen
        .iter()
        .filter(|e| e.kind == EntryType::TurnStarted)
        .filter_map(|e| e.input.map(|i| (i.from, i.to)))
        .collect();
    let mut waiting: BTreeMap<Seq, String> = BTreeMap::new();
    let mut requests: HashMap<String, PermissionInfo> = HashMap::new();
    let mut pairing = Pairing::default();
    // Logs of earlier versions store a turn's closing results before the
    // decisions that close its waiting permission requests: each closing
    // result waits for the permission entries right after it, so a
    // decision lands inside the result of the call it is about either way.
    let mut closing: Vec<&Entry> = Vec::new();
    let mut ordered: Vec<&Entry> = Vec::with_capacity(chosen.len());
    for e in chosen {
        match e.kind {
            EntryType::ToolResult if e.status.is_some() => closing.push(e),
            EntryType::PermissionRequest | EntryType::PermissionDecision => ordered.push(e),
            _ => {
                ordered.append(&mut closing);
                ordered.push(e);
            }
        }
    }
    ordered.append(&mut closing);
    for e in ordered {
        let content = e.content.clone().unwrap_or_default();
        let item = match (e.kind, e.role) {
            (EntryType::Message, Some(Role::User)) => {
                if consumed.iter().any(|(f, t)| (*f..=*t).contains(&e.seq)) {
                    waiting.insert(e.seq, content);
                    continue;
                }
                Item::User(content)
            }
            (EntryType::Message, Some(Role::Assistant)) => Item::Text(content),
            (EntryType::Message, Some(Role::System)) => Item::Note(content),
            (EntryType::Message, None) => continue,
            (EntryType::Thought, _) if opts.include_thoughts => {
                Item::Text(format!("<thinking>{content}</thinking>"))
            }
            (EntryType::Thought, _) => continue,
            (EntryType::ToolCall, _) => {
                let Some(tool) = &e.tool else { continue };
                Item::Call {
                    log_id: tool.id.clone(),
                    name: tool.name.clone(),
                    arguments: tool.arguments.clone(),
                }
            }
            (EntryType::ToolResult, _) => {
                let Some(tool) = &e.tool else { continue };
                Item::Result {
                    log_id: tool.id.clone(),
                    text: content,
                    // A result that closes a call its turn left open.
                    error: e.status.is_some(),
                }
            }
            (EntryType::PermissionRequest | EntryType::PermissionDecision, _) => {
                let Some(p) = &e.permission else { continue };
                let text = permission_text(e.kind, p, &requests);
                if e.kind == EntryType::PermissionRequest {
                    requests.insert(p.request_id.clone(), p.clone());
                }
                Item::About {
                    call: p.tool_call_id.clone(),
                    text,
                }
            }
            (EntryType::TurnStarted, _) => {
                let Some(input) = e.input else { continue };
                let inputs: Vec<Seq> = waiting
                    .range(input.from..=input.to)
                    .map(|(s, _)| *s)
                    .collect();
                for seq in inputs {
                    if let Some(text) = waiting.remove(&seq) {
                        pairing.feed(Item::User(text));
                    }
                }
                continue;
            }
            (EntryType::TurnEnded, _) => continue,
        };
        pairing.feed(item);
    }
    for (_, text) in waiting {
        pairing.feed(Item::User(text));
    }
    pairing.finish()
}

fn arguments_string(arguments: &Option<Value>) -> String {
    match arguments {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "{}".to_owned(),
    }
}

/// A tool's input as the JSON object Anthropic requires.
fn input_object(arguments: &Option<Value>) -> Value {
    match arguments {
        Some(Value::Object(m)) => Value::Object(m.clone()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Value::Object(m),
            _ => json!({ "input": s }),
        },
        None | Some(Value::Null) => json!({}),
        Some(v) => json!({ "input": v }),
    }
}

/// The log as OpenAI Chat Completions `messages`: roles `user`,
/// `assistant` (with `tool_calls`), `tool` (with `tool_call_id`) and
/// `system` (notes).
pub fn openai(log: &[Entry], opts: &Options) -> Vec<Value> {
    transcript(log, opts)
        .into_iter()
        .filter_map(|m| match m {
            Msg::User(text) => Some(json!({"role": "user", "content": text})),
            Msg::Note(text) => Some(json!({"role": "system", "content": text})),
            Msg::Assistant { text, calls } if calls.is_empty() => {
                (!text.is_empty()).then(|| json!({"role": "assistant", "content": text}))
            }
            Msg::Assistant { text, calls } => {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": arguments_string(&c.arguments)},
                        })
                    })
                    .collect();
                let content = if text.is_empty() {
                    Value::Null
                } else {
                    Value::String(text)
                };
                Some(json!({"role": "assistant", "content": content, "tool_calls": calls}))
            }
            Msg::Tool { id, text, .. } => {
                Some(json!({"role": "tool", "tool_call_id": id, "content": text}))
            }
        })
        .collect()
}

/// Text Anthropic accepts in a text block (not empty, not only whitespace).
fn block_text(text: &str) -> String {
    if text.trim().is_empty() {
        "(empty)".to_owned()
    } else {
        text.to_owned()
    }
}

/// The log as an Anthropic Messages API request's `{system, messages}`:
/// roles alternate from `user`, content blocks `text`, `tool_use` and
/// `tool_result`, each `tool_result` first in the user message right after
/// its `tool_use`. Notes before the first message form `system`; later ones
/// are text blocks of the message they follow.
pub fn anthropic(log: &[Entry], opts: &Options) -> Value {
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    fn push(
        messages: &mut Vec<(&'static str, Vec<Value>)>,
        role: &'static str,
        blocks: Vec<Value>,
    ) {
        if blocks.is_empty() {
            return;
        }
        match messages.last_mut() {
            Some((r, content)) if *r == role => content.extend(blocks),
            _ => messages.push((role, blocks)),
        }
    }
    for m in transcript(log, opts) {
        match m {
            Msg::Note(text) if messages.is_empty() => system.push(text),
            Msg::Note(text) => {
                if let Some((_, content)) = messages.last_mut() {
                    content.push(json!({"type": "text", "text": block_text(&text)}));
                }
            }
            Msg::User(text) => push(
                &mut messages,
                "user",
                vec![json!({"type": "text", "text": block_text(&text)})],
            ),
            Msg::Assistant { text, calls } => {
                let mut blocks = Vec::new();
                if !text.trim().is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                blocks.extend(calls.iter().map(|c| {
                    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input_object(&c.arguments)})
                }));
                push(&mut messages, "assistant", blocks);
            }
            Msg::Tool { id, text, error } => {
                let mut block =
                    json!({"type": "tool_result", "tool_use_id": id, "content": block_text(&text)});
                if error {
                    block["is_error"] = Value::Bool(true);
                }
                push(&mut messages, "user", vec![block]);
            }
        }
    }
    // The API starts with the user: a range that begins with the agent's
    // output gets a marker message in front.
    if messages.first().is_some_and(|(r, _)| *r == "assistant") {
        messages.insert(
            0,
            (
                "user",
                vec![json!({"type": "text", "text": "(the transcript continues from an earlier point)"})],
            ),
        );
    }
    let mut out = Map::new();
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert(
        "messages".into(),
        Value::Array(
            messages
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    Value::Object(out)
}

pub mod check {
    //! The structural rules each API documents for the transcripts it takes,
    //! as checks: `Ok` means the API's validation of roles, tool pairing and
    //! content types would accept it. Used by the tests of every layer.

    use std::collections::HashSet;

    use serde_json::Value;

    fn valid_name(s: &str) -> bool {
        (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }

    /// OpenAI Chat Completions `messages`: roles `system`, `developer`,
    /// `user`, `assistant`, `tool`; an assistant message has string content
    /// or `null` with `tool_calls`; each tool call (`type: "function"`, a
    /// unique `id`, a valid function name, `arguments` a JSON string) is
    /// answered by a `tool` message with its `tool_call_id` before the next
    /// message of any other role, and a `tool` message answers a call of
    /// the assistant message before it.
    pub fn openai(messages: &[Value]) -> Result<(), String> {
        let mut pending: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (i, m) in messages.iter().enumerate() {
            let role = m["role"].as_str().ok_or(format!("message {i}: no role"))?;
            if role != "tool" && !pending.is_empty() {
                return Err(format!(
                    "message {i} ({role}) comes before the results of tool calls {pending:?}"
                ));
            }
            match role {
                "system" | "developer" | "user" => {
                    if m["content"].as_str().is_none_or(str::is_empty) {
                        return Err(format!(
                            "message {i} ({role}): content must be a non-empty string"
                        ));
                    }
                }
                "assistant" => {
                    let calls = match m.get("tool_calls") {
                        None | Some(Value::Null) => &[][..],
                        Some(Value::Array(a)) if !a.is_empty() => a.as_slice(),
                        Some(other) => {
                            return Err(format!(
                                "message {i}: tool_calls must be a non-empty array: {other}"
                            ))
                        }
                    };
                    match &m["content"] {
                        Value::String(_) => {}
                        Value::Null if !calls.is_empty() => {}
                        other => {
                            return Err(format!(
                                "message {i}: assistant content must be a string, or null with tool_calls: {other}"
                            ))
                        }
                    }
                    for c in calls {
                        let id = c["id"]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .ok_or(format!("message {i}: a tool call without an id"))?;
                        if c["type"] != "function" {
                            return Err(format!(
                                "message {i}: tool call {id} is not of type function"
                            ));
                        }
                        if !c["function"]["name"].as_str().is_some_and(valid_name) {
                            return Err(format!(
                                "message {i}: tool call {id} has an invalid function name"
                            ));
                        }
                        let args = c["function"]["arguments"].as_str().ok_or(format!(
                            "message {i}: tool call {id}: arguments must be a string"
                        ))?;
                        serde_json::from_str::<Value>(args).map_err(|e| {
                            format!("message {i}: tool call {id}: arguments are not JSON: {e}")
                        })?;
                        if !seen.insert(id.to_owned()) {
                            return Err(format!("message {i}: tool call id {id} used twice"));
                        }
                        pending.push(id.to_owned());
                    }
                }
                "tool" => {
                    let id = m["tool_call_id"]
                        .as_str()
                        .ok_or(format!("message {i}: tool message without tool_call_id"))?;
                    let Some(at) = pending.iter().position(|p| p == id) else {
                        return Err(format!(
                            "message {i}: tool message for {id}, which the assistant message before it did not call"
                        ));
                    };
                    pending.remove(at);
                    if !m["content"].is_string() {
                        return Err(format!("message {i}: tool content must be a string"));
                    }
                }
                other => return Err(format!("message {i}: unknown role {other:?}")),
            }
        }
        if !pending.is_empty() {
            return Err(format!("tool calls {pending:?} are never answered"));
        }
        Ok(())
    }

    /// An Anthropic Messages API request's `system` and `messages`:
    /// `system` is a top-level string; roles only `user` and `assistant`,
    /// alternating, starting with `user`; content a non-blank string or a
    /// non-empty array of `text` (non-blank), `tool_use` (assistant only: an
    /// id of `[A-Za-z0-9_-]`, unique; a valid name; an object `input`) and
    /// `tool_result` (user only) blocks; every `tool_use` answered by a
    /// `tool_result` with its `tool_use_id` in the very next message, whose
    /// `tool_result` blocks come first and answer only those calls.
    pub fn anthropic(request: &Value) -> Result<(), String> {
        let obj = request.as_object().ok_or("the request is not an object")?;
        for key in obj.keys() {
            if key != "system" && key != "messages" {
                return Err(format!("unexpected top-level field {key:?}"));
            }
        }
        if let Some(system) = obj.get("system") {
            if system.as_str().is_none_or(|s| s.trim().is_empty()) {
                return Err("system must be a non-blank string".into());
            }
        }
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("messages must be an array")?;
        let mut seen: HashSet<String> = HashSet::new();
        let mut asked: Vec<String> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let role = m["role"].as_str().ok_or(format!("message {i}: no role"))?;
            let want = if i % 2 == 0 { "user" } else { "assistant" };
            if role != want {
                return Err(format!(
                    "message {i} is {role:?}: roles must alternate starting with user"
                ));
            }
            let blocks: Vec<Value> = match &m["content"] {
                Value::String(s) if !s.trim().is_empty() => {
                    vec![serde_json::json!({"type": "text", "text": s})]
                }
                Value::Array(a) if !a.is_empty() => a.clone(),
                other => {
                    return Err(format!(
                        "message {i}: content must be a non-blank string or blocks: {other}"
                    ))
                }
            };
            let mut answered: Vec<String> = Vec::new();
            let mut past_results = false;
            let mut calls: Vec<String> = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                match b["type"].as_str() {
                    Some("text") => {
                        if b["text"].as_str().is_none_or(|t| t.trim().is_empty()) {
                            return Err(format!("message {i} block {j}: text must be non-blank"));
                        }
                        past_results = true;
                    }
                    Some("tool_use") => {
                        if role != "assistant" {
                            return Err(format!(
                                "message {i} block {j}: tool_use in a {role} message"
                            ));
                        }
                        let id = b["id"].as_str().unwrap_or_default();
                        if id.is_empty()
                            || !id
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                        {
                            return Err(format!(
                                "message {i} block {j}: invalid tool_use id {id:?}"
                            ));
                        }
                        if !seen.insert(id.to_owned()) {
                            return Err(format!(
                                "message {i} block {j}: tool_use id {id} used twice"
                            ));
                        }
                        if !b["name"].as_str().is_some_and(valid_name) {
                            return Err(format!(
                                "message {i} block {j}: invalid tool name {}",
                                b["name"]
                            ));
                        }
                        if !b["input"].is_object() {
                            return Err(format!(
                                "message {i} block {j}: tool_use input must be an object"
                            ));
                        }
                        calls.push(id.to_owned());
                    }
                    Some("tool_result") => {
                        if role != "user" {
                            return Err(format!(
                                "message {i} block {j}: tool_result in a {role} message"
                            ));
                        }
                        if past_results {
                            return Err(format!(
                                "message {i} block {j}: tool_result after other content"
                            ));
                        }
                        let id = b["tool_use_id"].as_str().unwrap_or_default();
                        if !asked.iter().any(|a| a == id) || answered.iter().any(|a| a == id) {
                            return Err(format!(
                                "message {i} block {j}: tool_result for {id:?}, not a tool_use of the message before"
                            ));
                        }
                        match &b["content"] {
                            Value::String(_) | Value::Null => {}
                            Value::Array(parts) if parts.iter().all(|p| p["type"] == "text") => {}
                            other => {
                                return Err(format!(
                                    "message {i} block {j}: tool_result content {other}"
                                ))
                            }
                        }
                        if !matches!(b.get("is_error"), None | Some(Value::Bool(_))) {
                            return Err(format!(
                                "message {i} block {j}: is_error must be a boolean"
                            ));
                        }
                        answered.push(id.to_owned());
                    }
                    other => {
                        return Err(format!(
                            "message {i} block {j}: unknown block type {other:?}"
                        ))
                    }
                }
            }
            if let Some(open) = asked.iter().find(|a| !answered.contains(a)) {
                return Err(format!(
                    "message {i}: tool_use {open} is not answered in the next message"
                ));
            }
            asked = calls;
        }
        if let Some(open) = asked.first() {
            return Err(format!("tool_use {open} is never answered"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        InputRange, NewEntry, PermissionOptionInfo, SessionId, Timestamp, ToolInfo, TurnStatus,
    };

    fn log(entries: Vec<NewEntry>) -> Vec<Entry> {
        let s = SessionId::new();
        entries
            .into_iter()
            .zip(1..)
            .map(|(e, seq)| e.committed(s, seq, Timestamp(0)))
            .collect()
    }

    fn call(t: TurnId, id: &str) -> NewEntry {
        NewEntry::tool_call(
            t,
            ToolInfo {
                id: id.into(),
                name: Some("write file".into()),
                arguments: Some(json!({"path": "a"})),
            },
        )
    }

    /// Text, a call with its permission pair, the result, text: the
    /// permission is inside the result, nothing splits the pair.
    #[test]
    fn text_tool_text_with_a_permission_in_both_formats() {
        let t = TurnId::new();
        let request = PermissionInfo::request(
            Some("c1".into()),
            Some("write file".into()),
            vec![PermissionOptionInfo {
                option_id: "ok".into(),
                name: "Allow once".into(),
                kind: "allow_once".into(),
            }],
        );
        let decision = request.decision(Some("ok".into()), "policy");
        let log = log(vec![
            NewEntry::user_message("hi"),
            NewEntry::turn_started(t, InputRange { from: 1, to: 1 }),
            NewEntry::thought(t, "plan"),
            NewEntry::assistant_message(t, "Let me write."),
            call(t, "c1"),
            NewEntry::permission_request(t, request),
            NewEntry::permission_decision(t, decision),
            NewEntry::tool_result(t, "c1".into(), "written"),
            NewEntry::assistant_message(t, "Done."),
            NewEntry::turn_ended(t, TurnStatus::Completed, None),
        ]);
        let msgs = openai(&log, &Options::default());
        check::openai(&msgs).expect("valid for OpenAI");
        assert_eq!(
            msgs,
            vec![
                json!({"role": "user", "content": "hi"}),
                json!({"role": "assistant", "content": "Let me write.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "write_file", "arguments": "{\"path\":\"a\"}"}}
                ]}),
                json!({"role": "tool", "tool_call_id": "c1", "content":
                    "[permission requested for write file; options: Allow once (allow_once)]\n\
                     [permission for write file: Allow once (allow_once), decided by policy]\nwritten"}),
                json!({"role": "assistant", "content": "Done."}),
            ]
        );
        let req = anthropic(&log, &Options::default());
        check::anthropic(&req).expect("valid for Anthropic");
        assert_eq!(req["messages"].as_array().map(Vec::len), Some(4));
        assert_eq!(req["messages"][1]["content"][1]["type"], "tool_use");
        assert_eq!(
            req["messages"][1]["content"][1]["input"],
            json!({"path": "a"})
        );
        assert_eq!(req["messages"][2]["content"][0]["tool_use_id"], "c1");
        let with = Options {
            include_thoughts: true,
            ..Options::default()
        };
        assert_eq!(
            openai(&log, &with)[1]["content"],
            "<thinking>plan</thinking>\nLet me write."
        );
    }

    /// Text produced while a call is open goes after its result; a second
    /// call while the first is open joins its assistant message.
    #[test]
    fn output_during_an_open_call_waits_for_its_result() {
        let t = TurnId::new();
        let log = log(vec![
            NewEntry::user_message("go"),
            NewEntry::turn_started(t, InputRange { from: 1, to: 1 }),
            call(t, "a"),
            call(t, "b"),
            NewEntry::tool_result(t, "a".into(), "A"),
            NewEntry::assistant_message(t, "meanwhile"),
            NewEntry::system_message(t, "plan: x"),
            call(t, "c"),
            NewEntry::tool_result(t, "b".into(), "B"),
            NewEntry::tool_result(t, "c".into(), "C"),
            NewEntry::turn_ended(t, TurnStatus::Completed, None),
        ]);
        let msgs = openai(&log, &Options::default());
        check::openai(&msgs).expect("valid for OpenAI");
        let roles: Vec<&str> = msgs.iter().filter_map(|m| m["role"].as_str()).collect();
        assert_eq!(
            roles,
            [
                "user",
                "assistant",
                "tool",
                "tool",
                "assistant",
                "system",
                "assistant",
                "tool"
            ]
        );
        assert_eq!(msgs[4]["content"], "meanwhile");
        check::anthropic(&anthropic(&log, &Options::default())).expect("valid for Anthropic");
    }

    /// The running turn is left out unless asked for; then its open call
    /// gets a placeholder result. A range keeps pairs valid.
    #[test]
    fn running_turns_and_ranges() {
        let t1 = TurnId::new();
        let t2 = TurnId::new();
        let log = log(vec![
            NewEntry::user_message("one"),
            NewEntry::turn_started(t1, InputRange { from: 1, to: 1 }),
            call(t1, "x"),
            NewEntry::tool_result(t1, "x".into(), "X"),
            NewEntry::turn_ended(t1, TurnStatus::Completed, None),
            NewEntry::user_message("two"),
            NewEntry::turn_started(t2, InputRange { from: 6, to: 6 }),
            NewEntry::assistant_message(t2, "so far"),
            call(t2, "x"),
        ]);
        let without = openai(&log, &Options::default());
        check::openai(&without).expect("valid");
        assert_eq!(without.len(), 4, "{without:?}");
        assert_eq!(without[3], json!({"role": "user", "content": "two"}));
        let with = Options {
            include_running: true,
            ..Options::default()
        };
        let msgs = openai(&log, &with);
        check::openai(&msgs).expect("valid");
        assert_eq!(msgs[4]["tool_calls"][0]["id"], "x_2", "ids stay unique");
        assert_eq!(msgs[5]["content"], NO_RESULT);
        check::anthropic(&anthropic(&log, &with)).expect("valid");
        for (after, upto) in [(0, 3), (3, 9), (2, 4), (4, 8)] {
            let opts = Options {
                after,
                upto: Some(upto),
                include_running: true,
                ..Options::default()
            };
            check::openai(&openai(&log, &opts)).unwrap_or_else(|e| panic!("{after}..{upto}: {e}"));
            check::anthropic(&anthropic(&log, &opts))
                .unwrap_or_else(|e| panic!("{after}..{upto}: {e}"));
        }
    }

    /// A permission request still waiting when its turn ended, closed by a
    /// decision stored after the call's closing result (as earlier
    /// versions stored it): the export puts both notes inside that result.
    #[test]
    fn a_request_closed_by_the_turns_end_is_inside_the_closing_result() {
        let t = TurnId::new();
        let request = PermissionInfo::request(Some("c1".into()), Some("run".into()), Vec::new());
        let decision = request.decision(None, "turn_end");
        let log = log(vec![
            NewEntry::user_message("go"),
            NewEntry::turn_started(t, InputRange { from: 1, to: 1 }),
            call(t, "c1"),
            NewEntry::permission_request(t, request),
            NewEntry::tool_closed(t, "c1".into(), TurnStatus::Cancelled, Some("user")),
            NewEntry::permission_decision(t, decision),
            NewEntry::turn_ended(t, TurnStatus::Cancelled, Some("user".into())),
        ]);
        let msgs = openai(&log, &Options::default());
        check::openai(&msgs).expect("valid for OpenAI");
        assert_eq!(msgs.len(), 3, "{msgs:#?}");
        let text = msgs[2]["content"].as_str().unwrap_or_default();
        assert!(
            text.contains("permission requested for run")
                && text.contains("cancelled, decided by turn_end")
                && text.ends_with("the turn ended cancelled (user)"),
            "{text}"
        );
        let req = anthropic(&log, &Options::default());
        check::anthropic(&req).expect("valid for Anthropic");
        assert_eq!(req["messages"][2]["content"][0]["is_error"], true);
    }

    /// The checks reject what the APIs reject.
    #[test]
    fn the_checks_reject_broken_transcripts() {
        let call = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        let result = json!({"role": "tool", "tool_call_id": "c", "content": "r"});
        let note = json!({"role": "system", "content": "n"});
        assert!(check::openai(&[call.clone(), result.clone()]).is_ok());
        assert!(check::openai(&[call.clone(), note.clone(), result.clone()]).is_err());
        assert!(check::openai(std::slice::from_ref(&call)).is_err());
        assert!(check::openai(std::slice::from_ref(&result)).is_err());
        assert!(check::openai(&[json!({"role": "robot", "content": "x"})]).is_err());

        let user = |c: Value| json!({"role": "user", "content": c});
        let asst = |c: Value| json!({"role": "assistant", "content": c});
        let use_c = json!([{"type": "tool_use", "id": "c", "name": "f", "input": {}}]);
        let res_c = json!({"type": "tool_result", "tool_use_id": "c", "content": "r"});
        let ok = json!({"messages": [user(json!("hi")), asst(use_c.clone()), user(json!([res_c.clone()]))]});
        assert!(check::anthropic(&ok).is_ok());
        for bad in [
            json!({"messages": [asst(json!("hi"))]}),
            json!({"messages": [user(json!("a")), user(json!("b"))]}),
            json!({"messages": [user(json!("hi")), asst(use_c.clone())]}),
            json!({"messages": [user(json!("hi")), asst(use_c.clone()),
                user(json!([{"type": "text", "text": "x"}, res_c.clone()]))]}),
            json!({"messages": [user(json!("hi")), asst(use_c.clone()), user(json!("no result"))]}),
            json!({"messages": [user(json!([res_c.clone()]))]}),
            json!({"messages": [{"role": "system", "content": "s"}]}),
        ] {
            assert!(check::anthropic(&bad).is_err(), "accepted {bad}");
        }
    }
}
