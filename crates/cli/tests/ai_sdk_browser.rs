//! The AI SDK example app (`examples/ai-sdk-chat`, built) in a real browser:
//! `tests/browser/ai-sdk-chat.test.mjs` (Playwright driving the system's
//! Chromium) against `baton serve` processes this test starts on
//! `127.0.0.1:0`, with the demo agent.
//!
//! The script asks for a server restart mid-stream by printing
//! `@@restart`; this test kills that server with SIGKILL, starts it again on
//! the same port and file, and answers `restarted` on the script's stdin.
//! Without Chromium, the script's `node_modules` or the app's build
//! (`cd examples/ai-sdk-chat && npm ci && npm run build`) the test says why
//! and skips, unless `BATON_REQUIRE_BROWSER=1` (as in CI), where it fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{spawn_binary, spawn_binary_at, ChildServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The whole browser pass; it takes well under a minute when the machine is
/// not loaded.
const BUDGET: Duration = Duration::from_secs(300);

const ALICE: &str = "alice:alice-secret-token";
const BOB: &str = "bob:bob-secret-token";
const CAROL: &str = "carol:carol-secret-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chromium() -> PathBuf {
    std::env::var_os("BATON_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Whether everything the script needs is installed (saying what is not).
fn browser_ready() -> bool {
    let modules = root().join("tests/browser/node_modules/playwright-core");
    let app = root().join("examples/ai-sdk-chat/dist/index.html");
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let missing: Vec<String> = [
        (!chromium().exists())
            .then(|| format!("{} (apt-get install chromium)", chromium().display())),
        (!node).then(|| "node".to_owned()),
        (!modules.exists()).then(|| format!("{} (cd tests/browser && npm ci)", modules.display())),
        (!app.exists()).then(|| {
            format!(
                "{} (cd examples/ai-sdk-chat && npm ci && npm run build)",
                app.display()
            )
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("the browser tests need {}", missing.join(", "));
    if std::env::var("BATON_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipping the AI SDK app's browser tests: {msg}");
    false
}

fn addr_of(server: &ChildServer) -> String {
    server
        .client
        .base
        .strip_prefix("http://")
        .unwrap()
        .to_owned()
}

async fn start(db: &Path, args: &[&str]) -> ChildServer {
    spawn_binary(db, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ai_sdk_example_app_works_in_a_real_browser() {
    if !browser_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let open = start(&dir.path().join("open.db"), &[]).await;
    let owners = start(
        &dir.path().join("owners.db"),
        &["--token", ALICE, "--token", BOB, "--token", CAROL],
    )
    .await;
    let restart_db = dir.path().join("restart.db");
    let mut restarting = Some(start(&restart_db, &[]).await);
    let restart_addr = addr_of(restarting.as_ref().unwrap());

    let mut node = tokio::process::Command::new("node")
        .arg(root().join("tests/browser/ai-sdk-chat.test.mjs"))
        .current_dir(root().join("tests/browser"))
        .env("BATON_URL", &open.client.base)
        .env("BATON_OWNERS_URL", &owners.client.base)
        .env("BATON_RESTART_URL", format!("http://{restart_addr}"))
        .env("BATON_TOKENS", [ALICE, BOB, CAROL].join(","))
        .env("BATON_CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut restarts = 0;
    let run = async {
        while let Some(line) = lines
            .next_line()
            .await
            .expect("reading the script's output")
        {
            if line.trim() != "@@restart" {
                println!("{line}");
                continue;
            }
            // SIGKILL: nothing of the server's shutdown runs; the page sees
            // its stream break mid-turn.
            restarting.take().unwrap().kill9().await;
            let again = spawn_binary_at(&restart_db, &restart_addr, &[]).await;
            assert_eq!(addr_of(&again), restart_addr, "restarted on the same port");
            restarting = Some(again);
            restarts += 1;
            stdin.write_all(b"restarted\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
        node.wait().await.expect("waiting for node")
    };
    let status = tokio::time::timeout(BUDGET, run)
        .await
        .expect("the browser tests did not finish in time");
    assert!(status.success(), "the browser tests failed: {status}");
    assert_eq!(restarts, 1, "the restart scenario ran");
}
