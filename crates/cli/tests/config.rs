//! `baton serve`'s configuration, through the real binary: a store URL is
//! taken only with a scheme Baton supports, start-up errors name the
//! problem, every flag is checked before anything is created on disk (the
//! working directory stays empty), host names resolve, and flag values are
//! taken whole while the environment's lists are split.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;

use common::{Client, PATIENCE};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Runs `baton serve ARGS…` in `dir` with no store or list variables from
/// this environment plus `env`; expects it to fail; returns its stderr.
async fn refused(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.arg("serve")
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("BATON_DB")
        .env_remove("BATON_TOKENS")
        .env_remove("BATON_ACP")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("baton serve {args:?} neither served nor exited"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "baton serve {args:?} should fail; stdout {stdout} stderr {stderr}"
    );
    assert!(
        !stdout.contains("listening on"),
        "baton serve {args:?} listened: {stdout}"
    );
    stderr
}

/// The names in `dir`.
fn listing(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Asserts the refusal of `args` says `says`, and nothing was created.
#[track_caller]
fn check(args: &[&str], stderr: &str, says: &str, dir: &Path) {
    assert!(
        stderr.contains(says),
        "baton serve {args:?}: expected {says:?} in stderr:\n{stderr}"
    );
    assert!(
        listing(dir).is_empty(),
        "baton serve {args:?} created {:?}",
        listing(dir)
    );
}

/// A `baton serve` that starts: its address, and the child.
struct Served {
    child: tokio::process::Child,
    client: Client,
}

async fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.arg("serve")
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("BATON_DB")
        .env_remove("BATON_TOKENS")
        .env_remove("BATON_ACP")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("baton did not start in time")
        .unwrap()
        .unwrap_or_else(|| panic!("baton serve {args:?} exited before listening"));
    let base = line.strip_prefix("listening on ").unwrap().to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Served {
        child,
        client: Client::new(base),
    }
}

#[tokio::test]
async fn a_database_url_without_a_supported_scheme_is_refused_by_name() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--database-url", "notaurl"],
            "--database-url is not a URL (no scheme)",
        ),
        (
            &["--database-url", "mysql://root:hunter2@db.example/app"],
            "unsupported scheme \"mysql\"",
        ),
        (
            &["--database-url", "postgres:db.example/app"],
            "a postgres URL starts with postgres://",
        ),
        (&["--database-url", "sqlite::memory:"], "not durable"),
        (&["--database-url", "sqlite:x.db?mode=ro"], "not supported"),
        (
            &["--db", "a.db", "--database-url", "sqlite:b.db"],
            "both --db (BATON_DB) and --database-url (DATABASE_URL) are set",
        ),
    ];
    for (args, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let stderr = refused(dir.path(), args, &[]).await;
        check(args, &stderr, says, dir.path());
        assert!(!stderr.contains("hunter2"), "a password in: {stderr}");
    }
    // The environment's form is read the same way.
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused(dir.path(), &[], &[("DATABASE_URL", "notaurl")]).await;
    check(&["DATABASE_URL=notaurl"], &stderr, "not a URL", dir.path());
}

#[tokio::test]
async fn a_sqlite_url_is_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "sqlite:via-url.db",
        ],
        &[],
    )
    .await;
    let id = s
        .client
        .create_session_id(serde_json::json!({"message": "hi"}))
        .await;
    s.client.wait_idle(&id).await;
    assert!(
        dir.path().join("via-url.db").exists(),
        "{:?}",
        listing(dir.path())
    );
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_postgres_is_named_not_timed_out() {
    // A port nothing listens on: refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/test");
    let cases = [
        (url, format!("connection refused by 127.0.0.1:{port}")),
        (
            "postgres://postgres@no-such-host.invalid:5432/test".to_owned(),
            "unknown PostgreSQL host \"no-such-host.invalid\"".to_owned(),
        ),
    ];
    for (url, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let args = ["--database-url", url.as_str()];
        let stderr = refused(dir.path(), &args, &[]).await;
        check(&args, &stderr, &says, dir.path());
        assert!(!stderr.contains("hunter2"), "a password in: {stderr}");
        assert!(!stderr.contains("pool timed out"), "{stderr}");
    }
}

#[tokio::test]
async fn a_missing_database_and_an_unknown_user_are_named() {
    let Some(url) = baton_testkit::pg::database_url("start-up errors") else {
        return;
    };
    let (server, _db) = url.rsplit_once('/').unwrap();
    let missing_db = format!("{server}/baton_no_such_database_{}", std::process::id());
    let rest = server.split_once("://").unwrap().1;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let stranger = format!("postgres://baton_no_such_role@{host}/postgres");
    let cases = [
        (missing_db, "does not exist on PostgreSQL at".to_owned()),
        (stranger, "refused user \"baton_no_such_role\"".to_owned()),
    ];
    for (url, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let args = ["--database-url", url.as_str()];
        let stderr = refused(dir.path(), &args, &[]).await;
        check(&args, &stderr, &says, dir.path());
    }
}

#[tokio::test]
async fn every_flag_is_checked_before_anything_is_created() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--debounce-ms", "3600001"],
            "--debounce-ms (3600001) must be at most 3600000",
        ),
        (&["--policy", "nope"], "invalid value 'nope' for '--policy"),
        (
            &["--debounce-ms", "soon"],
            "invalid value 'soon' for '--debounce-ms",
        ),
        (&["--acp", "no-equals-sign"], "expected NAME=VALUE"),
        (
            &["--acp", "x=sh -c \"unterminated"],
            "--acp x: cannot split",
        ),
        (&["--acp", "demo=true"], "the name demo is taken"),
        (
            &["--acp", "x=true", "--acp", "x=false"],
            "agent \"x\" is defined twice",
        ),
        (
            &["--acp", "x=true", "--acp-permission", "x=maybe"],
            "--acp-permission x:",
        ),
        (
            &["--acp-cwd", "ghost=/tmp"],
            "names agent \"ghost\", which no --acp defines",
        ),
        (
            &["--default-agent", "ghost"],
            "--default-agent \"ghost\" is not a configured agent",
        ),
        (&["--token", "no-colon"], "expected OWNER:SECRET"),
        (
            &["--token", "a:s", "--token", "b:s"],
            "have the same secret",
        ),
        (
            &["--heartbeat-ms", "20000"],
            "--heartbeat-ms (20000) must be shorter than --lease-ms",
        ),
        (
            &["--queue-capacity", "0"],
            "--queue-capacity must be at least 1",
        ),
        (&["--listen", "nonsense"], "expected HOST:PORT"),
        (&["--listen", "no-such-host.invalid:7700"], "cannot resolve"),
    ];
    for (args, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec!["--db", "baton.db"];
        if !args.contains(&"--listen") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        all.extend_from_slice(args);
        let stderr = refused(dir.path(), &all, &[]).await;
        check(&all, &stderr, says, dir.path());
    }
    // The environment's lists are checked the same way.
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused(
        dir.path(),
        &["--listen", "127.0.0.1:0"],
        &[("BATON_ACP", "a=true;broken")],
    )
    .await;
    check(
        &["BATON_ACP"],
        &stderr,
        "BATON_ACP: expected NAME=VALUE",
        dir.path(),
    );
}

#[tokio::test]
async fn a_port_in_use_creates_no_store() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--listen", addr.as_str(), "--db", "baton.db"];
    let stderr = refused(dir.path(), &args, &[]).await;
    check(&args, &stderr, &format!("binding {addr}"), dir.path());
    drop(taken);
}

#[tokio::test]
async fn a_host_name_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(
        dir.path(),
        &["--listen", "localhost:0", "--db", "baton.db"],
        &[],
    )
    .await;
    assert!(
        s.client.base.starts_with("http://127.0.0.1:"),
        "{}",
        s.client.base
    );
    let (status, _) = s.client.send(s.client.req(Method::GET, "/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();
}

#[tokio::test]
async fn flag_values_are_whole_and_environment_lists_are_split() {
    let dir = tempfile::tempdir().unwrap();
    // A secret with a comma and an agent command with a `;` on the command line.
    let mut s = serve(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            "baton.db",
            "--token",
            "alice:s,1",
            "--acp",
            "x=sh -c 'true; true'",
        ],
        &[
            ("BATON_TOKENS", "bob:b1,carol:c1"),
            ("BATON_ACP", "y=true;z=true"),
        ],
    )
    .await;
    let alice = s.client.with_token("s,1");
    let (status, body) = alice.send(alice.req(Method::GET, "/v1/agents")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let agents = body["agents"].as_array().unwrap();
    let names: Vec<&str> = agents.iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names.len(), 2, "the flag wins over the environment: {body}");
    assert!(names.contains(&"x") && names.contains(&"demo"), "{body}");
    let x = agents.iter().find(|a| a["name"] == "x").unwrap();
    assert_eq!(
        x["command"],
        serde_json::json!(["sh", "-c", "true; true"]),
        "{x}"
    );
    let bob = s.client.with_token("b1");
    let (status, _) = bob.send(bob.req(Method::GET, "/v1/agents")).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "BATON_TOKENS is not read when --token is given"
    );
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();

    // With no flags, the environment's lists are split.
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--db", "baton.db"],
        &[
            ("BATON_TOKENS", "bob:b1,carol:c1"),
            ("BATON_ACP", "y=true;z=true"),
        ],
    )
    .await;
    for secret in ["b1", "c1"] {
        let c = s.client.with_token(secret);
        let (status, body) = c.send(c.req(Method::GET, "/v1/agents")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["agents"].as_array().unwrap().len(), 3, "{body}");
    }
    s.child.start_kill().unwrap();
    s.child.wait().await.unwrap();
}
