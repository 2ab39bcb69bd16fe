//! `baton chat`: a terminal client. Lines you type are posted as messages;
//! the session's stream is followed and printed as it happens (deltas
//! inline, then each turn's end). `/cancel` cancels the running turn,
//! `/quit` leaves (the session stays).

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
    /// The busy policy for messages typed mid-turn.
    #[arg(long)]
    pub policy: Option<String>,
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
    eprintln!("session {session} — type a message; /cancel, /quit");

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
            text => {
                let mut body = json!({ "content": text });
                if let Some(p) = &args.policy {
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
                        if d["type"] != "started" {
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
