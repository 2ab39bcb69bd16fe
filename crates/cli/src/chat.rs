//! `baton chat`: a terminal client. Lines you type are posted as messages;
//! the session's stream is followed and printed as it happens (deltas
//! inline, then each turn's end). `/steer TEXT` hands TEXT to the running
//! turn (policy `steer`), `/cancel` cancels the running turn, `/quit`
//! leaves (the session stays). A permission request the agent
//! waits on is shown with its options, numbered; `/answer N` (or
//! `/answer OPTION_ID`) answers the oldest one still waiting.

use std::io::Write;

use anyhow::{bail, Context};
use clap::Args;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `baton chat` flags.
#[derive(Clone, Debug, Args)]
pub struct ChatArgs {
    /// The server.
    #[arg(long, env = "BATON_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// A bearer token, if the server requires one.
    #[arg(long, env = "BATON_TOKEN")]
    pub token: Option<String>,
    /// Continue this session instead of creating one.
    #[arg(long)]
    pub session: Option<String>,
    /// The agent for a new session.
    #[arg(long)]
    pub agent: Option<String>,
    /// The busy policy for messages typed mid-turn (`steer` hands each to
    /// the running turn, as `/steer TEXT` does for one).
    #[arg(long)]
    pub policy: Option<String>,
    /// What the agent's permission requests get in a new session: allow,
    /// deny or ask (you answer them here).
    #[arg(long)]
    pub permission: Option<String>,
}

/// The text of a `/steer TEXT` line: `None` if the line is not one,
/// `Some(None)` for a `/steer` without text.
fn steer_text(line: &str) -> Option<Option<&str>> {
    let rest = line.strip_prefix("/steer")?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let text = rest.trim();
    Some((!text.is_empty()).then_some(text))
}

/// A permission request the agent waits on: its id and its options' ids.
type Waiting = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

/// How a permission request is shown: what it is for, then its options.
fn show_request(p: &Value) -> String {
    let title = p["title"].as_str().unwrap_or("a tool call");
    let call = p["tool_call_id"].as_str().unwrap_or("?");
    let mut out = format!("\n[permission asked: {title} (tool call {call})]");
    for (n, o) in p["options"].as_array().into_iter().flatten().enumerate() {
        out.push_str(&format!(
            "\n  {}) {} [{}]",
            n + 1,
            o["name"].as_str().unwrap_or("?"),
            o["kind"].as_str().unwrap_or("?")
        ));
    }
    out.push_str("\n  answer with /answer N");
    out
}

/// How a decision is shown.
fn show_decision(entry: &Value) -> String {
    let p = &entry["permission"];
    let by = p["decided_by"].as_str().unwrap_or("?");
    match p["option_id"].as_str() {
        Some(option) => format!("[permission: {option} (by {by})]"),
        None => format!(
            "[permission cancelled (by {by}){}]",
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
    let waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
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

fn request(
    client: &reqwest::Client,
    token: &Option<String>,
    method: reqwest::Method,
    url: String,
) -> reqwest::RequestBuilder {
    let req = client.request(method, url);
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

async fn json_or_error(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.context("reading the server's answer")?;
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"]["message"].as_str().unwrap_or("error")
        );
    }
    Ok(body)
}

/// Runs the chat until `/quit` or end of input.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/').to_owned();
    let session = match &args.session {
        Some(id) => id.clone(),
        None => {
            let mut body = json!({});
            if let Some(a) = &args.agent {
                body["agent"] = json!(a);
            }
            if let Some(p) = &args.permission {
                body["permission"] = json!(p);
            }
            let resp = request(
                &client,
                &args.token,
                reqwest::Method::POST,
                format!("{base}/v1/sessions"),
            )
            .json(&body)
            .send()
            .await
            .with_context(|| format!("connecting to {base}"))?;
            let s = json_or_error(resp).await?;
            s["id"]
                .as_str()
                .context("the session has no id")?
                .to_owned()
        }
    };
    eprintln!("session {session} — type a message; /steer TEXT, /cancel, /answer N, /quit");

    let stream_url = format!("{base}/v1/sessions/{session}/stream");
    let follow = request(&client, &args.token, reqwest::Method::GET, stream_url)
        .send()
        .await
        .context("opening the stream")?;
    if !follow.status().is_success() {
        json_or_error(follow).await?;
        bail!("could not open the stream");
    }
    // The turn this client last saw running: `/cancel` names it, so a cancel
    // typed just as it ended never cancels the turn after it.
    let running: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let seen = running.clone();
    let waiting: Waiting = Default::default();
    let asked = waiting.clone();
    tokio::spawn(async move {
        let mut events = follow.bytes_stream().eventsource();
        let mut out = std::io::stdout();
        while let Some(Ok(ev)) = events.next().await {
            let Ok(data) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            if ev.event == "entry" {
                let mut r = seen.lock().unwrap_or_else(|p| p.into_inner());
                match data["type"].as_str() {
                    Some("turn_started") => *r = data["turn_id"].as_str().map(str::to_owned),
                    Some("turn_ended") if *r == data["turn_id"].as_str().map(str::to_owned) => {
                        *r = None
                    }
                    _ => {}
                }
            }
            match ev.event.as_str() {
                "delta" => {
                    let _ = write!(out, "{}", data["text"].as_str().unwrap_or(""));
                }
                "entry" => match data["type"].as_str() {
                    Some("message") if data["role"] == "assistant" => {
                        let _ = writeln!(out);
                    }
                    Some("permission_request") => {
                        let p = &data["permission"];
                        let options = p["options"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|o| o["option_id"].as_str().map(str::to_owned))
                            .collect();
                        if let Some(id) = p["request_id"].as_str() {
                            asked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((id.to_owned(), options));
                        }
                        let _ = writeln!(out, "{}", show_request(p));
                    }
                    Some("permission_decision") => {
                        let id = data["permission"]["request_id"].as_str();
                        asked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|(r, _)| Some(r.as_str()) != id);
                        let _ = writeln!(out, "{}", show_decision(&data));
                    }
                    Some("turn_ended") if data["status"] != "completed" => {
                        let _ = writeln!(
                            out,
                            "\n[turn {}: {}]",
                            data["status"].as_str().unwrap_or("?"),
                            data["reason"].as_str().unwrap_or("")
                        );
                    }
                    _ => {}
                },
                _ => {}
            }
            let _ = out.flush();
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading input")? {
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" => break,
            "/cancel" => {
                let turn = running.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(turn) = turn else {
                    eprintln!("[no turn is running]");
                    continue;
                };
                let url = format!("{base}/v1/sessions/{session}/cancel");
                let resp = request(&client, &args.token, reqwest::Method::POST, url)
                    .json(&json!({ "turn_id": turn }))
                    .send()
                    .await?;
                let v = json_or_error(resp).await?;
                if v["cancelled"] == true {
                    eprintln!("[cancelling…]");
                } else {
                    eprintln!("[that turn had already ended; nothing cancelled]");
                }
            }
            answer if answer == "/answer" || answer.starts_with("/answer ") => {
                let arg = answer.trim_start_matches("/answer").trim();
                let (request_id, option) = match pick(&waiting, arg) {
                    Ok(choice) => choice,
                    Err(why) => {
                        eprintln!("[{why}]");
                        continue;
                    }
                };
                let url = format!("{base}/v1/sessions/{session}/permissions/{request_id}");
                let resp = request(&client, &args.token, reqwest::Method::POST, url)
                    .json(&json!({ "option_id": option }))
                    .send()
                    .await?;
                // The decision is shown when it comes back on the stream.
                if let Err(e) = json_or_error(resp).await {
                    eprintln!("[{e}]");
                }
            }
            text => {
                let (text, policy) = match steer_text(text) {
                    Some(Some(steered)) => (steered, Some("steer")),
                    Some(None) => {
                        eprintln!("[/steer TEXT hands TEXT to the running turn]");
                        continue;
                    }
                    None => (text, args.policy.as_deref()),
                };
                let mut body = json!({ "content": text });
                if let Some(p) = policy {
                    body["policy"] = json!(p);
                }
                let url = format!("{base}/v1/sessions/{session}/messages");
                let resp = request(&client, &args.token, reqwest::Method::POST, url)
                    .json(&body)
                    .send()
                    .await?;
                match json_or_error(resp).await {
                    Ok(v) => {
                        let d = &v["disposition"];
                        if d["type"] == "steered" {
                            eprintln!("[steered into the running turn]");
                        } else if d["type"] != "started" {
                            eprintln!(
                                "[{}{}]",
                                d["type"].as_str().unwrap_or("?"),
                                d["position"]
                                    .as_u64()
                                    .map(|p| format!(" #{p}"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                    Err(e) => eprintln!("[{e}]"),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_names_an_option_by_number_or_id() {
        let waiting: Waiting = Default::default();
        assert!(pick(&waiting, "1").is_err(), "nothing waits");
        waiting.lock().unwrap_or_else(|p| p.into_inner()).extend([
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
    fn steer_lines_carry_their_text() {
        assert_eq!(
            steer_text("/steer  also check the tests "),
            Some(Some("also check the tests"))
        );
        assert_eq!(steer_text("/steer"), Some(None));
        assert_eq!(steer_text("/steer   "), Some(None));
        assert_eq!(steer_text("/steering wheel"), None);
        assert_eq!(steer_text("hello"), None);
    }
}
