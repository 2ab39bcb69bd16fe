//! The README's "A 60-second tour", run against its own text: every command
//! of the section's `sh` block runs through `sh` (with curl) against a real
//! `baton serve`, and every answer is checked against the shape the README
//! shows under it — the keys it names and the values it spells out (ids,
//! times and elided `…` values aside), the entry types in order, and the
//! stream's events. A change of the API or of the text that makes them
//! disagree fails here.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::{Client, PATIENCE};
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// Keys whose values differ from run to run: only their presence is checked.
const VARYING: &[&str] = &[
    "id",
    "turn_id",
    "tool_use_id",
    "tool_call_id",
    "request_id",
    "created_at",
    "started_at",
    "ended_at",
    "until",
    "pending_until",
    "node",
];

/// One command of the tour and the comment lines right under it.
#[derive(Debug)]
struct Step {
    command: String,
    answer: Vec<String>,
}

/// The tour's `sh` block, as steps. A comment right under a command (no
/// blank line between) is its answer; other comments are prose.
fn tour() -> Vec<Step> {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("## A 60-second tour")
        .nth(1)
        .expect("the README has the tour");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the tour has an sh block");
    let mut steps: Vec<Step> = Vec::new();
    let mut in_answer = false;
    let mut continued = false;
    for line in block.lines() {
        if continued {
            let step = steps.last_mut().unwrap();
            step.command.push('\n');
            step.command.push_str(line);
            continued = line.ends_with('\\');
            continue;
        }
        if line.trim().is_empty() {
            in_answer = false;
        } else if let Some(comment) = line.strip_prefix('#') {
            if in_answer {
                let text = comment.strip_prefix(' ').unwrap_or(comment);
                steps.last_mut().unwrap().answer.push(text.to_owned());
            }
        } else {
            steps.push(Step {
                command: line.to_owned(),
                answer: Vec::new(),
            });
            in_answer = true;
            continued = line.ends_with('\\');
        }
    }
    assert!(steps.len() >= 10, "the tour has its commands: {steps:#?}");
    steps
}

/// What an expected JSON text names: a key with the value it spells out,
/// or only the key (a nested value, or one elided with `…`).
#[derive(Debug, PartialEq)]
enum Expect {
    Key(String),
    Pair(String, Value),
}

/// Reads the `"key": value` pairs of a JSON text with `…` elisions.
fn expectations(text: &str) -> Vec<Expect> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let read_string = |start: usize| -> (String, usize) {
        let mut j = start + 1;
        while j < chars.len() && chars[j] != '"' {
            if chars[j] == '\\' {
                j += 1;
            }
            j += 1;
        }
        let raw: String = chars[start..=j.min(chars.len() - 1)].iter().collect();
        (raw, j + 1)
    };
    while i < chars.len() {
        if chars[i] != '"' {
            i += 1;
            continue;
        }
        let (raw, next) = read_string(i);
        i = next;
        let mut k = i;
        while k < chars.len() && chars[k] == ' ' {
            k += 1;
        }
        if k >= chars.len() || chars[k] != ':' {
            continue;
        }
        let key: String = serde_json::from_str(&raw).unwrap_or_default();
        k += 1;
        while k < chars.len() && chars[k] == ' ' {
            k += 1;
        }
        let Some(&c) = chars.get(k) else {
            out.push(Expect::Key(key));
            break;
        };
        if c == '"' {
            let (raw, next) = read_string(k);
            i = next;
            match serde_json::from_str::<Value>(&raw) {
                Ok(v) if !raw.contains('…') && !VARYING.contains(&key.as_str()) => {
                    out.push(Expect::Pair(key, v))
                }
                _ => out.push(Expect::Key(key)),
            }
        } else if c == '-' || c.is_ascii_digit() || c.is_ascii_alphabetic() {
            let end = (k..chars.len())
                .find(|&j| {
                    !(chars[j] == '-' || chars[j] == '.' || chars[j].is_ascii_alphanumeric())
                })
                .unwrap_or(chars.len());
            let raw: String = chars[k..end].iter().collect();
            i = end;
            match serde_json::from_str::<Value>(&raw) {
                Ok(v) if !VARYING.contains(&key.as_str()) => out.push(Expect::Pair(key, v)),
                _ => out.push(Expect::Key(key)),
            }
        } else {
            out.push(Expect::Key(key));
            i = k;
        }
    }
    out
}

/// Every key with its value anywhere in `v`.
fn pairs<'a>(v: &'a Value, out: &mut Vec<(&'a str, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                out.push((k, x));
                pairs(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| pairs(x, out)),
        _ => {}
    }
}

/// Whether `actual` has everything `expected` names; the first miss if not.
fn missing(expected: &[Expect], actual: &Value) -> Option<String> {
    let mut all = Vec::new();
    pairs(actual, &mut all);
    for e in expected {
        let found = match e {
            Expect::Key(k) => all.iter().any(|(ak, _)| ak == k),
            Expect::Pair(k, v) => all.iter().any(|(ak, av)| ak == k && *av == v),
        };
        if !found {
            return Some(format!("{e:?}"));
        }
    }
    None
}

/// One event of a stream's text.
#[derive(Debug)]
struct Event {
    name: String,
    id: String,
    data: Value,
}

fn events(text: &str) -> Vec<Event> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut ev = Event {
                name: String::new(),
                id: String::new(),
                data: Value::Null,
            };
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev.name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data = serde_json::from_str(v.trim()).unwrap_or(Value::Null);
                }
            }
            (!ev.name.is_empty()).then_some(ev)
        })
        .collect()
}

/// `event: NAME / id: N / data: {…}` as name, id and what the data names.
fn expected_event(line: &str) -> (String, Option<String>, Vec<Expect>) {
    let mut name = String::new();
    let mut id = None;
    let mut data = Vec::new();
    for part in line.split(" / ") {
        if let Some(v) = part.strip_prefix("event: ") {
            name = v.trim().to_owned();
        } else if let Some(v) = part.strip_prefix("id: ") {
            id = Some(v.trim().to_owned());
        } else if let Some(v) = part.strip_prefix("data: ") {
            data = expectations(v);
        }
    }
    // How a reply is cut into deltas depends on timing (a loaded machine
    // may send several words at once): only their keys are compared.
    if name == "delta" {
        data = data
            .into_iter()
            .map(|e| match e {
                Expect::Pair(k, _) => Expect::Key(k),
                key => key,
            })
            .collect();
    }
    (name, id, data)
}

/// A stream opened by the tour: its output so far.
struct Stream {
    child: tokio::process::Child,
    out: Arc<Mutex<String>>,
}

async fn wait_no_running(c: &Client) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, v) = c
            .send(c.req(Method::GET, "/v1/sessions?status=running&limit=10"))
            .await;
        if v["sessions"].as_array().is_some_and(|a| a.is_empty()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "turns still running: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn sh(command: &str, vars: &HashMap<String, String>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(vars)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

#[test]
fn the_tour_is_read_as_commands_and_answers() {
    let steps = tour();
    assert!(steps[0]
        .command
        .contains("curl -s -XPOST localhost:7700/v1/sessions"));
    assert!(steps[0].answer[0].starts_with("{\"id\""), "{:?}", steps[0]);
    assert!(steps[1].command.contains("# the id above"));
    let e = expectations(r#"{"a":"x","id":"9…","n":2,"o":{"b":true},"t":"y…"}"#);
    assert_eq!(
        e,
        vec![
            Expect::Pair("a".into(), "x".into()),
            Expect::Key("id".into()),
            Expect::Pair("n".into(), 2.into()),
            Expect::Key("o".into()),
            Expect::Pair("b".into(), true.into()),
            Expect::Key("t".into()),
        ]
    );
    let actual = serde_json::json!({"a": "x", "id": 1, "n": 2, "o": {"b": true}, "t": "z"});
    assert_eq!(missing(&e, &actual), None);
    let wrong = serde_json::json!({"a": "x", "id": 1, "n": 3, "o": {"b": true}, "t": "z"});
    assert!(missing(&e, &wrong).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tour_answers_as_the_readme_says() {
    let curl = std::process::Command::new("curl").arg("--version").output();
    assert!(
        curl.is_ok_and(|o| o.status.success()),
        "the tour runs its commands with curl, which is not installed"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_binary(&dir.path().join("baton.db"), &[]).await;
    let c = server.client.clone();
    let host = c.base.strip_prefix("http://").unwrap().to_owned();
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut last = Value::Null;
    let mut streams: Vec<Stream> = Vec::new();
    let mut checked = 0;
    for step in tour() {
        let command = step.command.replace("localhost:7700", &host);
        let line = command.trim();
        if let Some((var, _)) = line
            .split_once('=')
            .filter(|_| line.contains("# the id above"))
        {
            let id = last["id"]
                .as_str()
                .unwrap_or_else(|| panic!("no id above {line}: {last}"));
            vars.insert(var.to_owned(), id.to_owned());
            continue;
        }
        wait_no_running(&c).await;
        if let Some((var, _)) = line.split_once("=$(") {
            let out = sh(&format!("{command}\nprintf %s \"${var}\""), &vars)
                .output()
                .await
                .unwrap();
            let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(!value.is_empty() && !value.contains('{'), "{line}: {value}");
            vars.insert(var.to_owned(), value);
            continue;
        }
        if line.contains("/stream") {
            let command = line.trim_end_matches('&').trim();
            let mut child = sh(&format!("exec {command}"), &vars)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let out = Arc::new(Mutex::new(String::new()));
            let sink = out.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            streams.push(Stream { child, out });
        } else {
            let out = sh(&command, &vars).output().await.unwrap();
            assert!(out.status.success(), "{line}: {out:?}");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            last = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{line}: the answer is not JSON ({e}): {text}"));
        }
        // The answer's parts: JSON, a list of entry types, stream events.
        let json: String = step
            .answer
            .iter()
            .take_while(|l| !l.starts_with("event:") && !l.starts_with("and on the stream"))
            .filter(|l| l.starts_with(['{', '[', ' ', '"']))
            .cloned()
            .collect();
        if !json.is_empty() && !line.contains("/stream") {
            let expected = expectations(&json);
            assert!(!expected.is_empty(), "{line}: nothing read from {json}");
            if let Some(miss) = missing(&expected, &last) {
                panic!("{line}: the README shows {miss}, the answer is {last}");
            }
            checked += 1;
        }
        let listed: String = step
            .answer
            .iter()
            .filter(|l| l.contains(" · ") || l.ends_with(" ·"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        if !listed.is_empty() {
            let want: Vec<String> = listed
                .split('·')
                .map(|item| {
                    item.split(|ch: char| ch.is_whitespace() || ch == '(')
                        .find(|w| !w.is_empty())
                        .unwrap()
                        .to_owned()
                })
                .collect();
            let got: Vec<String> = last["entries"]
                .as_array()
                .unwrap_or_else(|| panic!("{line}: no entries in {last}"))
                .iter()
                .map(|e| e["type"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(got, want, "{line}: entry types");
            checked += 1;
        }
        for ev_line in step.answer.iter().filter(|l| l.starts_with("event:")) {
            let (name, id, data) = expected_event(ev_line);
            let stream = streams
                .last()
                .unwrap_or_else(|| panic!("{line}: an event with no stream open"));
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let text = stream.out.lock().unwrap().clone();
                let found = events(&text).iter().any(|e| {
                    e.name == name
                        && id.as_ref().is_none_or(|i| &e.id == i)
                        && missing(&data, &e.data).is_none()
                });
                if found {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{line}: no event like {ev_line:?} on the stream:\n{text}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} answers were checked");
    for mut s in streams {
        let _ = s.child.start_kill();
        let _ = s.child.wait().await;
    }
    server.terminate().await;
}
