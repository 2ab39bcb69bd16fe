//! One chaos run: load, faults, quiescence, read-back, verdict.
//!
//! - **Load.** `clients` tasks post to `sessions` sessions (a tenth of them
//!   hot, taking half the traffic) under every policy, per message and per
//!   session; they retry a post with the same `Idempotency-Key` when it got
//!   no answer (also across a server's death, on another node) and at
//!   random after a success; they cancel (the current turn, or a turn that
//!   has ended: a stale cancel), delete sessions, and probe another owner's
//!   sessions. `readers` tasks open streams at random cursors, or resume
//!   where they left off with `Last-Event-ID`, and disconnect at random.
//! - **Faults** come from the seed: demo-agent directives (`/sleep`,
//!   `/fail`, `/hang`, `/stubborn`) and ACP peer directives (`/die`,
//!   `/hang`) in the posted messages, and, when the run started the servers,
//!   server `SIGKILL` and restart, `SIGTERM` during turns and restart, and a
//!   node cut off from PostgreSQL by its proxy.
//! - **End.** Every node is brought back, each message whose fate is unknown
//!   is retried with its key until it is answered, every session is brought
//!   to rest (hung turns cancelled), and every log and turn list is read
//!   back for the checker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde_json::{json, Value};

use crate::check::{check, Report};
use crate::client::{Api, Ops, Outcome};
use crate::figures::{Faults, Figures};
use crate::history::{Ack, History, MessageHistory, Probe, SessionHistory, StreamRead};
use crate::servers::{Node, Proxy};

/// Process-level faults a run may inject (they need the run to own the servers).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessFaults {
    pub sigkill: bool,
    pub sigterm: bool,
    pub cut: bool,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    pub clients: usize,
    pub sessions: usize,
    pub readers: usize,
    /// Stop once this many messages were acknowledged…
    pub messages: u64,
    /// … or after this long.
    pub duration: Duration,
    /// The mean pause between process faults.
    pub fault_every: Duration,
    pub process_faults: ProcessFaults,
    /// Demo-agent directives in posted messages.
    pub directives: bool,
    /// The ACP agent's name, if the servers run one: a fifth of the
    /// sessions use it, with its crash and hang directives.
    pub acp_agent: Option<String>,
    /// The second owner's token, for isolation probes.
    pub other_token: Option<String>,
    /// The store's name, for the figures.
    pub store: String,
}

/// The servers: URLs only, or processes the run owns.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// One per node on PostgreSQL; none on SQLite.
    pub proxies: Vec<Proxy>,
}

/// A session as the clients know it.
struct Slot {
    id: String,
    policy: String,
    agent: String,
    deleted: bool,
    messages: Vec<MessageHistory>,
    streams: Vec<StreamRead>,
    turns_seen: Vec<String>,
    /// The highest seq acknowledged: a stream cursor never beyond the log.
    last_acked: u64,
}

struct Shared {
    cfg: RunConfig,
    api: Api,
    slots: Mutex<Vec<Slot>>,
    stop: AtomicBool,
    acked: AtomicU64,
    faults: Faults,
    latencies_us: Mutex<Vec<u64>>,
    /// Messages whose every attempt went unanswered: (slot, message index,
    /// the body a retry must repeat exactly).
    unresolved: Mutex<Vec<(usize, usize, Value)>>,
    probes: Mutex<Vec<Probe>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const POLICIES: [&str; 5] = ["queue", "merge", "interrupt", "steer", "reject"];

/// Runs the load and the faults, brings everything to rest, reads it back
/// and checks it.
pub async fn run(
    cfg: RunConfig,
    urls: Vec<String>,
    token: Option<String>,
    cluster: Option<Arc<tokio::sync::Mutex<Cluster>>>,
) -> anyhow::Result<(Figures, History, Report)> {
    let started = Instant::now();
    let ops = Ops::default();
    let api = Api::new(urls, token, ops.clone())?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        api: api.clone(),
        slots: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        faults: Faults::default(),
        latencies_us: Mutex::new(Vec::new()),
        unresolved: Mutex::new(Vec::new()),
        probes: Mutex::new(Vec::new()),
    });
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    for i in 0..cfg.sessions {
        create_slot(&shared, &mut rng, i).await?;
    }

    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move { client(s, c).await }));
    }
    for r in 0..cfg.readers {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move { reader(s, r).await }));
    }
    let fault_task = cluster.clone().map(|c| {
        let s = shared.clone();
        tokio::spawn(async move { inject(s, c).await })
    });

    let deadline = Instant::now() + cfg.duration;
    while Instant::now() < deadline && shared.acked.load(Ordering::SeqCst) < cfg.messages {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shared.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.context("a client task panicked")??;
    }
    if let Some(t) = fault_task {
        t.await.context("the fault task panicked")??;
    }
    if let Some(c) = &cluster {
        let mut c = c.lock().await;
        for p in &c.proxies {
            p.heal();
        }
        for n in &mut c.nodes {
            if !n.is_up() {
                n.start().await?;
            }
        }
    }
    let load_secs = started.elapsed().as_secs_f64();

    resolve(&shared).await?;
    let not_quiesced = quiesce(&shared).await?;
    let history = read_back(&shared, &not_quiesced).await?;
    let report = check(&history);
    let latencies = std::mem::take(&mut *lock(&shared.latencies_us));
    let figures = Figures::new(
        &cfg,
        api.urls.len(),
        load_secs,
        &history,
        &report,
        ops.snapshot(),
        shared.faults.snapshot(),
        latencies,
        not_quiesced.len(),
    );
    Ok((figures, history, report))
}

async fn create_slot(shared: &Shared, rng: &mut fastrand::Rng, i: usize) -> anyhow::Result<usize> {
    let cfg = &shared.cfg;
    let policy = POLICIES[rng.usize(..4)].to_owned();
    let agent = match &cfg.acp_agent {
        Some(name) if i % 5 == 4 => name.clone(),
        _ => "demo".to_owned(),
    };
    let key = format!("create-{}-{i}-{}", cfg.seed, rng.u32(..));
    let body = json!({ "agent": agent, "policy": policy });
    for attempt in 0..100u64 {
        let node = rng.usize(..);
        match shared
            .api
            .call(
                "create",
                node,
                Method::POST,
                "/v1/sessions",
                Some(&body),
                Some(&key),
            )
            .await
        {
            Outcome::Answer {
                status: 200 | 201,
                body,
            } => {
                let id = body["id"]
                    .as_str()
                    .context("a created session has an id")?
                    .to_owned();
                let mut slots = lock(&shared.slots);
                slots.push(Slot {
                    id,
                    policy,
                    agent,
                    deleted: false,
                    messages: Vec::new(),
                    streams: Vec::new(),
                    turns_seen: Vec::new(),
                    last_acked: 0,
                });
                return Ok(slots.len() - 1);
            }
            Outcome::Answer { status, body } if status < 500 && status != 429 => {
                anyhow::bail!("creating a session: {status} {body}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50 * attempt.min(10))).await,
        }
    }
    anyhow::bail!("could not create a session")
}

/// Picks a live session: half the time one of the hot tenth.
fn pick(shared: &Shared, rng: &mut fastrand::Rng) -> Option<(usize, String, String, String)> {
    let slots = lock(&shared.slots);
    let live: Vec<usize> = (0..slots.len()).filter(|&i| !slots[i].deleted).collect();
    if live.is_empty() {
        return None;
    }
    let hot = (live.len() / 10).max(1);
    let i = if rng.bool() {
        live[rng.usize(..hot)]
    } else {
        live[rng.usize(..live.len())]
    };
    let s = &slots[i];
    Some((i, s.id.clone(), s.policy.clone(), s.agent.clone()))
}

async fn client(shared: Arc<Shared>, c: usize) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(shared.cfg.seed.wrapping_add(1 + c as u64));
    let mut n = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let Some((slot, id, policy, agent)) = pick(&shared, &mut rng) else {
            break;
        };
        let roll = rng.u32(..1000);
        match roll {
            0..=749 => {
                n += 1;
                post(&shared, &mut rng, c, n, slot, &id, &policy, &agent).await;
            }
            750..=829 => {
                let path = format!("/v1/sessions/{id}/cancel");
                shared
                    .api
                    .call("cancel", rng.usize(..), Method::POST, &path, None, None)
                    .await;
            }
            830..=879 => {
                // A stale cancel: a turn seen earlier, most likely ended.
                let turn = lock(&shared.slots)[slot].turns_seen.first().cloned();
                if let Some(turn) = turn {
                    let path = format!("/v1/sessions/{id}/cancel");
                    let body = json!({ "turn_id": turn });
                    shared
                        .api
                        .call(
                            "cancel_stale",
                            rng.usize(..),
                            Method::POST,
                            &path,
                            Some(&body),
                            None,
                        )
                        .await;
                }
            }
            880..=884 => delete(&shared, &mut rng, slot, &id).await?,
            885..=929 => probe_other_owner(&shared, &mut rng, &id).await,
            _ => {
                let path = format!("/v1/sessions/{id}");
                shared
                    .api
                    .call("get", rng.usize(..), Method::GET, &path, None, None)
                    .await;
            }
        }
    }
    Ok(())
}

/// A directive from the seed, and the fault class it stands for.
fn directive(
    rng: &mut fastrand::Rng,
    cfg: &RunConfig,
    agent: &str,
) -> (&'static str, Option<&'static str>) {
    let roll = rng.u32(..1000);
    if agent == "demo" {
        if !cfg.directives {
            return ("", None);
        }
        match roll {
            0..=29 => ("/sleep 150 ", Some("demo_sleep")),
            30..=49 => ("/fail ", Some("demo_fail")),
            50..=59 => ("/hang ", Some("demo_hang")),
            60..=63 => ("/stubborn ", Some("demo_stubborn")),
            _ => ("", None),
        }
    } else {
        match roll {
            0..=29 => ("/die ", Some("acp_crash")),
            30..=49 => ("/hang ", Some("acp_hang")),
            50..=99 => ("/slow 10 ", None),
            _ => ("", None),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn post(
    shared: &Shared,
    rng: &mut fastrand::Rng,
    c: usize,
    n: u64,
    slot: usize,
    id: &str,
    session_policy: &str,
    agent: &str,
) {
    let cfg = &shared.cfg;
    let explicit = rng.bool().then(|| POLICIES[rng.usize(..POLICIES.len())]);
    // `reject` is rare: it only tells a busy session to refuse.
    let explicit = match explicit {
        Some("reject") if rng.u32(..4) != 0 => Some("queue"),
        p => p,
    };
    let policy = explicit.unwrap_or(session_policy).to_owned();
    let (dir, fault) = directive(rng, cfg, agent);
    let content = format!("{dir}m {} {c} {n}", cfg.seed);
    let key = format!("k-{}-{c}-{n}", cfg.seed);
    let mut body = json!({ "content": content });
    if let Some(p) = explicit {
        body["policy"] = json!(p);
    }
    let index = {
        let mut slots = lock(&shared.slots);
        let s = &mut slots[slot];
        s.messages.push(MessageHistory {
            key: key.clone(),
            content: content.clone(),
            policy,
            acks: Vec::new(),
        });
        s.messages.len() - 1
    };
    let path = format!("/v1/sessions/{id}/messages");
    let mut answered = false;
    for attempt in 0..8u64 {
        let sent = Instant::now();
        let outcome = shared
            .api
            .call(
                "post",
                rng.usize(..),
                Method::POST,
                &path,
                Some(&body),
                Some(&key),
            )
            .await;
        match outcome {
            Outcome::Answer {
                status: status @ (200 | 201),
                body: answer,
            } => {
                answered = true;
                if status == 201 && attempt == 0 {
                    lock(&shared.latencies_us).push(sent.elapsed().as_micros() as u64);
                }
                if record_ack(shared, slot, index, status, &answer) == Some(1) {
                    if let Some(f) = fault {
                        shared.faults.count(f);
                    }
                }
                // A retry after a success must return the original.
                if rng.u32(..10) == 0 {
                    if let Outcome::Answer {
                        status: s @ (200 | 201),
                        body: again,
                    } = shared
                        .api
                        .call(
                            "post_retry",
                            rng.usize(..),
                            Method::POST,
                            &path,
                            Some(&body),
                            Some(&key),
                        )
                        .await
                    {
                        record_ack(shared, slot, index, s, &again);
                    }
                }
                break;
            }
            Outcome::Answer { status, .. } if status < 500 => {
                // Refused (busy, full, deleted, …): nothing stored, unless an
                // unanswered attempt before stored it; the end resolves that.
                answered = attempt == 0;
                break;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(20 + 80 * attempt)).await;
            }
        }
    }
    if !answered {
        lock(&shared.unresolved).push((slot, index, body));
    }
}

/// Records a `2xx` for a message; returns how many it has now.
fn record_ack(
    shared: &Shared,
    slot: usize,
    index: usize,
    status: u16,
    body: &Value,
) -> Option<usize> {
    let seq = body["entry"]["seq"].as_u64()?;
    let disposition = body["disposition"]["type"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let turn_id = body["disposition"]["turn_id"].as_str().map(str::to_owned);
    let mut slots = lock(&shared.slots);
    let s = &mut slots[slot];
    if let Some(t) = &turn_id {
        if !s.turns_seen.contains(t) {
            s.turns_seen.push(t.clone());
        }
    }
    s.last_acked = s.last_acked.max(seq);
    let m = &mut s.messages[index];
    m.acks.push(Ack {
        status,
        seq,
        disposition,
        turn_id,
    });
    if m.acks.len() == 1 {
        shared.acked.fetch_add(1, Ordering::SeqCst);
    }
    Some(m.acks.len())
}

async fn delete(
    shared: &Shared,
    rng: &mut fastrand::Rng,
    slot: usize,
    id: &str,
) -> anyhow::Result<()> {
    // Only cold sessions, and never the last few.
    {
        let slots = lock(&shared.slots);
        let live = slots.iter().filter(|s| !s.deleted).count();
        if slot < (live / 10).max(1) || live < 4 {
            return Ok(());
        }
    }
    // A DELETE that got no answer may have been carried out: it is tried
    // again (a second delete of a deleted session is `404`) until answered.
    let path = format!("/v1/sessions/{id}");
    let mut gone = false;
    let mut confirmed = false;
    for attempt in 0..50u64 {
        match shared
            .api
            .call("delete", rng.usize(..), Method::DELETE, &path, None, None)
            .await
        {
            Outcome::Answer { status: 204, .. } => {
                gone = true;
                confirmed = true;
                break;
            }
            // Deleted by another client, or by an unanswered attempt.
            Outcome::Answer { status: 404, .. } => {
                gone = true;
                break;
            }
            Outcome::Answer { status, .. } if status < 500 => break,
            _ => {
                // Unknown: if it never gets an answer, the session is no
                // longer checked rather than wrongly counted as lost.
                gone = true;
                tokio::time::sleep(Duration::from_millis(50 + 50 * attempt.min(10))).await;
            }
        }
    }
    if !gone {
        return Ok(());
    }
    lock(&shared.slots)[slot].deleted = true;
    if confirmed {
        shared.faults.count("session_deleted");
        // An unavailable node says nothing about the session: ask another.
        for _ in 0..50 {
            match shared
                .api
                .call("get_deleted", rng.usize(..), Method::GET, &path, None, None)
                .await
                .status()
            {
                Some(503) | None => tokio::time::sleep(Duration::from_millis(100)).await,
                Some(got) => {
                    lock(&shared.probes).push(Probe {
                        what: format!("GET deleted session {id}"),
                        expected: 404,
                        got,
                    });
                    break;
                }
            }
        }
    }
    let i = lock(&shared.slots).len();
    create_slot(shared, rng, i).await?;
    Ok(())
}

async fn probe_other_owner(shared: &Shared, rng: &mut fastrand::Rng, id: &str) {
    let Some(token) = &shared.cfg.other_token else {
        return;
    };
    let other = shared.api.as_owner(Some(token.clone()));
    let (what, method, path, body) = match rng.u32(..3) {
        0 => ("GET", Method::GET, format!("/v1/sessions/{id}"), None),
        1 => (
            "POST message to",
            Method::POST,
            format!("/v1/sessions/{id}/messages"),
            Some(json!({ "content": "not yours" })),
        ),
        _ => (
            "cancel",
            Method::POST,
            format!("/v1/sessions/{id}/cancel"),
            None,
        ),
    };
    let outcome = other
        .call(
            "other_owner",
            rng.usize(..),
            method,
            &path,
            body.as_ref(),
            None,
        )
        .await;
    if let Some(got) = outcome.status() {
        // 503 while a node is down says nothing about isolation.
        if got != 503 {
            lock(&shared.probes).push(Probe {
                what: format!("{what} another owner's session {id}"),
                expected: 404,
                got,
            });
        }
    }
}

async fn reader(shared: Arc<Shared>, r: usize) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(shared.cfg.seed.wrapping_add(10_000 + r as u64));
    let mut resume: Option<(usize, String, u64)> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        let (slot, id, after) = match resume.take() {
            Some(r) if rng.u32(..3) != 0 => r,
            _ => {
                let Some((slot, id, _, _)) = pick(&shared, &mut rng) else {
                    break;
                };
                let last = lock(&shared.slots)[slot].last_acked;
                (slot, id, rng.u64(..=last))
            }
        };
        let hold = Duration::from_millis(rng.u64(100..1500));
        let Some(read) = shared
            .api
            .read_stream(rng.usize(..), &id, after, hold)
            .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let last_seen = read
            .events
            .iter()
            .rev()
            .find_map(|e| match e {
                crate::history::StreamEvent::Entry(e) => Some(e.seq),
                _ => None,
            })
            .unwrap_or(after);
        if after > 0 && last_seen >= after {
            shared.faults.count("stream_resumed");
        }
        lock(&shared.slots)[slot].streams.push(read);
        resume = Some((slot, id, last_seen));
    }
    Ok(())
}

/// Process faults, one at a time, from the seed.
async fn inject(
    shared: Arc<Shared>,
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
) -> anyhow::Result<()> {
    let cfg = &shared.cfg;
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0x5eed_fa17);
    let mut kinds = Vec::new();
    if cfg.process_faults.sigkill {
        kinds.push("sigkill");
    }
    if cfg.process_faults.sigterm {
        kinds.push("sigterm");
    }
    if cfg.process_faults.cut {
        kinds.push("cut_from_database");
    }
    if kinds.is_empty() {
        return Ok(());
    }
    let every = cfg.fault_every.as_millis() as u64;
    loop {
        let pause = Duration::from_millis(every / 2 + rng.u64(..=every));
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let kind = kinds[rng.usize(..kinds.len())];
        let mut c = cluster.lock().await;
        let i = rng.usize(..c.nodes.len());
        match kind {
            "sigkill" => {
                c.nodes[i].kill().await?;
                tokio::time::sleep(Duration::from_millis(rng.u64(..500))).await;
                c.nodes[i].start().await?;
            }
            "sigterm" => {
                c.nodes[i].terminate(Duration::from_secs(15)).await?;
                c.nodes[i].start().await?;
            }
            _ => {
                let Some(p) = c.proxies.get(i) else { continue };
                p.cut();
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
                p.heal();
            }
        }
        shared.faults.count(kind);
    }
}

/// Retries every message whose fate is unknown, with its key, until it is
/// answered: `200` (it was stored), `201` (it is stored now) or a refusal.
async fn resolve(shared: &Shared) -> anyhow::Result<()> {
    let pending = std::mem::take(&mut *lock(&shared.unresolved));
    for (slot, index, body) in pending {
        let (id, deleted, key) = {
            let slots = lock(&shared.slots);
            let s = &slots[slot];
            (s.id.clone(), s.deleted, s.messages[index].key.clone())
        };
        if deleted {
            continue;
        }
        let path = format!("/v1/sessions/{id}/messages");
        let mut done = false;
        for attempt in 0..100u64 {
            match shared
                .api
                .call(
                    "post_resolve",
                    attempt as usize,
                    Method::POST,
                    &path,
                    Some(&body),
                    Some(&key),
                )
                .await
            {
                Outcome::Answer {
                    status: status @ (200 | 201),
                    body: answer,
                } => {
                    record_ack(shared, slot, index, status, &answer);
                    done = true;
                    break;
                }
                Outcome::Answer { status, .. } if status < 500 => {
                    done = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        anyhow::ensure!(done, "message {key} never got an answer after the run");
    }
    Ok(())
}

/// Waits until every live session is idle with nothing queued, cancelling
/// turns that hang. Returns the sessions that never came to rest.
async fn quiesce(shared: &Shared) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = lock(&shared.slots)
        .iter()
        .filter(|s| !s.deleted)
        .map(|s| s.id.clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut left = ids;
    let mut polls = 0usize;
    while !left.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for id in left {
            let path = format!("/v1/sessions/{id}");
            match shared
                .api
                .call("quiesce", polls, Method::GET, &path, None, None)
                .await
            {
                Outcome::Answer { status: 200, body } => {
                    if body["status"] == "idle" && body["queued"] == 0 {
                        continue;
                    }
                    // Hung turns (`/hang`, `/stubborn`) end only when cancelled.
                    if polls % 10 == 9 {
                        let path = format!("/v1/sessions/{id}/cancel");
                        shared
                            .api
                            .call("quiesce_cancel", polls, Method::POST, &path, None, None)
                            .await;
                    }
                    still.push(id);
                }
                Outcome::Answer { status: 404, .. } => {}
                _ => still.push(id),
            }
        }
        left = still;
        polls += 1;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(left)
}

async fn read_back(shared: &Shared, not_quiesced: &[String]) -> anyhow::Result<History> {
    let slots = std::mem::take(&mut *lock(&shared.slots));
    let mut history = History {
        sessions: Vec::new(),
        probes: std::mem::take(&mut *lock(&shared.probes)),
    };
    for (i, s) in slots.into_iter().enumerate() {
        let mut h = SessionHistory {
            id: s.id.clone(),
            deleted: s.deleted,
            quiesced: !not_quiesced.contains(&s.id),
            messages: s.messages,
            streams: s.streams,
            ..Default::default()
        };
        if !s.deleted {
            match shared.api.read_back(i, &s.id).await? {
                Some((log, turns)) => {
                    h.log = log;
                    h.turns = turns;
                }
                None => {
                    // Gone without a delete: everything acknowledged is lost.
                    history.probes.push(Probe {
                        what: format!("session {} read back", s.id),
                        expected: 200,
                        got: 404,
                    });
                }
            }
        }
        history.sessions.push(h);
    }
    Ok(history)
}

/// The final pass over a deployment after other traffic (bad input): every
/// session of each owner is brought to rest and read back, each log is
/// checked (no client history: order, turns, consumption, leaks), and each
/// session is probed as every other owner (`404`).
pub async fn verify(
    urls: Vec<String>,
    tokens: Vec<Option<String>>,
) -> anyhow::Result<(History, Report)> {
    let ops = Ops::default();
    let mut history = History::default();
    let mut owned: Vec<(usize, String)> = Vec::new();
    for (o, token) in tokens.iter().enumerate() {
        let api = Api::new(urls.clone(), token.clone(), ops.clone())?;
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/sessions?limit=1000&cursor={c}"),
                None => "/v1/sessions?limit=1000".to_owned(),
            };
            let body = match api.call("list", 0, Method::GET, &path, None, None).await {
                Outcome::Answer { status: 200, body } => body,
                other => anyhow::bail!("listing sessions: {other:?}"),
            };
            for s in body["sessions"].as_array().into_iter().flatten() {
                if let Some(id) = s["id"].as_str() {
                    owned.push((o, id.to_owned()));
                }
            }
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
    }
    for (o, id) in &owned {
        let api = Api::new(urls.clone(), tokens[*o].clone(), ops.clone())?;
        let mut quiesced = false;
        let mut debounce_until = None;
        for polls in 0..300u32 {
            let path = format!("/v1/sessions/{id}");
            if let Outcome::Answer { status: 200, body } =
                api.call("quiesce", 0, Method::GET, &path, None, None).await
            {
                if body["status"] == "idle" && body["queued"] == 0 {
                    quiesced = true;
                    break;
                }
                if let Some(until) = waiting_for_debounce(&body) {
                    debounce_until = Some(until);
                    break;
                }
            }
            if polls % 10 == 9 {
                let path = format!("/v1/sessions/{id}/cancel");
                api.call("quiesce_cancel", 0, Method::POST, &path, None, None)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (log, turns) = api
            .read_back(0, id)
            .await?
            .with_context(|| format!("session {id} vanished"))?;
        history.sessions.push(SessionHistory {
            id: id.clone(),
            quiesced,
            debounce_until: debounce_until.clone(),
            log,
            turns,
            ..Default::default()
        });
        for (other, token) in tokens.iter().enumerate() {
            if other == *o {
                continue;
            }
            let api = api.as_owner(token.clone());
            let path = format!("/v1/sessions/{id}");
            if let Some(got) = api
                .call("other_owner", 0, Method::GET, &path, None, None)
                .await
                .status()
            {
                history.probes.push(Probe {
                    what: format!("GET another owner's session {id}"),
                    expected: 404,
                    got,
                });
            }
        }
        if !quiesced && debounce_until.is_none() {
            history.probes.push(Probe {
                what: format!("session {id} at rest"),
                expected: 200,
                got: 0,
            });
        }
    }
    let report = check(&history);
    Ok((history, report))
}

/// An idle session whose messages wait for a debounce window that closes
/// well after now (a window may be set up to an hour) is at rest as its
/// policy says: its turn is due later, not stuck. A window already due, or
/// due within two seconds, is not: the sweeper must start its turn.
fn waiting_for_debounce(session: &serde_json::Value) -> Option<String> {
    if session["status"] != "idle" || session["queued"].as_u64().unwrap_or(0) == 0 {
        return None;
    }
    let until = session["pending_until"].as_str()?;
    let due = baton_core::Timestamp::parse(until)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let now = i64::try_from(now.as_micros()).ok()?;
    (due.micros() > now + 2_000_000).then(|| until.to_owned())
}

#[cfg(test)]
mod tests {
    use super::waiting_for_debounce;
    use serde_json::json;

    #[test]
    fn only_a_window_closing_later_is_waiting_by_design() {
        let later =
            json!({"status": "idle", "queued": 2, "pending_until": "2999-01-01T00:00:00.000000Z"});
        assert_eq!(
            waiting_for_debounce(&later).as_deref(),
            Some("2999-01-01T00:00:00.000000Z")
        );
        // Overdue: the sweeper should have started its turn.
        let overdue =
            json!({"status": "idle", "queued": 2, "pending_until": "2020-01-01T00:00:00.000000Z"});
        assert_eq!(waiting_for_debounce(&overdue), None);
        let running = json!({"status": "running", "queued": 2, "pending_until": "2999-01-01T00:00:00.000000Z"});
        assert_eq!(waiting_for_debounce(&running), None);
        let empty =
            json!({"status": "idle", "queued": 0, "pending_until": "2999-01-01T00:00:00.000000Z"});
        assert_eq!(waiting_for_debounce(&empty), None);
        let no_window = json!({"status": "idle", "queued": 1});
        assert_eq!(waiting_for_debounce(&no_window), None);
    }
}
