//! Following a session's stream, across server restarts.
//!
//! One task reads the session's SSE stream and hands its entries and
//! deltas on. When the stream breaks or ends (the server stopped), it says
//! so once, then reconnects with `Last-Event-ID` set to the last entry it
//! handed on, so the entries stored meanwhile (the end of a turn the
//! restart cut short, say) arrive in order, none twice (I9).

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use super::api::Api;

/// What the stream brings.
#[derive(Debug)]
pub enum Event {
    /// A stored entry, in `seq` order.
    Entry(Value),
    /// A piece of a reply being streamed.
    Delta { turn: String, text: String },
    /// The stream broke; reconnecting (said once per outage, with why).
    Reconnecting(String),
    /// Connected again, resumed after this entry.
    Resumed(u64),
    /// The session cannot be followed any more; the task has stopped.
    Gone(String),
}

/// Follows `session` from after entry `after`. With `give_up`, an outage
/// longer than that ends the stream (`Gone`); without, it never does.
pub fn follow(
    api: Api,
    session: String,
    mut after: u64,
    give_up: Option<Duration>,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut down_since: Option<tokio::time::Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let mut req = api.request(
                reqwest::Method::GET,
                &format!("/v1/sessions/{session}/stream"),
            );
            if after > 0 {
                req = req.header("Last-Event-ID", after.to_string());
            }
            let why = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    if down_since.take().is_some() && tx.send(Event::Resumed(after)).is_err() {
                        return;
                    }
                    pause = Duration::from_millis(100);
                    let mut events = resp.bytes_stream().eventsource();
                    let mut why = "the server closed the stream".to_owned();
                    while let Some(ev) = events.next().await {
                        let ev = match ev {
                            Ok(ev) => ev,
                            Err(_) => {
                                why = "the connection to the server broke".to_owned();
                                break;
                            }
                        };
                        let Ok(data) = serde_json::from_str::<Value>(&ev.data) else {
                            continue;
                        };
                        let out = match ev.event.as_str() {
                            "entry" => match data["seq"].as_u64() {
                                Some(seq) if seq > after => {
                                    after = seq;
                                    Event::Entry(data)
                                }
                                _ => continue,
                            },
                            "delta" => Event::Delta {
                                turn: data["turn_id"].as_str().unwrap_or_default().to_owned(),
                                text: data["text"].as_str().unwrap_or_default().to_owned(),
                            },
                            _ => continue,
                        };
                        if tx.send(out).is_err() {
                            return;
                        }
                    }
                    why
                }
                Ok(resp) if resp.status().is_client_error() && resp.status() != 429 => {
                    let status = resp.status();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    let message = body["error"]["message"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_owned();
                    let _ = tx.send(Event::Gone(format!(
                        "the session's stream was refused ({status}): {message}"
                    )));
                    return;
                }
                Ok(resp) => format!("the server answered {}", resp.status()),
                Err(e) => api.unreachable(&e).to_string(),
            };
            let since = *down_since.get_or_insert_with(|| {
                let _ = tx.send(Event::Reconnecting(why.clone()));
                tokio::time::Instant::now()
            });
            if give_up.is_some_and(|limit| since.elapsed() > limit) {
                let _ = tx.send(Event::Gone(format!("gave up reconnecting: {why}")));
                return;
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    });
    rx
}
