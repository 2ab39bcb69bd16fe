//! The built-in demo agent: answers each input message with
//! `echo: <content>`, streamed one delta per word, which the engine stores as
//! one assistant message (several messages: one line each).
//!
//! Directives at the start of a message make it misbehave on purpose, for
//! tests and demos (the echo leaves the directive out):
//! - `/sleep MS` — the turn takes at least MS milliseconds, streaming slowly;
//! - `/fail` — streams one delta, then the turn fails and nothing is stored;
//! - `/hang` — never finishes until cancelled (honours cancel);
//! - `/stubborn` — never finishes and ignores cancel: only a forced stop ends it;
//! - `/big N` — streams a word of N bytes (to meet the output cap);
//! - `/ask [N]` — calls a pretend tool after asking permission (options
//!   `allow`, `allow-always`, `reject`, `reject-always`, or with N, `option-1`
//!   … `option-N`), answered by the session's permission policy (the demo
//!   agent's own is `ask`: the user answers), and reports the chosen option
//!   at the end of its reply (`(permission: <option>)` or
//!   `(permission: cancelled)`);
//! - `/tool` — thinks (a thought chunk), says it will look the text up,
//!   calls a `lookup` tool, gets its result, then echoes: text, tool call,
//!   result, text, in that order.
//!
//! It takes input mid-turn: a steered message is echoed on its own line at
//! the agent's next word boundary (the line it interrupted goes on below).

use std::time::Duration;

use async_trait::async_trait;
use baton_core::permission::policy_choice;
use baton_core::turn::{AgentOutput, StopReason};
use baton_core::{PermissionInfo, PermissionOptionInfo, PermissionPolicy, ToolInfo};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, Instant};

use crate::{AgentDriver, AgentError, AgentEvent, SteerInput, TurnControl, TurnHandle, TurnInput};

/// The demo agent.
#[derive(Clone, Debug)]
pub struct DemoAgent {
    /// Pause between two deltas (the pace of a plain echo).
    pub word_delay: Duration,
    /// What its permission requests (`/ask`) get when the session sets no
    /// policy: `ask`, so a demo shows the user's round trip.
    pub permission: PermissionPolicy,
}

impl Default for DemoAgent {
    fn default() -> Self {
        Self {
            word_delay: Duration::from_millis(20),
            permission: PermissionPolicy::Ask,
        }
    }
}

/// Long enough to outlast any test or demo, short enough not to overflow `Instant`.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Directive {
    None,
    Sleep(Duration),
    Fail,
    Hang,
    Stubborn,
    /// Streams one word of this many bytes (for output caps).
    Big(usize),
    /// Asks permission for a pretend tool call, offering this many options
    /// (zero: the four standard ones).
    Ask(usize),
    /// Text, a tool call and its result, then the echo.
    Tool,
}

/// Splits a leading directive off `text`.
fn parse(text: &str) -> (Directive, &str) {
    let trimmed = text.trim_start();
    let (word, rest) = trimmed
        .split_once(char::is_whitespace)
        .unwrap_or((trimmed, ""));
    match word {
        "/fail" => (Directive::Fail, rest.trim_start()),
        "/hang" => (Directive::Hang, rest.trim_start()),
        "/stubborn" => (Directive::Stubborn, rest.trim_start()),
        "/tool" => (Directive::Tool, rest.trim_start()),
        "/ask" => {
            let rest = rest.trim_start();
            let (n, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            match n.parse::<usize>() {
                Ok(n) if n > 0 => (Directive::Ask(n), after.trim_start()),
                _ => (Directive::Ask(0), rest),
            }
        }
        "/big" => {
            let rest = rest.trim_start();
            let (n, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            match n.parse::<usize>() {
                Ok(n) => (Directive::Big(n), after.trim_start()),
                Err(_) => (Directive::None, text),
            }
        }
        "/sleep" => {
            let rest = rest.trim_start();
            let (ms, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            match ms.parse::<u64>() {
                Ok(ms) => (
                    Directive::Sleep(Duration::from_millis(ms)),
                    after.trim_start(),
                ),
                Err(_) => (Directive::None, text),
            }
        }
        _ => (Directive::None, text),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Run,
    Cancel,
    Kill,
}

struct Control {
    signal: watch::Sender<Signal>,
    /// Answers to permission requests: (request id, chosen option).
    answers: mpsc::UnboundedSender<(String, Option<String>)>,
    /// Steered messages handed to the turn.
    steer: mpsc::UnboundedSender<SteerInput>,
}

impl TurnControl for Control {
    fn steer(&self, input: SteerInput) {
        // The script is gone: the turn ended, and the input is the next
        // turn's.
        let _ = self.steer.send(input);
    }

    fn answer_permission(&self, request_id: &str, option_id: Option<String>) {
        let _ = self.answers.send((request_id.to_owned(), option_id));
    }

    fn cancel(&self) {
        self.signal.send_if_modified(|s| {
            let was_running = *s == Signal::Run;
            if was_running {
                *s = Signal::Cancel;
            }
            was_running
        });
    }

    fn force_stop(&self) {
        self.signal.send_replace(Signal::Kill);
    }
}

#[async_trait]
impl AgentDriver for DemoAgent {
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(crate::EVENT_CAPACITY);
        let (signal_tx, signal_rx) = watch::channel(Signal::Run);
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let (steer_tx, steer_rx) = mpsc::unbounded_channel();
        let policy = input.permission.unwrap_or(self.permission);
        let turn = Turn {
            tx,
            signal: signal_rx,
            answers: answers_rx,
            policy,
            steer: steer_rx,
            new_line: false,
        };
        tokio::spawn(run(self.word_delay, input, turn));
        Ok(TurnHandle {
            events: rx,
            control: Box::new(Control {
                signal: signal_tx,
                answers: answers_tx,
                steer: steer_tx,
            }),
        })
    }

    fn takes_mid_turn_input(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "demo", "word_delay_ms": self.word_delay.as_millis() as u64 })
    }
}

/// Why the turn's script stopped early.
enum Stop {
    Cancelled,
    Killed,
}

/// A running turn's channels.
struct Turn {
    tx: mpsc::Sender<AgentEvent>,
    signal: watch::Receiver<Signal>,
    answers: mpsc::UnboundedReceiver<(String, Option<String>)>,
    policy: PermissionPolicy,
    steer: mpsc::UnboundedReceiver<SteerInput>,
    /// A steered line interrupted the current one: its next word starts a
    /// new line.
    new_line: bool,
}

impl Turn {
    async fn send(&self, event: AgentEvent) -> Result<(), Stop> {
        self.tx.send(event).await.map_err(|_| Stop::Killed)
    }

    /// Takes steered input: says so, then echoes each message on its own line.
    async fn take(&mut self, input: SteerInput) -> Result<(), Stop> {
        self.send(AgentEvent::InputTaken(input.upto)).await?;
        for message in &input.messages {
            let (_, text) = parse(message);
            let line = format!("echo: {text}");
            for (i, word) in line.split_whitespace().enumerate() {
                let chunk = if i == 0 {
                    format!("\n{word}")
                } else {
                    format!(" {word}")
                };
                self.send(AgentEvent::Delta(chunk)).await?;
            }
        }
        self.new_line = true;
        Ok(())
    }

    /// Waits `d`, or less if a signal that applies arrives; steered input
    /// handed over meanwhile is taken at once (a pause is a word boundary).
    async fn pause(&mut self, d: Duration, stubborn: bool) -> Result<(), Stop> {
        let deadline = Instant::now() + d;
        let mut steer_open = true;
        loop {
            match *self.signal.borrow_and_update() {
                Signal::Kill => return Err(Stop::Killed),
                Signal::Cancel if !stubborn => return Err(Stop::Cancelled),
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                changed = self.signal.changed() => {
                    // The control was dropped: the engine moved on; stop quietly.
                    if changed.is_err() {
                        return Err(Stop::Killed);
                    }
                }
                input = self.steer.recv(), if steer_open => match input {
                    Some(input) => self.take(input).await?,
                    None => steer_open = false,
                },
            }
        }
    }
}

/// The options `/ask N` offers.
fn ask_options(n: usize) -> Vec<PermissionOptionInfo> {
    let option = |id: String, kind: &str| PermissionOptionInfo {
        name: id.replace('-', " "),
        option_id: id,
        kind: kind.to_owned(),
    };
    if n == 0 {
        return vec![
            option("allow".into(), "allow_once"),
            option("allow-always".into(), "allow_always"),
            option("reject".into(), "reject_once"),
            option("reject-always".into(), "reject_always"),
        ];
    }
    (1..=n)
        .map(|i| {
            let kind = if i % 2 == 1 {
                "allow_once"
            } else {
                "reject_once"
            };
            option(format!("option-{i}"), kind)
        })
        .collect()
}

/// Asks permission for pretend tool call `call` and returns the chosen
/// option (`None`: cancelled). The call and its result are stored around
/// the request and decision, like a real agent's.
async fn ask(turn: &mut Turn, call: String, options: usize) -> Result<Option<String>, Stop> {
    let send = |e| turn.tx.send(e);
    let tool = ToolInfo {
        id: call.clone(),
        name: Some("pretend tool".into()),
        arguments: None,
    };
    send(AgentEvent::Output(AgentOutput::ToolCall(tool)))
        .await
        .map_err(|_| Stop::Killed)?;
    let request = PermissionInfo::request(
        Some(call.clone()),
        Some("pretend tool".into()),
        ask_options(options),
    );
    let chosen = if turn.policy == PermissionPolicy::Ask {
        let id = request.request_id.clone();
        send(AgentEvent::AskPermission(request))
            .await
            .map_err(|_| Stop::Killed)?;
        loop {
            match *turn.signal.borrow_and_update() {
                Signal::Kill => return Err(Stop::Killed),
                Signal::Cancel => return Err(Stop::Cancelled),
                Signal::Run => {}
            }
            tokio::select! {
                answer = turn.answers.recv() => match answer {
                    Some((answered, option)) if answered == id => break option,
                    Some(_) => {}
                    None => return Err(Stop::Killed),
                },
                changed = turn.signal.changed() => if changed.is_err() {
                    return Err(Stop::Killed);
                },
            }
        }
    } else {
        let choice = policy_choice(turn.policy, &request.options).map(|o| o.option_id.clone());
        let decision = request.decision(choice.clone(), "policy");
        for out in [
            AgentOutput::PermissionRequest(request),
            AgentOutput::PermissionDecision(decision),
        ] {
            send(AgentEvent::Output(out))
                .await
                .map_err(|_| Stop::Killed)?;
        }
        choice
    };
    let result = match &chosen {
        Some(option) => format!("ran with permission: {option}"),
        None => "not run: permission cancelled".to_owned(),
    };
    send(AgentEvent::Output(AgentOutput::ToolResult {
        id: call,
        content: result,
    }))
    .await
    .map_err(|_| Stop::Killed)?;
    Ok(chosen)
}

/// `/tool`'s first half: a thought, a sentence, a `lookup` call of `text`
/// and its result (the pause between call and result is where a cancel or
/// a crash finds the call open).
async fn lookup(
    word_delay: Duration,
    input: &TurnInput,
    n: usize,
    text: &str,
    turn: &mut Turn,
) -> Result<(), Stop> {
    let id = format!(
        "lookup-{}-{n}",
        input.turn_id.to_string().get(..8).unwrap_or("0")
    );
    let lead = if n == 0 { "" } else { "\n" };
    let script = [
        AgentEvent::Thought(format!("The user wants {text:?} looked up.")),
        AgentEvent::Delta(format!("{lead}Let me look that up.")),
        AgentEvent::Output(AgentOutput::ToolCall(ToolInfo {
            id: id.clone(),
            name: Some("lookup".into()),
            arguments: Some(serde_json::json!({ "query": text })),
        })),
    ];
    for ev in script {
        if turn.tx.send(ev).await.is_err() {
            return Err(Stop::Killed);
        }
    }
    turn.pause(word_delay * 5, false).await?;
    let result = AgentEvent::Output(AgentOutput::ToolResult {
        id,
        content: format!("found: {text}"),
    });
    if turn.tx.send(result).await.is_err() {
        return Err(Stop::Killed);
    }
    Ok(())
}

async fn run(word_delay: Duration, input: TurnInput, mut turn: Turn) {
    let tx = turn.tx.clone();
    let last = match script(word_delay, &input, &mut turn).await {
        Ok(true) => AgentEvent::Stopped(StopReason::Completed),
        Ok(false) => AgentEvent::Stopped(StopReason::Failed(
            "the demo agent failed on purpose (/fail)".into(),
        )),
        Err(Stop::Cancelled) => AgentEvent::Stopped(StopReason::Cancelled),
        Err(Stop::Killed) => return,
    };
    let _ = tx.send(last).await;
}

/// Streams the echo, one delta per word and a line per message (the engine
/// stores the text it streamed as the reply); `Ok(false)` is a deliberate
/// failure.
async fn script(word_delay: Duration, input: &TurnInput, turn: &mut Turn) -> Result<bool, Stop> {
    for (n, message) in input.messages.iter().enumerate() {
        let (directive, text) = parse(message);
        let line = match directive {
            Directive::Big(bytes) => format!("echo: {}", "x".repeat(bytes)),
            Directive::Ask(options) => {
                let chosen = ask(turn, format!("demo-call-{}", n + 1), options).await?;
                let chosen = chosen.as_deref().unwrap_or("cancelled");
                format!("echo: {text} (permission: {chosen})")
            }
            _ => format!("echo: {text}"),
        };
        if directive == Directive::Tool {
            lookup(word_delay, input, n, text, turn).await?;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let started = Instant::now();
        let (delay, min_total) = match directive {
            Directive::Sleep(total) => (total / words.len().max(1) as u32, total),
            _ => (word_delay, Duration::ZERO),
        };
        for (i, word) in words.iter().enumerate() {
            let chunk = match (i, n) {
                (0, 0) => (*word).to_owned(),
                // After a tool result the echo starts a run of its own.
                (0, _) if directive == Directive::Tool => (*word).to_owned(),
                _ if i == 0 || turn.new_line => format!("\n{word}"),
                _ => format!(" {word}"),
            };
            turn.new_line = false;
            turn.send(AgentEvent::Delta(chunk)).await?;
            if directive == Directive::Fail {
                return Ok(false);
            }
            turn.pause(delay, directive == Directive::Stubborn).await?;
        }
        match directive {
            Directive::Hang => turn.pause(FOREVER, false).await?,
            Directive::Stubborn => turn.pause(FOREVER, true).await?,
            _ => {}
        }
        if let Some(rest) = min_total.checked_sub(started.elapsed()) {
            turn.pause(rest, false).await?;
        }
    }
    // Input handed over before the end is taken: the agent has not stopped.
    while let Ok(input) = turn.steer.try_recv() {
        turn.take(input).await?;
    }
    // Let a cancel that raced the last word win: nothing is stored then.
    sleep(Duration::ZERO).await;
    let signal = &turn.signal;
    if *signal.borrow() != Signal::Run {
        return Err(if *signal.borrow() == Signal::Kill {
            Stop::Killed
        } else {
            Stop::Cancelled
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{SessionId, TurnId};

    fn input(messages: &[&str]) -> TurnInput {
        TurnInput {
            session_id: SessionId::new(),
            turn_id: TurnId::new(),
            messages: messages.iter().map(|m| (*m).to_owned()).collect(),
            agent_session: None,
            fence: crate::Fence::open(),
            permission: None,
        }
    }

    async fn collect(handle: &mut TurnHandle) -> Vec<AgentEvent> {
        let mut out = Vec::new();
        while let Some(e) = handle.events.recv().await {
            out.push(e);
        }
        out
    }

    #[test]
    fn directives_parse_and_are_left_out() {
        assert_eq!(
            parse("/sleep 50 hi there"),
            (Directive::Sleep(Duration::from_millis(50)), "hi there")
        );
        assert_eq!(parse("/fail"), (Directive::Fail, ""));
        assert_eq!(parse("/sleep x"), (Directive::None, "/sleep x"));
        assert_eq!(parse("hello /hang"), (Directive::None, "hello /hang"));
    }

    #[tokio::test(start_paused = true)]
    async fn echoes_word_by_word_one_line_per_message() -> Result<(), AgentError> {
        let agent = DemoAgent::default();
        let mut h = agent.start(input(&["hi there", "/sleep 10 again"])).await?;
        let events = collect(&mut h).await;
        let deltas: String = events
            .iter()
            .filter_map(|e| match e {
                AgentEvent::Delta(d) => Some(d.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deltas, "echo: hi there\necho: again");
        assert_eq!(
            events.last(),
            Some(&AgentEvent::Stopped(StopReason::Completed))
        );
        assert!(
            events.iter().all(|e| !matches!(e, AgentEvent::Output(_))),
            "the reply is the text it streamed"
        );
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn hang_honours_cancel_and_stubborn_only_dies() -> Result<(), AgentError> {
        let agent = DemoAgent::default();
        let mut h = agent.start(input(&["/hang"])).await?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        h.control.cancel();
        let events = collect(&mut h).await;
        assert_eq!(
            events.last(),
            Some(&AgentEvent::Stopped(StopReason::Cancelled))
        );

        let mut h = agent.start(input(&["/stubborn"])).await?;
        h.control.cancel();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(matches!(h.events.try_recv(), Ok(AgentEvent::Delta(_))));
        assert!(
            h.events.try_recv().is_err(),
            "a stubborn agent ignores cancel"
        );
        h.control.force_stop();
        let events = collect(&mut h).await;
        assert!(events.iter().all(|e| matches!(e, AgentEvent::Delta(_))));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn tool_says_calls_gets_a_result_then_says_more() -> Result<(), AgentError> {
        let mut h = DemoAgent::default().start(input(&["/tool rust"])).await?;
        let events = collect(&mut h).await;
        let shape: Vec<String> = events
            .iter()
            .map(|e| match e {
                AgentEvent::Thought(_) => "thought".to_owned(),
                AgentEvent::Delta(d) => format!("text {}", d.trim()),
                AgentEvent::Output(AgentOutput::ToolCall(t)) => format!(
                    "call {} {}",
                    t.name.as_deref().unwrap_or(""),
                    t.arguments.clone().unwrap_or_default()
                ),
                AgentEvent::Output(AgentOutput::ToolResult { content, .. }) => {
                    format!("result {content}")
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "thought",
                "text Let me look that up.",
                "call lookup {\"query\":\"rust\"}",
                "result found: rust",
                "text echo:",
                "text rust",
                "Stopped(Completed)",
            ]
        );
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_steered_message_is_taken_at_the_next_word_on_its_own_line() -> Result<(), AgentError>
    {
        let agent = DemoAgent::default();
        assert!(agent.takes_mid_turn_input());
        let mut h = agent.start(input(&["/sleep 300 one two"])).await?;
        // "echo:" is out; the agent pauses 100 ms per word.
        assert_eq!(
            h.events.recv().await,
            Some(AgentEvent::Delta("echo:".into()))
        );
        h.control.steer(SteerInput {
            upto: 7,
            messages: vec!["/sleep 5 mind the tests".into(), "and docs".into()],
        });
        let events = collect(&mut h).await;
        assert_eq!(
            events.first(),
            Some(&AgentEvent::InputTaken(7)),
            "it says what it took before answering it"
        );
        let text: String = std::iter::once("echo:")
            .chain(events.iter().filter_map(|e| match e {
                AgentEvent::Delta(d) => Some(d.as_str()),
                _ => None,
            }))
            .collect();
        assert_eq!(
            text, "echo:\necho: mind the tests\necho: and docs\none two",
            "each steered message on its own line; the interrupted line goes on below"
        );
        assert_eq!(
            events.last(),
            Some(&AgentEvent::Stopped(StopReason::Completed))
        );
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn fail_streams_one_delta_and_stores_nothing() -> Result<(), AgentError> {
        let mut h = DemoAgent::default().start(input(&["/fail now"])).await?;
        let events = collect(&mut h).await;
        assert_eq!(events.len(), 2);
        assert!(matches!(
            events[1],
            AgentEvent::Stopped(StopReason::Failed(_))
        ));
        Ok(())
    }
}
