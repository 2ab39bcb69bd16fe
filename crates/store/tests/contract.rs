//! Runs the store contract suite (`baton_testkit::contract`) against both
//! backends: every contract once on a fresh SQLite file and once on the
//! PostgreSQL database named by `DATABASE_URL` (skipped, with a note on stderr,
//! when it is unset). Also the embedded store's own guarantees: durability
//! across a reopen and the exclusive file lock.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_core::{EntryType, NewEntry, Policy, SessionStatus, TurnStatus};
use baton_store::{Begin, CreateSession, PostMessage, SharedStore, SqlStore, Store, StoreConfig};
use baton_testkit::contract::{base_config, check_log};

/// Fresh SQLite files in one temporary directory, removed at the end.
struct Sqlite {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl Sqlite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory for SQLite files"),
            next: AtomicUsize::new(0),
        }
    }

    fn open(&self, cfg: StoreConfig) -> impl std::future::Future<Output = SharedStore> + 'static {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("baton-{n}.db"));
        async move {
            let store = SqlStore::open_sqlite(&path, cfg)
                .await
                .unwrap_or_else(|e| panic!("opening SQLite at {}: {e}", path.display()));
            Arc::new(store) as SharedStore
        }
    }
}

fn open_postgres(
    url: &str,
    cfg: StoreConfig,
) -> impl std::future::Future<Output = SharedStore> + 'static {
    let url = url.to_owned();
    async move {
        let store = SqlStore::open_postgres(&url, cfg)
            .await
            .unwrap_or_else(|e| panic!("connecting to PostgreSQL at DATABASE_URL: {e}"));
        Arc::new(store) as SharedStore
    }
}

/// One `sqlite::NAME` and one `postgres::NAME` test per contract function.
macro_rules! contract_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let backend = super::Sqlite::new();
                    baton_testkit::contract::$name(|cfg| backend.open(cfg)).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(url) = baton_testkit::pg::database_url(stringify!($name)) else {
                        return;
                    };
                    let schema = baton_testkit::pg::PgSchema::create(&url).await;
                    baton_testkit::contract::$name(|cfg| super::open_postgres(schema.url(), cfg)).await;
                }
            )+
        }
    };
}

contract_tests!(
    concurrent_posts_keep_order_and_exactly_once,
    idempotency_conflicts_store_nothing,
    concurrent_creates_return_one_session,
    sessions_are_isolated_by_owner,
    busy_policies_apply_atomically,
    queue_capacity_refuses_without_storing,
    turns_run_under_a_lease,
    cancel_requests_are_durable_and_idempotent,
    stale_leases_are_fenced,
    starting_turns_are_handed_over_then_failed,
    all_foreign_recovery_takes_unexpired_leases,
    release_lease_only_when_idle,
    take_turn_begins_or_releases,
    reads_page_and_agree,
    delete_removes_everything,
    output_and_ends_are_checked,
    sessions_list_newest_first_in_pages,
    permission_answers_are_exactly_once,
    recovery_closes_waiting_permission_requests,
    post_to_run_begins_the_turn_it_starts,
    steered_input_joins_the_running_turn_or_the_next,
    steers_race_the_end_of_turns,
    debounce_windows_hold_a_burst,
    recovery_closes_calls_made_before_steered_input,
    nul_bytes_in_lookups_find_nothing,
);

// ---------------------------------------------------------------------------
// The embedded store only

async fn open_file(path: &Path) -> SqlStore {
    SqlStore::open_sqlite(path, base_config())
        .await
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// Drops a store and gives its writer thread time to close the file.
async fn close(store: SqlStore) {
    drop(store);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("baton.db")
}

/// A store on a fresh file (at `db_path` of the directory) holding one
/// `queue` session of `owner`.
async fn file_with_session(owner: &str) -> (tempfile::TempDir, SqlStore, baton_core::SessionId) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = open_file(&db_path(&dir)).await;
    let id = store
        .create_session(new_session(owner, Policy::Queue))
        .await
        .expect("create")
        .session
        .id;
    (dir, store, id)
}

/// I2 for the embedded store: everything acknowledged is there, in the same
/// order, after the store is closed and reopened; a turn that was running
/// when the process went away is ended `lost` by the start-up recovery, and
/// that too survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reopen_keeps_every_entry_in_order() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = db_path(&dir);
    let store = open_file(&path).await;
    let owner = "durable-owner";
    let created = store
        .create_session(CreateSession {
            owner: owner.to_owned(),
            agent: "demo".to_owned(),
            policy: Policy::Queue,
            metadata: serde_json::json!({"k": "v"}),
            idempotency_key: Some("create-1".to_owned()),
            fingerprint: "fp".to_owned(),
            message: Some("hello".to_owned()),
            permission: None,
            node: "node-1".to_owned(),
            debounce_ms: 0,
        })
        .await
        .expect("create with a message");
    let id = created.session.id;
    let lease = created.lease.expect("the first turn's lease");
    let run = store
        .next_turn(&lease)
        .await
        .expect("next_turn")
        .expect("the first turn");
    assert_eq!(
        store.begin_turn(&lease, run.turn.id).await.expect("begin"),
        Begin::Run
    );
    store
        .append_output(
            &lease,
            run.turn.id,
            vec![NewEntry::assistant_message(run.turn.id, "partial")],
        )
        .await
        .expect("append");
    for i in 0..20 {
        store
            .post_message(PostMessage {
                owner: owner.to_owned(),
                session_id: id,
                content: format!("queued {i}"),
                policy: None,
                idempotency_key: Some(format!("post-{i}")),
                node: "node-1".to_owned(),
                mid_turn_agents: Vec::new(),
            })
            .await
            .expect("post");
    }
    let before = check_log(&store, owner, id).await;
    assert_eq!(before.len(), 23);
    let turns_before = store.turns(id).await.expect("turns");
    let session_before = store.session(owner, id).await.expect("session");
    close(store).await;

    let store = open_file(&path).await;
    assert_eq!(
        check_log(&store, owner, id).await,
        before,
        "I2: every entry survives a reopen, in order"
    );
    assert_eq!(store.turns(id).await.expect("turns"), turns_before);
    assert_eq!(
        store.session(owner, id).await.expect("session"),
        session_before
    );
    let retry = store
        .post_message(PostMessage {
            owner: owner.to_owned(),
            session_id: id,
            content: "queued 3".to_owned(),
            policy: None,
            idempotency_key: Some("post-3".to_owned()),
            node: "node-2".to_owned(),
            mid_turn_agents: Vec::new(),
        })
        .await
        .expect("a retry after the reopen");
    assert!(retry.replayed, "I3 holds across a reopen");
    assert_eq!(retry.entry, before[6]);

    // Start-up recovery of the embedded store: the previous process's running
    // turn ends lost and the queue goes on.
    let recovered = store
        .recover("node-2", true)
        .await
        .expect("recover at start-up");
    let rec = recovered
        .iter()
        .find(|r| r.lease.session_id == id)
        .expect("the session with a running turn is recovered");
    assert!(rec.lease.epoch > lease.epoch);
    assert_eq!(rec.committed[0].kind, EntryType::TurnEnded);
    assert_eq!(rec.committed[0].status, Some(TurnStatus::Lost));
    let after = check_log(&store, owner, id).await;
    assert_eq!(&after[..before.len()], &before[..], "recovery only appends");
    close(store).await;

    let store = open_file(&path).await;
    assert_eq!(
        check_log(&store, owner, id).await,
        after,
        "the recovery is durable too"
    );
    let s = store.session(owner, id).await.expect("session");
    assert_eq!(
        s.status,
        SessionStatus::Running,
        "the next queued message's turn is waiting"
    );
    assert_eq!(
        store.turns(id).await.expect("turns")[0].status,
        TurnStatus::Lost
    );
    close(store).await;
}

/// The embedded store is owned by one process: a second open of the same file
/// fails with an error saying it is in use, whether the first is already open
/// or both race; closing the owner frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_file_is_locked_while_open() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = db_path(&dir);
    let first = open_file(&path).await;
    let err = match SqlStore::open_sqlite(&path, base_config()).await {
        Ok(_) => panic!(
            "a second open of {} must fail while the first holds it",
            path.display()
        ),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("in use"),
        "the error must say the file is in use: {err}"
    );
    close(first).await;
    let reopened = open_file(&path).await;
    close(reopened).await;

    let racing = dir.path().join("race.db");
    let (a, b) = tokio::join!(
        SqlStore::open_sqlite(&racing, base_config()),
        SqlStore::open_sqlite(&racing, base_config())
    );
    let errors: Vec<String> = [&a, &b]
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one of two racing opens wins: {errors:?}"
    );
    assert!(
        errors[0].contains("in use"),
        "the loser is told the file is in use: {}",
        errors[0]
    );
    drop((a, b));
}

fn new_session(owner: &str, policy: Policy) -> CreateSession {
    CreateSession {
        owner: owner.to_owned(),
        agent: "demo".to_owned(),
        policy,
        metadata: serde_json::json!({}),
        idempotency_key: None,
        fingerprint: "{}".to_owned(),
        message: None,
        permission: None,
        node: "node-1".to_owned(),
        debounce_ms: 0,
    }
}

fn message(
    owner: &str,
    id: baton_core::SessionId,
    content: &str,
    policy: Option<Policy>,
) -> PostMessage {
    PostMessage {
        owner: owner.to_owned(),
        session_id: id,
        content: content.to_owned(),
        policy,
        idempotency_key: None,
        node: "node-1".to_owned(),
        mid_turn_agents: Vec::new(),
    }
}

/// `n` new sessions of `owner`, policy `queue`.
async fn queue_sessions(store: &SqlStore, owner: &str, n: usize) -> Vec<baton_core::SessionId> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let created = store
            .create_session(new_session(owner, Policy::Queue))
            .await
            .expect("create");
        ids.push(created.session.id);
    }
    ids
}

/// `writers` tasks each post `posts` messages of about `filler` bytes, writer
/// w's k-th to session `(w + k) mod ids.len()`; every post must succeed.
async fn post_concurrently(
    store: &Arc<SqlStore>,
    owner: &'static str,
    ids: &[baton_core::SessionId],
    writers: usize,
    posts: usize,
    filler: usize,
) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, ids) = (store.clone(), ids.to_vec());
        tasks.push(tokio::spawn(async move {
            for k in 0..posts {
                let content = format!("writer {w} message {k} {}", "x".repeat(filler));
                store
                    .post_message(message(owner, ids[(w + k) % ids.len()], &content, None))
                    .await
                    .expect("post");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
}

/// The checkpoint thread: while the store is open, committed writes reach the
/// database file and the WAL stays bounded; once the store is dropped, the
/// last checkpoint empties the WAL, and everything is there on reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_checkpoints_beside_the_writer() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = db_path(&dir);
    let wal = dir.path().join("baton.db-wal");
    let store = Arc::new(open_file(&path).await);
    let owner = "checkpoint-owner";
    let ids = queue_sessions(&store, owner, 8).await;
    // Concurrent writers, so batches commit many jobs at once.
    post_concurrently(&store, owner, &ids, 32, 50, 200).await;
    let mut before = Vec::new();
    for id in &ids {
        before.push(check_log(&*store, owner, *id).await);
    }
    assert_eq!(
        before.iter().map(Vec::len).sum::<usize>(),
        32 * 50 + ids.len(),
        "every message, and each session's first turn_started"
    );

    // A passive checkpoint copies the WAL into the file while the store is
    // open: the database file grows past its empty size.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) < 256 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint reached the database file within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let store = Arc::into_inner(store).expect("the tasks are done");
    drop(store);
    // The checkpoint thread's last act is a TRUNCATE checkpoint.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL was not emptied within 20 s of closing the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = open_file(&path).await;
    for (id, log) in ids.iter().zip(&before) {
        assert_eq!(
            &check_log(&store, owner, *id).await,
            log,
            "I2: every entry survives the checkpoints and a reopen"
        );
    }
}

/// Under writers that never let the store's writer pause, the WAL still
/// starts over: it stays far smaller than everything written through it.
/// (A checkpoint beside such a writer never catches up on its own; before
/// the writer finished the checkpoints itself, the WAL grew by everything
/// written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_the_wal_starts_over_under_a_load_that_never_pauses() {
    const WRITERS: usize = 48;
    const POSTS: usize = 256;
    const CONTENT: usize = 16 * 1024;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = db_path(&dir);
    let wal = dir.path().join("baton.db-wal");
    let cfg = StoreConfig {
        // 1 MiB, so that the test need not write gigabytes.
        wal_catch_up_pages: 256,
        ..base_config()
    };
    let store = Arc::new(
        SqlStore::open_sqlite(&path, cfg)
            .await
            .expect("opening the store"),
    );
    let owner = "wal-owner";
    let ids = queue_sessions(&store, owner, 8).await;
    post_concurrently(&store, owner, &ids, WRITERS, POSTS, CONTENT).await;
    // SQLite never shrinks the WAL file while the store is open: its size is
    // the furthest the WAL ever reached.
    let largest = std::fs::metadata(&wal).map(|m| m.len()).expect("the WAL");
    let written = (WRITERS * POSTS * CONTENT) as u64;
    assert!(
        largest < written / 2,
        "the WAL reached {largest} bytes while {written} bytes of messages went through it"
    );
    let mut total = 0;
    for id in &ids {
        total += check_log(&*store, owner, *id).await.len();
    }
    assert_eq!(
        total,
        WRITERS * POSTS + ids.len(),
        "every message, and each session's first turn_started"
    );
}

/// Another connection on the same file (an operator's `sqlite3` shell; the
/// store's lock keeps only other Baton processes out).
fn outside(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("a second connection");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy_timeout");
    c
}

/// The store's clock never runs back across a restart: a file written by a
/// run whose clock was an hour ahead (or a clock stepped back since) still
/// gets later stamps after the entries it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_clock_never_runs_back_across_a_restart() {
    let owner = "clock-owner";
    let (dir, store, id) = file_with_session(owner).await;
    let path = db_path(&dir);
    close(store).await;
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_micros() as i64
        + 3_600_000_000;
    outside(&path)
        .execute_batch(&format!(
            "BEGIN; UPDATE sessions SET last_seq = 1 WHERE id = '{id}'; \
             INSERT INTO entries (session_id, seq, kind, role, content, created_at) \
             VALUES ('{id}', 1, 'message', 'system', 'from an hour ahead', {ahead}); COMMIT;"
        ))
        .expect("an entry stamped an hour ahead");

    let store = open_file(&path).await;
    let posted = store
        .post_message(message(owner, id, "after the restart", None))
        .await
        .expect("post");
    assert!(
        posted.entry.created_at.0 >= ahead,
        "stamped {} µs before the entry it follows",
        ahead - posted.entry.created_at.0
    );
    check_log(&store, owner, id).await;
}

/// The writer remembers session rows between transactions; a commit by
/// another connection must make it read them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_writer_sees_commits_by_other_connections() {
    let owner = "outside-owner";
    let (dir, store, id) = file_with_session(owner).await;
    let path = db_path(&dir);
    for m in ["m1", "m2"] {
        store
            .post_message(message(owner, id, m, None))
            .await
            .expect("post");
    }

    // Another connection switches the session's policy to reject…
    let c = outside(&path);
    let n = c
        .execute(
            "UPDATE sessions SET policy = 'reject' WHERE id = ?1",
            [id.to_string()],
        )
        .expect("update");
    assert_eq!(n, 1);
    let err = store
        .post_message(message(owner, id, "m3", None))
        .await
        .expect_err("the session's policy is now reject and a turn is active");
    assert!(
        matches!(err, baton_store::StoreError::SessionBusy { .. }),
        "{err:?}"
    );

    // …then deletes it.
    c.execute_batch(&format!(
        "BEGIN; DELETE FROM entries WHERE session_id = '{id}'; \
         DELETE FROM turns WHERE session_id = '{id}'; \
         DELETE FROM sessions WHERE id = '{id}'; COMMIT;"
    ))
    .expect("delete");
    let err = store
        .post_message(message(owner, id, "m4", None))
        .await
        .expect_err("the session is gone");
    assert!(matches!(err, baton_store::StoreError::NotFound), "{err:?}");
    drop(c);
    close(store).await;
}

/// A write that changed a session and then failed is undone whole, in
/// memory too: the posts batched with it keep their writes, and the next
/// write to its session sees the row as it was before.
///
/// The failure is real: with no turn active but a message waiting (a state
/// this store never leaves behind, made here by another connection), a post
/// first starts the waiting turn, then is rejected by policy `reject`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_write_failing_after_it_wrote_leaves_no_trace() {
    let owner = "undo-owner";
    let (dir, store, a) = file_with_session(owner).await;
    let path = db_path(&dir);
    let store = Arc::new(store);
    let others = queue_sessions(&store, owner, 4).await;
    let first = store
        .post_message(message(owner, a, "a1", None))
        .await
        .expect("post a1");
    let t1 = first.disposition.turn_id.expect("a1 starts a turn");
    store
        .post_message(message(owner, a, "a2", None))
        .await
        .expect("post a2");
    let c = outside(&path);
    // Stamped like the store would: not before the log's last entry.
    let now = format!("(SELECT MAX(created_at) + 1 FROM entries WHERE session_id = '{a}')");
    c.execute_batch(&format!(
        "BEGIN; UPDATE turns SET status = 'failed', ended_at = {now}, reason = 'ended outside' WHERE id = '{t1}'; \
         INSERT INTO entries (session_id, seq, kind, turn_id, status, reason, created_at) \
         VALUES ('{a}', 4, 'turn_ended', '{t1}', 'failed', 'ended outside', {now}); \
         UPDATE sessions SET active_turn = NULL, last_seq = 4 WHERE id = '{a}'; COMMIT;"
    ))
    .expect("end the turn outside the store");
    drop(c);

    // Rounds of a rejected post racing 24 posts to other sessions, so that
    // it shares batches with them.
    let mut expected_others = 0;
    for round in 0..10 {
        let mut tasks = Vec::new();
        for k in 0..24 {
            let (store, id) = (store.clone(), others[k % others.len()]);
            tasks.push(tokio::spawn(async move {
                store
                    .post_message(message(owner, id, &format!("r{round} k{k}"), None))
                    .await
                    .map(|_| ())
            }));
        }
        let rejected = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .post_message(message(
                        owner,
                        a,
                        &format!("rejected {round}"),
                        Some(Policy::Reject),
                    ))
                    .await
            })
        };
        let err = rejected
            .await
            .expect("task")
            .expect_err("a reject post meets the turn it just started");
        assert!(
            matches!(err, baton_store::StoreError::SessionBusy { .. }),
            "round {round}: {err:?}"
        );
        for t in tasks {
            t.await
                .expect("task")
                .expect("posts to other sessions succeed");
            expected_others += 1;
        }
    }

    // Nothing of the rejected posts or their undone turn starts is left:
    // the next post starts the waiting turn at the next seq.
    let healed = store
        .post_message(message(owner, a, "a3", None))
        .await
        .expect("post a3");
    let kinds: Vec<(u64, EntryType)> = healed.committed.iter().map(|e| (e.seq, e.kind)).collect();
    assert_eq!(
        kinds,
        [(5, EntryType::TurnStarted), (6, EntryType::Message)],
        "the waiting turn starts at seq 5, then a3 at 6"
    );
    let log = check_log(&*store, owner, a).await;
    assert_eq!(log.len(), 6, "{log:#?}");
    assert!(log.iter().all(|e| e
        .content
        .as_deref()
        .is_none_or(|c| !c.starts_with("rejected"))));
    let mut stored = 0;
    for id in &others {
        stored += check_log(&*store, owner, *id)
            .await
            .iter()
            .filter(|e| e.kind == EntryType::Message)
            .count();
    }
    assert_eq!(stored, expected_others);
}

// ---------------------------------------------------------------------------
// PostgreSQL only

/// A write that waited for a session's row lock reads the clock after it got
/// the lock: it never stamps its entries earlier than what the transaction
/// it waited for wrote (two nodes writing one session at once). The other
/// writer is played by a raw connection that stamps its entry after the
/// post has begun and queued behind its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_write_that_waited_for_the_lock_is_not_stamped_earlier() {
    use sqlx::{Connection, Row};
    let Some(url) = baton_testkit::pg::database_url("postgres_a_write_that_waited_for_the_lock")
    else {
        return;
    };
    let schema = baton_testkit::pg::PgSchema::create(&url).await;
    let store = Arc::new(
        SqlStore::open_postgres(schema.url(), base_config())
            .await
            .expect("open the PostgreSQL store"),
    );
    let owner = "o";
    let id = store
        .create_session(new_session(owner, Policy::Queue))
        .await
        .expect("create")
        .session
        .id;
    let connect = || async {
        sqlx::PgConnection::connect(schema.url())
            .await
            .expect("a raw connection")
    };
    let (mut holder, mut watcher) = (connect().await, connect().await);
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .expect("backend pid");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("SELECT id FROM sessions WHERE id = $1 FOR UPDATE")
        .bind(id.to_string())
        .execute(&mut holder)
        .await
        .expect("lock the session");

    let post = tokio::spawn({
        let store = store.clone();
        async move { store.post_message(message(owner, id, "late", None)).await }
    });
    // Until the post is queued behind the holder's lock.
    let patience = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(holder_pid)
        .fetch_one(&mut watcher)
        .await
        .expect("lock waits");
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < patience,
            "the post never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The holder writes an entry stamped now, after the post began.
    let seq: i64 =
        sqlx::query("UPDATE sessions SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq")
            .bind(id.to_string())
            .fetch_one(&mut holder)
            .await
            .expect("bump last_seq")
            .get(0);
    let stamped: i64 = sqlx::query_scalar(
        "INSERT INTO entries (session_id, seq, kind, role, content, created_at) \
         VALUES ($1, $2, 'message', 'system', 'first', \
                 CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)) \
         RETURNING created_at",
    )
    .bind(id.to_string())
    .bind(seq)
    .fetch_one(&mut holder)
    .await
    .expect("insert the holder's entry");
    sqlx::query("COMMIT")
        .execute(&mut holder)
        .await
        .expect("commit");

    let posted = post.await.expect("the post task").expect("the post");
    assert_eq!(posted.entry.seq, 2, "after the holder's entry");
    assert!(
        posted.entry.created_at.0 >= stamped,
        "the post is stamped {} µs before the entry it waited for",
        stamped - posted.entry.created_at.0
    );
    check_log(&*store, owner, id).await;
}

/// Starting a node migrates without the pool's statement and lock timeouts:
/// a node that starts while another holds the migrations (here: a lock on
/// the migrations table held well past a short lease's timeouts) waits for
/// it and starts, instead of failing with "canceling statement due to
/// statement timeout".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_node_starting_during_a_long_migration_waits_for_it() {
    use sqlx::Connection;
    let Some(url) =
        baton_testkit::pg::database_url("postgres_a_node_starting_during_a_long_migration")
    else {
        return;
    };
    let schema = baton_testkit::pg::PgSchema::create(&url).await;
    // Migrated once; a second start reads the migrations table again.
    drop(
        SqlStore::open_postgres(schema.url(), base_config())
            .await
            .expect("first start"),
    );
    let mut holder = sqlx::PgConnection::connect(schema.url())
        .await
        .expect("a raw connection");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .expect("lock the migrations table");
    // A 300 ms lease: statement and lock timeouts of 100 ms on the pool.
    let cfg = StoreConfig {
        lease_ttl: Duration::from_millis(300),
        ..base_config()
    };
    let starting = tokio::spawn({
        let url = schema.url().to_owned();
        async move { SqlStore::open_postgres(&url, cfg).await }
    });
    // Held five times the statement timeout, then let go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !starting.is_finished(),
        "the start waits for the migrations table, it neither fails nor skips it"
    );
    sqlx::query("COMMIT")
        .execute(&mut holder)
        .await
        .expect("commit");
    let store = starting
        .await
        .expect("the start task")
        .expect("a node starting during a long migration starts once it is done");
    store.ping().await.expect("the started node answers");
}

/// Three nodes on one database, 64 writers each, batching at once: half of
/// the writers post to one hot session, the others to 40 sessions picked at
/// random; a third of the messages are sent twice at once with one
/// idempotency key through two different nodes. Batches of the nodes lock
/// overlapping sets of sessions, so they must wait for each other in id
/// order rather than deadlock. Every post is acknowledged (a retry PostgreSQL
/// asks for is taken, never answered as an error), every key is stored once,
/// and every log is gap-free with each acknowledged message at its seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_three_nodes_batching_overlapping_sessions_keep_every_log_whole() {
    const NODES: usize = 3;
    const WRITERS: usize = 64;
    const PER_WRITER: usize = 6;
    const SPREAD: usize = 1000;
    let Some(url) = baton_testkit::pg::database_url("postgres_three_nodes_batching") else {
        return;
    };
    let schema = baton_testkit::pg::PgSchema::create(&url).await;
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        nodes.push(Arc::new(
            SqlStore::open_postgres(schema.url(), base_config())
                .await
                .expect("open a node's store"),
        ));
    }
    let owner = "o";
    let hot = queue_sessions(&nodes[0], owner, 1).await[0];
    let spread = Arc::new(queue_sessions(&nodes[0], owner, SPREAD).await);

    let mut tasks = Vec::new();
    for n in 0..NODES {
        for w in 0..WRITERS {
            let nodes = nodes.clone();
            let spread = spread.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..PER_WRITER {
                    let session = if w % 2 == 0 {
                        hot
                    } else {
                        spread[fastrand::usize(0..SPREAD)]
                    };
                    let content = format!("node {n} writer {w} message {i}");
                    // Every policy that accepts: turns start, queue, gather,
                    // are asked to cancel, and steers queue.
                    let policy = [
                        None,
                        Some(Policy::Merge),
                        Some(Policy::Interrupt),
                        Some(Policy::Steer),
                    ][(w + i) % 4];
                    let mut req = message(owner, session, &content, policy);
                    req.idempotency_key = Some(content.clone());
                    // A third of the posts are retried at once on another
                    // node, a third on the same one (most often into the
                    // same batch).
                    let answers = if i % 3 != 2 {
                        let other = &nodes[if i % 3 == 0 { (n + 1) % NODES } else { n }];
                        let (a, b) = tokio::join!(
                            nodes[n].post_message(req.clone()),
                            other.post_message(req.clone())
                        );
                        vec![a, b]
                    } else {
                        vec![nodes[n].post_message(req).await]
                    };
                    for a in answers {
                        let posted =
                            a.unwrap_or_else(|e| panic!("posting {content:?} failed: {e:?}"));
                        acked.push((session, content.clone(), posted));
                    }
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for t in futures_util::future::join_all(tasks).await {
        acked.extend(t.expect("a writer panicked"));
    }

    // One original per key; its retry replays the same entry.
    let mut by_key: std::collections::HashMap<&str, Vec<&baton_store::Posted>> =
        std::collections::HashMap::new();
    for (_, content, posted) in &acked {
        by_key.entry(content.as_str()).or_default().push(posted);
    }
    assert_eq!(by_key.len(), NODES * WRITERS * PER_WRITER);
    for (key, posts) in &by_key {
        let originals = posts.iter().filter(|p| !p.replayed).count();
        assert_eq!(originals, 1, "{key:?} stored {originals} times");
        assert!(
            posts
                .iter()
                .all(|p| p.entry.seq == posts[0].entry.seq && p.disposition == posts[0].disposition),
            "{key:?}: a retry got another entry or disposition back"
        );
    }
    // Every log gap-free, holding exactly its acknowledged messages at the
    // seqs they were acknowledged with.
    let mut sessions = vec![hot];
    sessions.extend(spread.iter().copied());
    for id in sessions {
        let log = check_log(&*nodes[0], owner, id).await;
        let mut stored: Vec<(i64, &str)> = log
            .iter()
            .filter(|e| e.kind == EntryType::Message)
            .map(|e| (e.seq as i64, e.content.as_deref().unwrap_or_default()))
            .collect();
        stored.sort();
        let mut want: Vec<(i64, &str)> = by_key
            .iter()
            .filter(|(_, p)| p[0].entry.session_id == id)
            .map(|(k, p)| (p[0].entry.seq as i64, *k))
            .collect();
        want.sort();
        assert_eq!(
            stored, want,
            "session {id}: the log is not what was acknowledged"
        );
    }
}
