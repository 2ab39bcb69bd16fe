//! Several nodes on one PostgreSQL database (needs `DATABASE_URL`; each test
//! says so on stderr and returns when it is unset, unless
//! `BATON_REQUIRE_POSTGRES=1`): every invariant holds across nodes as on one.
//! Each test works in a schema of its own.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use baton_cli::{App, ServeConfig};
use baton_testkit::pg::PgSchema;
use common::{Client, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A schema of its own in the `DATABASE_URL` database, or `None` (the test
/// is skipped, which `BATON_REQUIRE_POSTGRES=1` refuses).
async fn database(test: &str) -> Option<PgSchema> {
    let url = baton_testkit::pg::database_url(test)?;
    Some(PgSchema::create(&url).await)
}

struct Node {
    client: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn node(url: &str) -> Node {
    node_with(url, |_| {}).await
}

async fn node_with(url: &str, tune: impl FnOnce(&mut ServeConfig)) -> Node {
    let mut cfg = ServeConfig::embedded("unused.db");
    cfg.database_url = Some(url.to_owned());
    cfg.db = None;
    cfg.demo_word_delay_ms = 1;
    cfg.queue_capacity = 10_000;
    cfg.lease_ms = 2_000;
    cfg.heartbeat_ms = 500;
    cfg.sweep_ms = 200;
    cfg.shutdown_grace_ms = 0;
    tune(&mut cfg);
    let app = App::build(&cfg).await.expect("building a node");
    let client = Client::new(format!("http://{}", app.addr()));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    Node { client, stop, task }
}

impl Node {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Checks a whole transcript: gapless seqs; turns never overlap; each turn's
/// input precedes it; nothing of a turn after its end; every user message
/// consumed exactly once, FIFO.
fn check_transcript(entries: &[Value]) {
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=entries.len() as u64).collect::<Vec<_>>(),
        "I1: gapless seqs"
    );
    let users: Vec<u64> = entries
        .iter()
        .filter(|e| e["role"] == "user")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let mut running: Option<String> = None;
    let mut ended: Vec<String> = Vec::new();
    let mut consumed: Vec<u64> = Vec::new();
    for e in entries {
        let turn = e["turn_id"].as_str().map(str::to_owned);
        if let Some(t) = &turn {
            assert!(
                !ended.contains(t),
                "I8: entry {} after its turn ended",
                e["seq"]
            );
        }
        match e["type"].as_str().unwrap() {
            "turn_started" => {
                assert!(
                    running.is_none(),
                    "I4: turn started at {} while another runs",
                    e["seq"]
                );
                running = turn;
                let (from, to) = (
                    e["input"]["from"].as_u64().unwrap(),
                    e["input"]["to"].as_u64().unwrap(),
                );
                assert!(to < e["seq"].as_u64().unwrap(), "I5: input after its turn");
                consumed.extend(users.iter().copied().filter(|s| (from..=to).contains(s)));
            }
            "turn_ended" => {
                assert_eq!(running, turn, "I7: end of a turn that is not running");
                ended.extend(turn);
                running = None;
            }
            _ if turn.is_some() => assert_eq!(running, turn, "I8: output outside its turn"),
            _ => {}
        }
    }
    assert!(running.is_none(), "I7: a turn never ended");
    assert_eq!(
        consumed, users,
        "I6: every user message consumed once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_sessions_without_breaking_order() {
    let Some(schema) = database("three_nodes_share_sessions_without_breaking_order").await else {
        return;
    };
    let url = schema.url().to_owned();
    let nodes = vec![node(&url).await, node(&url).await, node(&url).await];
    let clients: Vec<Client> = nodes.iter().map(|n| n.client.clone()).collect();
    let mut sessions = Vec::new();
    for i in 0..4 {
        let s = clients[i % 3].create_session(json!({})).await;
        sessions.push(s["id"].as_str().unwrap().to_owned());
    }
    // 4 sessions × 15 messages, each posted to a random node, all at once.
    let mut tasks = Vec::new();
    for (si, id) in sessions.iter().enumerate() {
        for m in 0..15 {
            let c = clients[fastrand::usize(0..3)].clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let content = format!("s{si} m{m}");
                let (status, v) = c
                    .post(&id, &content, None, Some(&content.replace(" ", "-")))
                    .await;
                assert_eq!(status, 201, "{v}");
                (id, content, v["entry"]["seq"].as_u64().unwrap())
            }));
        }
    }
    let mut acked: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for t in tasks {
        let (id, content, seq) = t.await.unwrap();
        acked.entry(id).or_default().push((seq, content));
    }
    for id in &sessions {
        clients[0].wait_idle(id).await;
        let entries = clients[fastrand::usize(0..3)].entries(id).await;
        check_transcript(&entries);
        let mut mine = acked.remove(id).unwrap();
        mine.sort();
        let users: Vec<(u64, String)> = entries
            .iter()
            .filter(|e| e["role"] == "user")
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(users, mine, "every acknowledged message once, at its seq");
        let replies: Vec<&str> = entries
            .iter()
            .filter(|e| e["role"] == "assistant")
            .map(|e| e["content"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = mine.iter().map(|(_, c)| format!("echo: {c}")).collect();
        assert_eq!(replies, expected, "one reply per message, FIFO");
        let turns = clients[1].turns(id).await;
        assert_eq!(turns.len(), 15);
        assert!(turns.iter().all(|t| t["status"] == "completed"));
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_follows_another_nodes_turn_and_resumes_on_a_third() {
    let Some(schema) = database("a_stream_follows_another_nodes_turn_and_resumes_on_a_third").await
    else {
        return;
    };
    let url = schema.url().to_owned();
    let (a, b, c) = (node(&url).await, node(&url).await, node(&url).await);
    // The turn runs on B: B's transaction started it and took the lease.
    let s = b
        .client
        .create_session(json!({"message": "/sleep 4000 one two three four five six"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let mut on_a = a.client.open_stream(&id, None).await;
    let mut seen: Vec<u64> = Vec::new();
    let mut deltas = 0;
    while deltas < 2 {
        let ev = on_a.next().await.expect("stream on A ended early");
        eprintln!("A got {ev:?}");
        match ev.event.as_str() {
            "entry" => seen.push(ev.id.parse().unwrap()),
            "delta" => deltas += 1,
            _ => {}
        }
    }
    drop(on_a);
    // Entries appended while nobody listens, on A and C.
    a.client.post(&id, "later from A", None, None).await;
    c.client.post(&id, "later from C", None, None).await;
    let last = *seen.last().unwrap();
    let mut on_c = c.client.open_stream(&id, Some(last)).await;
    let mut ended = 0;
    while ended < 3 {
        let ev = on_c.next().await.expect("stream on C ended early");
        if ev.event == "entry" {
            seen.push(ev.id.parse().unwrap());
            if ev.data["type"] == "turn_ended" {
                ended += 1;
            }
        }
    }
    assert_eq!(
        seen,
        (1..=*seen.last().unwrap()).collect::<Vec<_>>(),
        "no gap, no duplicate across nodes"
    );
    assert!(deltas >= 2, "live deltas of B's turn reached A");
    check_transcript(&a.client.entries(&id).await);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// The real binary on PostgreSQL, for SIGKILL.
async fn spawn_pg_binary(url: &str) -> (tokio::process::Child, Client) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            url,
            "--lease-ms",
            "1500",
            "--heartbeat-ms",
            "300",
            "--sweep-ms",
            "200",
            "--demo-word-delay-ms",
            "1",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = line.strip_prefix("listening on ").unwrap().to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, Client::new(addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_nodes_turn_ends_lost_and_its_queue_runs_elsewhere() {
    let Some(schema) = database("a_killed_nodes_turn_ends_lost_and_its_queue_runs_elsewhere").await
    else {
        return;
    };
    let url = schema.url().to_owned();
    let survivor = node(&url).await;
    let (mut doomed, doomed_client) = spawn_pg_binary(&url).await;
    let s = doomed_client
        .create_session(json!({"message": "/hang"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let hung = s["turn_id"].as_str().unwrap().to_owned();
    survivor
        .client
        .wait_session(&id, |s| s["status"] == "running")
        .await;
    // Wait until the doomed node really runs it (the turn is `running`).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while survivor.client.turns(&id).await[0]["status"] != "running" {
        assert!(tokio::time::Instant::now() < deadline, "the turn never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..3 {
        let (status, v) = survivor
            .client
            .post(&id, &format!("queued {i}"), None, None)
            .await;
        assert_eq!(v["disposition"]["type"], "queued", "{status} {v}");
    }
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    let killed_at = tokio::time::Instant::now();
    // Within lease expiry plus a sweep, the survivor ends it `lost` and runs the queue.
    survivor.client.wait_idle(&id).await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(20),
        "takeover took {:?}",
        killed_at.elapsed()
    );
    let turns = survivor.client.turns(&id).await;
    assert_eq!(turns[0]["id"], hung.as_str());
    assert_eq!(turns[0]["status"], "lost", "{turns:#?}");
    assert_eq!(turns.len(), 4);
    assert!(
        turns[1..].iter().all(|t| t["status"] == "completed"),
        "{turns:#?}"
    );
    check_transcript(&survivor.client.entries(&id).await);
    survivor.shutdown().await;
}

/// A TCP proxy in front of PostgreSQL that a test can cut: cutting closes
/// every open connection and refuses new ones until restored.
struct Proxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    /// While true, nothing is forwarded either way but every connection
    /// stays open: a database that stops answering without refusing.
    freeze: tokio::sync::watch::Sender<bool>,
}

async fn proxy_to(target: std::net::SocketAddr) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    let (freeze, freeze_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut cut_rx = cut_rx.clone();
            let mut freeze_rx = freeze_rx.clone();
            if *cut_rx.borrow() {
                drop(inbound);
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let frozen = tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                    _ = cut_rx.wait_for(|c| *c) => false,
                    _ = freeze_rx.wait_for(|f| *f) => true,
                };
                if frozen {
                    // Hold both ends open, silent, until cut.
                    let _ = cut_rx.wait_for(|c| *c).await.map(|_| ());
                }
            });
        }
    });
    Proxy { port, cut, freeze }
}

/// Two nodes on the database at `url`, one of them (`isolated`) through a
/// proxy, with a `/hang` turn running on the isolated one and two messages
/// queued behind it (`acked`: their seqs).
struct Split {
    proxy: Proxy,
    survivor: Node,
    isolated: Node,
    id: String,
    hung: String,
    acked: Vec<u64>,
}

async fn split(url: &str) -> Split {
    let parsed = reqwest::Url::parse(url).unwrap();
    let target: std::net::SocketAddr = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port().unwrap_or(5432)
    )
    .to_socket_addrs_first();
    let proxy = proxy_to(target).await;
    let mut via_proxy = parsed.clone();
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();

    let survivor = node(url).await;
    let isolated = node(via_proxy.as_str()).await;
    let s = isolated
        .client
        .create_session(json!({"message": "/hang"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let hung = s["turn_id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while survivor.client.turns(&id).await[0]["status"] != "running" {
        assert!(tokio::time::Instant::now() < deadline, "the turn never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut acked = Vec::new();
    for i in 0..2 {
        let (status, v) = survivor
            .client
            .post(&id, &format!("queued {i}"), None, None)
            .await;
        assert_eq!(status, 201, "{v}");
        acked.push(v["entry"]["seq"].as_u64().unwrap());
    }
    Split {
        proxy,
        survivor,
        isolated,
        id,
        hung,
        acked,
    }
}

/// Waits until `node` runs no session actor (it stopped its turn).
async fn until_no_actors(node: &Node) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = node
            .client
            .send(node.client.req(reqwest::Method::GET, "/metrics"))
            .await;
        let text = metrics.as_str().unwrap_or_default().to_owned();
        if text
            .lines()
            .any(|l| l.starts_with("baton_session_actors ") && l.ends_with(" 0"))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the isolated node kept its turn: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_loses_the_database_fences_itself_and_answers_503() {
    let Some(schema) =
        database("a_node_that_loses_the_database_fences_itself_and_answers_503").await
    else {
        return;
    };
    let Split {
        proxy,
        survivor,
        isolated,
        id,
        hung,
        mut acked,
    } = split(schema.url()).await;

    proxy.cut.send_replace(true);
    let cut_at = tokio::time::Instant::now();
    // The isolated node answers 503 while it cannot reach the store.
    let (status, v) = isolated.client.post(&id, "while cut off", None, None).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "unavailable");
    let (status, _) = isolated
        .client
        .send(isolated.client.req(reqwest::Method::GET, "/healthz"))
        .await;
    assert_eq!(status, 503);
    // It stops its turn by itself (self-fencing), database or not.
    until_no_actors(&isolated).await;
    // The survivor takes over: the turn ends `lost`, the queue runs there.
    survivor.client.wait_idle(&id).await;
    assert!(cut_at.elapsed() < Duration::from_secs(20));
    let turns = survivor.client.turns(&id).await;
    assert_eq!(turns[0]["id"], hung.as_str());
    assert_eq!(turns[0]["status"], "lost", "{turns:#?}");
    assert!(
        turns[1..].iter().all(|t| t["status"] == "completed"),
        "{turns:#?}"
    );

    // Back online, the isolated node serves again; nothing acknowledged was lost.
    proxy.cut.send_replace(false);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, _) = isolated
            .client
            .send(isolated.client.req(reqwest::Method::GET, "/healthz"))
            .await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = isolated.client.post(&id, "back again", None, None).await;
    assert_eq!(status, 201, "{v}");
    acked.push(v["entry"]["seq"].as_u64().unwrap());
    survivor.client.wait_idle(&id).await;
    let entries = isolated.client.entries(&id).await;
    check_transcript(&entries);
    for seq in acked {
        assert_eq!(
            entries[seq as usize - 1]["role"],
            "user",
            "acknowledged message {seq} is there"
        );
    }
    assert!(
        !entries.iter().any(|e| e["content"] == "while cut off"),
        "a 503 stored nothing"
    );
    survivor.shutdown().await;
    isolated.shutdown().await;
}

trait FirstAddr {
    fn to_socket_addrs_first(&self) -> std::net::SocketAddr;
}

impl FirstAddr for String {
    fn to_socket_addrs_first(&self) -> std::net::SocketAddr {
        use std::net::ToSocketAddrs;
        self.to_socket_addrs().unwrap().next().unwrap()
    }
}

/// SIGTERM on node A while it runs a turn with two messages queued: the
/// turn completes on A within the grace, and the queued turns start on node
/// B as soon as A lets go — not at B's next sweep (a minute away) nor after
/// a lease expiry (half a minute away) — and none is counted as a vanished
/// worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_node_finishes_its_turn_and_hands_the_queue_over_at_once() {
    let Some(schema) =
        database("a_stopping_node_finishes_its_turn_and_hands_the_queue_over_at_once").await
    else {
        return;
    };
    let url = schema.url().to_owned();
    let slow = |cfg: &mut ServeConfig| {
        cfg.lease_ms = 40_000;
        cfg.heartbeat_ms = 1_000;
        cfg.sweep_ms = 60_000;
        cfg.shutdown_grace_ms = 20_000;
    };
    let a = node_with(&url, slow).await;
    let b = node_with(&url, slow).await;
    let s = a
        .client
        .create_session(json!({"message": "/sleep 1500 on a"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    for m in ["queued one", "queued two"] {
        let (status, v) = a.client.post(&id, m, None, None).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["disposition"]["type"], "queued", "{v}");
    }
    let stopped = tokio::spawn(a.shutdown());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let turns = loop {
        let turns = b.client.turns(&id).await;
        if turns.len() == 3 && turns.iter().all(|t| t["ended_at"].is_string()) {
            break turns;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never ran on B: {turns:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stopped.await.unwrap();
    for t in &turns {
        assert_eq!(t["status"], "completed", "{t}");
    }
    let entries = b.client.entries(&id).await;
    check_transcript(&entries);
    let replies: Vec<&str> = entries
        .iter()
        .filter(|e| e["role"] == "assistant")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        replies,
        vec!["echo: on a", "echo: queued one", "echo: queued two"]
    );
    b.shutdown().await;
}

/// A database that stops answering (not refusing): the node behind it stops
/// its turn within its lease (its store calls and renewals are cut where
/// self-fencing is due, and its connections time out), and the other node
/// recovers the session — the turn ends `lost`, the queue runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_database_goes_silent_stops_within_its_lease() {
    let Some(schema) = database("a_node_whose_database_goes_silent_stops_within_its_lease").await
    else {
        return;
    };
    let Split {
        proxy,
        survivor,
        isolated,
        id,
        ..
    } = split(schema.url()).await;
    proxy.freeze.send_replace(true);
    // The isolated node's actor stops by itself although nothing refused it.
    until_no_actors(&isolated).await;
    survivor.client.wait_idle(&id).await;
    let turns = survivor.client.turns(&id).await;
    assert_eq!(turns[0]["status"], "lost", "{turns:#?}");
    assert!(
        turns[1..].iter().all(|t| t["status"] == "completed"),
        "{turns:#?}"
    );
    check_transcript(&survivor.client.entries(&id).await);
    proxy.cut.send_replace(true);
    survivor.shutdown().await;
}

/// Twenty clients answer one permission request at once, each with another
/// option, half of them on the node running the turn and half on the other:
/// exactly one decision is stored and reaches the agent, every other answer
/// is `409` naming it. An answer posted to the other node reaches the turn
/// through the bus: heartbeats (which would also catch it up from the
/// store) are set far apart, past the test's patience.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_on_two_nodes_store_one_decision() {
    let Some(schema) = database("concurrent_answers_on_two_nodes_store_one_decision").await else {
        return;
    };
    let url = schema.url().to_owned();
    let slow_heartbeat = |cfg: &mut ServeConfig| {
        cfg.lease_ms = 180_000;
        cfg.heartbeat_ms = 60_000;
    };
    let (a, b) = (
        node_with(&url, slow_heartbeat).await,
        node_with(&url, slow_heartbeat).await,
    );
    // B's transaction starts each turn, so B runs it.
    let ask = |id: &str| {
        let c = a.client.clone();
        let id = id.to_owned();
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let (_, v) = c
                    .send(c.req(
                        reqwest::Method::GET,
                        &format!("/v1/sessions/{id}/permissions"),
                    ))
                    .await;
                if let Some(r) = v["permissions"].as_array().and_then(|a| a.first()) {
                    return r["permission"]["request_id"].as_str().unwrap().to_owned();
                }
                assert!(tokio::time::Instant::now() < deadline, "no request came");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let answer = |c: &Client, id: &str, rid: &str, option: &str| {
        let rb = c
            .req(
                reqwest::Method::POST,
                &format!("/v1/sessions/{id}/permissions/{rid}"),
            )
            .json(&json!({ "option_id": option }));
        let c = c.clone();
        async move { c.send(rb).await }
    };

    let s = b
        .client
        .create_session(json!({"message": "/ask 20 race"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let rid = ask(&id).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (1..=20)
        .map(|i| {
            let c = if i % 2 == 0 { &a.client } else { &b.client }.clone();
            let (id, rid, barrier) = (id.clone(), rid.clone(), barrier.clone());
            let option = format!("option-{i}");
            let go = answer(&c, &id, &rid, &option);
            tokio::spawn(async move {
                barrier.wait().await;
                (option, go.await)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let winners: Vec<String> = results
        .iter()
        .filter(|(_, (s, _))| *s == reqwest::StatusCode::CREATED)
        .map(|(o, _)| o.clone())
        .collect();
    assert_eq!(winners.len(), 1, "{results:#?}");
    let winner = &winners[0];
    for (option, (status, body)) in &results {
        if option != winner {
            assert_eq!(*status, reqwest::StatusCode::CONFLICT, "{option}: {body}");
            assert_eq!(body["error"]["code"], "permission_closed");
            assert_eq!(body["error"]["permission"]["option_id"], winner.as_str());
        }
    }
    a.client.wait_idle(&id).await;
    let entries = a.client.entries(&id).await;
    check_transcript(&entries);
    let decisions: Vec<&Value> = entries
        .iter()
        .filter(|e| e["type"] == "permission_decision")
        .collect();
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0]["permission"]["option_id"], winner.as_str());
    let reply = entries.iter().rfind(|e| e["role"] == "assistant").unwrap();
    assert_eq!(
        reply["content"],
        format!("echo: race (permission: {winner})")
    );

    // One answer, on the node not running the turn.
    let s = b
        .client
        .create_session(json!({"message": "/ask far"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let rid = ask(&id).await;
    let (status, v) = answer(&a.client, &id, &rid, "allow").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
    let done = a.client.wait_idle(&id).await;
    assert_eq!(done["status"], "idle");
    let entries = a.client.entries(&id).await;
    let reply = entries.iter().rfind(|e| e["role"] == "assistant").unwrap();
    assert_eq!(reply["content"], "echo: far (permission: allow)");
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// The lines of every assistant reply of a turn.
fn lines_of(entries: &[Value], turn: &Value) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e["turn_id"] == *turn && e["role"] == "assistant")
        .flat_map(|e| {
            e["content"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Steering across nodes: a message steered on B to a turn running on A is
/// stored by B, announced over `LISTEN/NOTIFY`, read from the database by
/// A's worker and handed to its agent: one turn, which echoes it and whose
/// record lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_steer_posted_on_another_node_joins_the_running_turn() {
    let Some(schema) = database("a_steer_posted_on_another_node_joins_the_running_turn").await
    else {
        return;
    };
    let url = schema.url().to_owned();
    // Renewals far apart: the steer must travel on the bus, not wait for
    // one. (A long lease also bounds statements, migrations included, at a
    // third of it.)
    let tune = |cfg: &mut ServeConfig| {
        cfg.lease_ms = 20_000;
        cfg.heartbeat_ms = 6_000;
    };
    let (a, b) = (node_with(&url, tune).await, node_with(&url, tune).await);
    let s = a
        .client
        .create_session(json!({"message": "/sleep 3000 one two three"}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let mut on_a = a.client.open_stream(&id, None).await;
    on_a.until_delta().await;
    let (status, v) = b
        .client
        .post(&id, "a word from node b", Some("steer"), None)
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["disposition"]["type"], "steered", "{v}");
    assert_eq!(v["disposition"]["turn_id"], s["turn_id"]);
    let steered = v["entry"]["seq"].as_u64().unwrap();
    b.client.wait_idle(&id).await;
    let entries = b.client.entries(&id).await;
    let turns = b.client.turns(&id).await;
    assert_eq!(turns.len(), 1, "{turns:#?}");
    assert_eq!(turns[0]["status"], "completed");
    assert_eq!(turns[0]["input"], json!({"from": 1, "to": steered}));
    assert!(
        lines_of(&entries, &s["turn_id"]).contains(&"echo: a word from node b".to_owned()),
        "{entries:#?}"
    );
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// A debounce window is the database's: opened through A, which then stops,
/// its turn is started by B's sweeper once due, with every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debounce_window_opened_on_one_node_is_started_by_another() {
    let Some(schema) = database("a_debounce_window_opened_on_one_node_is_started_by_another").await
    else {
        return;
    };
    let url = schema.url().to_owned();
    // A long lease: its third bounds every statement, migrations (which
    // wait for other schemas' migrations) included.
    let tune = |cfg: &mut ServeConfig| {
        cfg.lease_ms = 20_000;
        cfg.heartbeat_ms = 6_000;
    };
    let a = node_with(&url, tune).await;
    let id = a
        .client
        .create_session_id(json!({"debounce_ms": 600, "message": "one"}))
        .await;
    let (status, v) = a.client.post(&id, "two", None, None).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["disposition"]["type"], "pending", "{v}");
    let until = v["disposition"]["until"].as_str().unwrap().to_owned();
    a.shutdown().await;
    let b = node_with(&url, tune).await;
    b.client.wait_idle(&id).await;
    let turns = b.client.turns(&id).await;
    assert_eq!(turns.len(), 1, "{turns:#?}");
    assert_eq!(turns[0]["input"], json!({"from": 1, "to": 2}));
    assert!(turns[0]["started_at"].as_str().unwrap() >= until.as_str());
    let entries = b.client.entries(&id).await;
    check_transcript(&entries);
    assert_eq!(
        lines_of(&entries, &turns[0]["id"]),
        vec!["echo: one".to_owned(), "echo: two".to_owned()]
    );
    b.shutdown().await;
}
