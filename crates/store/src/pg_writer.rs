//! PostgreSQL's group commit: concurrent writes to sessions share one
//! transaction and one commit.
//!
//! A write that locks a session goes to one of a few lanes, chosen by the
//! session's id, so every write to one session on this node queues in one
//! lane, in arrival order. A lane takes every write waiting (up to
//! [`MAX_BATCH`]) into one transaction that first locks all of their
//! sessions' rows in id order with one statement (two nodes batching the
//! same sessions wait for each other instead of deadlocking), keeping the
//! rows it read, and then reads the clock once, so no write is stamped
//! earlier than the commit it waited for (the locking statement reads it).
//! Each write but a post then runs in a savepoint: one that fails (a stale
//! epoch, a turn already ended, a conflict) is rolled back alone and the
//! others commit. The batch's posts are decided together
//! ([`crate::sql::post_all`]: the procedure refuses a post before anything
//! of it is written, so a refused one needs no savepoint), and their
//! entries are written with the session rows. A write reads its session's
//! row from memory and saves it there; the rows are written with one
//! statement before the commit (see [`crate::db::PgBatch`]). One commit, and
//! so one flush of the WAL, for the whole batch.
//!
//! A write that met a conflict PostgreSQL asks to retry (a concurrent first
//! use of an idempotency key, a deadlock with a write outside the lanes),
//! or whose batch could not be run, is handed back to its caller, who runs
//! it alone with the usual retries: batching never turns a retry into an
//! error.
//!
//! A batch is at most [`MAX_BATCH`] writes because each savepoint is a
//! subtransaction, and past 64 of them a transaction overflows the
//! per-backend cache that other sessions' snapshots consult.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use baton_core::SessionId;
use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use crate::db::{Conn, Fail, PgBatch, R};
use crate::sql::{lock_batch, post_all, retryable, unfail, write_deferred_sessions, WaitingPost};
use crate::{Posted, Result, StoreConfig, StoreError};

/// How many writes share one transaction at most.
pub(crate) const MAX_BATCH: usize = 64;

/// How many writes may wait for one lane.
const LANE_DEPTH: usize = 1024;

/// A write's body, as [`crate::SqlStore`] runs it: the transaction and the
/// time read once its session's row is locked.
pub(crate) type Body<T> =
    Arc<dyn for<'c> Fn(&'c mut Conn, i64) -> BoxFuture<'c, R<T>> + Send + Sync + 'static>;

/// What a lane tells a write's caller.
pub(crate) enum Reply<T> {
    /// Its result: committed, or why not.
    Done(Result<T>),
    /// Run it alone (a conflict to retry, or a batch that could not run).
    Alone,
}

/// How a batch ended, for each of its writes.
enum Fate {
    /// Committed (or, for a batch of one write that failed, rolled back):
    /// each write's own result is its answer.
    Settled,
    /// Failed before its commit: nothing of it was written.
    Void,
    /// The commit failed: each write that succeeded gets this.
    CommitFailed { retry: bool, why: String },
}

/// A write queued for a lane, type-erased.
trait Job: Send {
    fn session(&self) -> SessionId;
    /// The post this is, if it is one: posts are decided together.
    fn post(&self) -> Option<&WaitingPost> {
        None
    }
    /// Runs the body and keeps its result; whether it succeeded.
    fn run<'a>(&'a mut self, c: &'a mut Conn, now: i64) -> BoxFuture<'a, bool>;
    /// Keeps a post's answer (`None`: run it alone).
    fn answer(&mut self, _answer: Option<R<Posted>>) {}
    /// Delivers the result once the batch's fate is known.
    fn finish(self: Box<Self>, fate: &Fate);
}

/// What a write's caller is told, from its result and its batch's fate.
fn deliver<T>(result: Option<R<T>>, fate: &Fate) -> Reply<T> {
    match (result, fate) {
        (None, _) | (_, Fate::Void) => Reply::Alone,
        // Rolled back to its savepoint: its own failure is the answer,
        // unless PostgreSQL asks for a retry.
        (Some(Err(Fail::Db(e))), _) if retryable(&e) => Reply::Alone,
        (Some(Err(f)), _) => Reply::Done(Err(unfail(f))),
        (Some(Ok(v)), Fate::Settled) => Reply::Done(Ok(v)),
        (Some(Ok(_)), Fate::CommitFailed { retry: true, .. }) => Reply::Alone,
        (Some(Ok(_)), Fate::CommitFailed { why, .. }) => Reply::Done(Err(StoreError::Unavailable(
            format!("commit failed: {why}"),
        ))),
    }
}

struct Write<T> {
    session: SessionId,
    body: Body<T>,
    result: Option<R<T>>,
    reply: oneshot::Sender<Reply<T>>,
}

impl<T: Send + 'static> Job for Write<T> {
    fn session(&self) -> SessionId {
        self.session
    }

    fn run<'a>(&'a mut self, c: &'a mut Conn, now: i64) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let result = (self.body)(c, now).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn finish(self: Box<Self>, fate: &Fate) {
        let _ = self.reply.send(deliver(self.result, fate));
    }
}

/// A post queued for a lane.
struct PostJob {
    post: WaitingPost,
    result: Option<R<Posted>>,
    reply: oneshot::Sender<Reply<Posted>>,
}

impl Job for PostJob {
    fn session(&self) -> SessionId {
        self.post.req.session_id
    }

    fn post(&self) -> Option<&WaitingPost> {
        Some(&self.post)
    }

    fn run<'a>(&'a mut self, _c: &'a mut Conn, _now: i64) -> BoxFuture<'a, bool> {
        // Posts are decided together by `post_all`, never one by one here.
        Box::pin(async { false })
    }

    fn answer(&mut self, answer: Option<R<Posted>>) {
        self.result = answer;
    }

    fn finish(self: Box<Self>, fate: &Fate) {
        let _ = self.reply.send(deliver(self.result, fate));
    }
}

/// The lanes of one store.
#[derive(Clone)]
pub(crate) struct Lanes {
    lanes: Arc<[mpsc::Sender<Box<dyn Job>>]>,
}

impl Lanes {
    /// Starts `n` lanes on the current runtime, each running its batches on
    /// a connection of `pool`. They end when the store is dropped.
    pub(crate) fn start(
        pool: &AnyPool,
        n: usize,
        stats: crate::CommitStats,
        cfg: StoreConfig,
    ) -> Self {
        let cfg = Arc::new(cfg);
        let lanes: Vec<_> = (0..n.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(LANE_DEPTH);
                tokio::spawn(lane(pool.clone(), rx, stats.clone(), cfg.clone()));
                tx
            })
            .collect();
        Self {
            lanes: lanes.into(),
        }
    }

    /// Runs `body` in a batch of `session`'s lane.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        session: SessionId,
        body: Body<T>,
    ) -> Reply<T> {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Write {
            session,
            body,
            result: None,
            reply,
        });
        self.queue(session, job, answer).await
    }

    /// Decides and writes `post` with the other posts of a batch of its
    /// session's lane.
    pub(crate) async fn post(&self, post: WaitingPost) -> Reply<Posted> {
        let (reply, answer) = oneshot::channel();
        let session = post.req.session_id;
        let job = Box::new(PostJob {
            post,
            result: None,
            reply,
        });
        self.queue(session, job, answer).await
    }

    async fn queue<T>(
        &self,
        session: SessionId,
        job: Box<dyn Job>,
        answer: oneshot::Receiver<Reply<T>>,
    ) -> Reply<T> {
        let mut h = std::hash::DefaultHasher::new();
        session.hash(&mut h);
        let lane = (h.finish() % self.lanes.len() as u64) as usize;
        if self.lanes[lane].send(job).await.is_err() {
            return Reply::Alone;
        }
        answer.await.unwrap_or(Reply::Alone)
    }
}

async fn lane(
    pool: AnyPool,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    stats: crate::CommitStats,
    cfg: Arc<StoreConfig>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let fate = run_batch(&pool, &mut jobs, &stats, &cfg).await;
        for job in jobs {
            job.finish(&fate);
        }
    }
}

/// Runs one batch: lock, clock, each write in its savepoint, the posts
/// together (in one more savepoint if other writes share the batch), the
/// session rows, commit.
async fn run_batch(
    pool: &AnyPool,
    jobs: &mut [Box<dyn Job>],
    stats: &crate::CommitStats,
    cfg: &StoreConfig,
) -> Fate {
    let mut ids: Vec<String> = jobs.iter().map(|j| j.session().to_string()).collect();
    ids.sort();
    ids.dedup();
    let (posts, writes): (Vec<usize>, Vec<usize>) =
        (0..jobs.len()).partition(|&i| jobs[i].post().is_some());
    let ran: R<Option<sqlx::Transaction<'static, sqlx::Any>>> = async {
        let mut c = Conn::Batch(Box::new(PgBatch::new(pool.begin().await?)));
        let now = lock_batch(&mut c, &ids).await?;
        // One thing in the batch needs no savepoint: if it fails, nothing
        // of the transaction is kept.
        let alone = writes.len() + usize::from(!posts.is_empty()) == 1;
        for &i in &writes {
            if alone {
                if !jobs[i].run(&mut c, now).await {
                    return Ok(None);
                }
                continue;
            }
            // Savepoints are not released: a released one still holds its
            // subtransaction id until the commit, so releasing would only
            // cost a round trip. Each new one shadows the last of the same
            // name, which is the one a failure rolls back to.
            savepoint(&mut c).await?;
            if !jobs[i].run(&mut c, now).await {
                roll_back(&mut c).await?;
            }
        }
        if !posts.is_empty() {
            if !alone {
                savepoint(&mut c).await?;
            }
            let waiting: Vec<WaitingPost> = posts
                .iter()
                .filter_map(|&i| jobs[i].post().cloned())
                .collect();
            match post_all(&mut c, now, cfg, &waiting).await {
                Ok(answers) => {
                    for (&i, answer) in posts.iter().zip(answers) {
                        jobs[i].answer(answer);
                    }
                }
                // The posts go back to their callers, to run alone.
                Err(_) if alone => return Ok(None),
                Err(_) => roll_back(&mut c).await?,
            }
        }
        write_deferred_sessions(&mut c).await?;
        match c {
            Conn::Batch(b) => Ok(Some(b.tx)),
            _ => Ok(None),
        }
    }
    .await;
    let tx = match ran {
        Ok(Some(tx)) => tx,
        Ok(None) => return Fate::Settled,
        Err(_) => return Fate::Void,
    };
    let committing = Instant::now();
    match tx.commit().await {
        Ok(()) => {
            stats.observe(committing.elapsed().as_secs_f64(), jobs.len());
            Fate::Settled
        }
        Err(e) => Fate::CommitFailed {
            retry: retryable(&e),
            why: e.to_string(),
        },
    }
}

/// Starts a write's savepoint.
async fn savepoint(c: &mut Conn) -> R<()> {
    c.execute("SAVEPOINT job", &[]).await?;
    if let Conn::Batch(b) = c {
        b.begin_write();
    }
    Ok(())
}

/// Rolls the write back to its savepoint, session rows in memory included.
async fn roll_back(c: &mut Conn) -> R<()> {
    c.execute("ROLLBACK TO SAVEPOINT job", &[]).await?;
    if let Conn::Batch(b) = c {
        b.undo_write();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::args;
    use sqlx::any::AnyPoolOptions;

    /// A body that inserts `v` into the scratch table, moves the session's
    /// counter by `by` (saved in memory, written before the commit) and
    /// then does what `then` says, returning its transaction's id.
    fn body(session: SessionId, v: &'static str, by: i64, then: &'static str) -> Body<i64> {
        Arc::new(move |c: &mut Conn, _now| {
            Box::pin(async move {
                c.execute("INSERT INTO scratch (v) VALUES ($1)", &args![v])
                    .await?;
                crate::sql::bump_last_seq(c, session, by).await?;
                match then {
                    "refuse" => Err(StoreError::SessionBusy {
                        turn_id: baton_core::TurnId::new(),
                    }
                    .into()),
                    "break" => {
                        // A statement PostgreSQL refuses: the transaction is
                        // aborted until rolled back to the savepoint.
                        c.execute("INSERT INTO no_such_table VALUES (1)", &[])
                            .await?;
                        Ok(0)
                    }
                    _ => c.scalar("SELECT CAST(txid_current() AS BIGINT)", &[]).await,
                }
            })
        })
    }

    /// A write holding its session's lane: every write queued meanwhile
    /// waits for it and forms the next batch with the others.
    struct Hold {
        open: oneshot::Sender<()>,
        held: tokio::task::JoinHandle<Reply<i64>>,
    }

    /// Holds `session`'s lane with a write (which stores `insert` in the
    /// scratch table, if given) once it runs.
    async fn hold(lanes: &Lanes, session: SessionId, insert: Option<&'static str>) -> Hold {
        let (open, gate) = oneshot::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let gate = Arc::new(tokio::sync::Mutex::new(Some((started, gate))));
        let body: Body<i64> = Arc::new(move |c: &mut Conn, _now| {
            let gate = gate.clone();
            Box::pin(async move {
                if let Some((started, g)) = gate.lock().await.take() {
                    let _ = started.send(());
                    let _ = g.await;
                }
                if let Some(v) = insert {
                    c.execute("INSERT INTO scratch (v) VALUES ($1)", &args![v])
                        .await?;
                }
                Ok(0)
            })
        });
        let lanes2 = lanes.clone();
        let held = tokio::spawn(async move { lanes2.write(session, body).await });
        running.await.expect("the holding write runs");
        Hold { open, held }
    }

    impl Hold {
        /// Lets the lane go once `queued` writes wait in it (the lane has
        /// only this one queue); the holding write must have committed.
        async fn release(self, lanes: &Lanes, queued: usize) {
            while LANE_DEPTH - lanes.lanes[0].capacity() < queued {
                tokio::task::yield_now().await;
            }
            self.open.send(()).expect("the holding write waits");
            assert!(matches!(
                self.held.await.expect("joined"),
                Reply::Done(Ok(0))
            ));
        }
    }

    #[tokio::test]
    async fn a_refused_write_fails_alone_and_its_batch_commits() {
        let Some(url) = baton_testkit::pg::database_url("the PostgreSQL lanes") else {
            return;
        };
        let schema = baton_testkit::pg::PgSchema::create(&url).await;
        // The store's own schema (its lanes are not used here), and one
        // session in it.
        let store = crate::SqlStore::open_postgres(schema.url(), crate::StoreConfig::default())
            .await
            .expect("open the store");
        let session = crate::Store::create_session(
            &store,
            crate::CreateSession {
                owner: "o".into(),
                agent: "demo".into(),
                policy: baton_core::Policy::Queue,
                metadata: serde_json::json!({}),
                idempotency_key: None,
                fingerprint: "{}".into(),
                message: None,
                permission: None,
                node: "n".into(),
                debounce_ms: 0,
            },
        )
        .await
        .expect("a session")
        .session
        .id;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(schema.url())
            .await
            .expect("connect to PostgreSQL");
        sqlx::raw_sql("CREATE TABLE scratch (v TEXT NOT NULL)")
            .execute(&pool)
            .await
            .expect("a scratch table");
        let stats = crate::CommitStats::default();
        let lanes = Lanes::start(&pool, 1, stats, crate::StoreConfig::default());

        // The first write holds the lane until the others are queued behind
        // it, so they form the next batch together.
        let first = hold(&lanes, session, Some("first")).await;
        let spawn = |b: Body<i64>| {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.write(session, b).await })
        };
        let rest: Vec<_> = [
            body(session, "ok-1", 1, "ok"),
            body(session, "refused", 100, "refuse"),
            body(session, "broken", 1000, "break"),
            body(session, "ok-2", 1, "ok"),
        ]
        .into_iter()
        .map(spawn)
        .collect();
        // All four queued (the first write's batch still holds the lane).
        first.release(&lanes, 4).await;
        let mut got = Vec::new();
        for r in rest {
            got.push(r.await.expect("joined"));
        }
        let txid = |r: &Reply<i64>| match r {
            Reply::Done(Ok(t)) => *t,
            _ => panic!("expected a committed write"),
        };
        let (a, b) = (txid(&got[0]), txid(&got[3]));
        assert_eq!(a, b, "the two good writes shared one transaction");
        assert!(matches!(
            got[1],
            Reply::Done(Err(StoreError::SessionBusy { .. }))
        ));
        assert!(matches!(got[2], Reply::Done(Err(_))));
        let mut kept: Vec<String> = sqlx::query_scalar("SELECT v FROM scratch")
            .fetch_all(&pool)
            .await
            .expect("read back");
        kept.sort();
        assert_eq!(kept, ["first", "ok-1", "ok-2"]);
        // The session row holds the two good writes' changes, written once
        // for the batch; the failed writes' changes went with their
        // savepoints.
        let last: i64 = sqlx::query_scalar("SELECT last_seq FROM sessions WHERE id = $1")
            .bind(session.to_string())
            .fetch_one(&pool)
            .await
            .expect("read the session");
        assert_eq!(last, 2);
        pool.close().await;
    }

    /// Opens a store on `url` (for its schema) and one session in it, busy
    /// with the turn its first message started.
    async fn busy_session(url: &str) -> (crate::SqlStore, SessionId) {
        let store = crate::SqlStore::open_postgres(url, crate::StoreConfig::default())
            .await
            .expect("open the store");
        let created = crate::Store::create_session(
            &store,
            crate::CreateSession {
                owner: "o".into(),
                agent: "demo".into(),
                policy: baton_core::Policy::Queue,
                metadata: serde_json::json!({}),
                idempotency_key: None,
                fingerprint: "{}".into(),
                message: Some("first".into()),
                permission: None,
                node: "n".into(),
                debounce_ms: 0,
            },
        )
        .await
        .expect("a session");
        (store, created.session.id)
    }

    #[tokio::test]
    async fn posts_of_a_batch_are_decided_together_and_a_refused_one_fails_alone() {
        use baton_core::{DispositionType, Policy};
        let Some(url) = baton_testkit::pg::database_url("the PostgreSQL lanes") else {
            return;
        };
        let schema = baton_testkit::pg::PgSchema::create(&url).await;
        let (_store, session) = busy_session(schema.url()).await;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(schema.url())
            .await
            .expect("connect to PostgreSQL");
        let cfg = crate::StoreConfig {
            queue_capacity: 3,
            ..crate::StoreConfig::default()
        };
        let lanes = Lanes::start(&pool, 1, crate::CommitStats::default(), cfg);

        // A write holds the lane until every post is queued behind it.
        let holder = hold(&lanes, session, None).await;
        let post = |owner: &str, content: &str, policy: Option<Policy>, key: Option<&str>| {
            let lanes = lanes.clone();
            let req = crate::PostMessage {
                owner: owner.into(),
                session_id: session,
                content: content.into(),
                policy,
                idempotency_key: key.map(str::to_owned),
                node: "n".into(),
                mid_turn_agents: Vec::new(),
            };
            tokio::spawn(async move {
                let waiting = WaitingPost {
                    req: Arc::new(req),
                    run_here: false,
                };
                match lanes.post(waiting).await {
                    Reply::Done(r) => r,
                    Reply::Alone => panic!("a post of the batch was handed back"),
                }
            })
        };
        let posts = vec![
            post("o", "one", None, Some("a")),
            post("o", "busy?", Some(Policy::Reject), None),
            post("o", "one", None, Some("a")),
            post("o", "two", None, Some("a")),
            post("o", "e", None, None),
            post("o", "f", None, None),
            post("o", "full", None, None),
            post("someone else", "x", None, None),
        ];
        holder.release(&lanes, posts.len()).await;
        let mut got = Vec::new();
        for p in posts {
            got.push(p.await.expect("joined"));
        }
        let queued = |r: &crate::Result<crate::Posted>, seq: u64, position: u64| match r {
            Ok(p) => {
                assert_eq!(p.entry.seq, seq);
                assert_eq!(p.disposition.kind, DispositionType::Queued);
                assert_eq!(p.disposition.position, Some(position));
                p.replayed
            }
            Err(e) => panic!("expected seq {seq} queued, got {e:?}"),
        };
        assert!(!queued(&got[0], 3, 1));
        assert!(matches!(got[1], Err(StoreError::SessionBusy { .. })));
        assert!(queued(&got[2], 3, 1), "a retry in the batch replays");
        assert!(matches!(got[3], Err(StoreError::IdempotencyConflict)));
        assert!(!queued(&got[4], 4, 2));
        assert!(!queued(&got[5], 5, 3));
        assert!(matches!(got[6], Err(StoreError::QueueFull { capacity: 3 })));
        assert!(matches!(got[7], Err(StoreError::NotFound)));

        // The three messages were written by one statement of one
        // transaction, and the session row holds them.
        let rows: Vec<(i64, Option<String>, String)> = sqlx::query_as(
            "SELECT seq, content, xmin::text FROM entries WHERE session_id = $1 ORDER BY seq",
        )
        .bind(session.to_string())
        .fetch_all(&pool)
        .await
        .expect("read the log");
        let contents: Vec<&str> = rows.iter().map(|r| r.1.as_deref().unwrap_or("")).collect();
        assert_eq!(contents[2..], ["one", "e", "f"]);
        assert!(rows[2..].iter().all(|r| r.2 == rows[2].2));
        let (last, waiting): (i64, i64) =
            sqlx::query_as("SELECT last_seq, waiting_count FROM sessions WHERE id = $1")
                .bind(session.to_string())
                .fetch_one(&pool)
                .await
                .expect("read the session");
        assert_eq!((last, waiting), (5, 3));
        pool.close().await;
    }

    /// A commit that fails after every write of the batch succeeded: each
    /// write hears of it (`503`), or, when PostgreSQL asks for a retry, is
    /// handed back to run alone; nothing of the batch is kept.
    #[tokio::test]
    async fn a_failed_commit_fails_every_write_of_its_batch_or_hands_them_back() {
        let Some(url) = baton_testkit::pg::database_url("the PostgreSQL lanes") else {
            return;
        };
        let schema = baton_testkit::pg::PgSchema::create(&url).await;
        let (_store, session) = busy_session(schema.url()).await;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(schema.url())
            .await
            .expect("connect to PostgreSQL");
        // A deferred constraint trigger runs at the commit, after every
        // statement succeeded: it refuses the commit with the SQLSTATE the
        // row's value names.
        sqlx::raw_sql(
            "CREATE TABLE scratch (v TEXT NOT NULL);
             CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.v LIKE 'fail:%' THEN
                     RAISE EXCEPTION 'commit refused' USING ERRCODE = substr(NEW.v, 6, 5);
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON scratch
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit();",
        )
        .execute(&pool)
        .await
        .expect("a scratch table that refuses commits");
        let lanes = Lanes::start(
            &pool,
            1,
            crate::CommitStats::default(),
            crate::StoreConfig::default(),
        );

        for (code, retry) in [("P0001", false), ("40001", true)] {
            let holder = hold(&lanes, session, None).await;
            let spawn = |b: Body<i64>| {
                let lanes = lanes.clone();
                tokio::spawn(async move { lanes.write(session, b).await })
            };
            let fail: &'static str = if retry { "fail:40001" } else { "fail:P0001" };
            let rest: Vec<_> = [
                body(session, "ok-1", 1, "ok"),
                body(session, fail, 1, "ok"),
                body(session, "ok-2", 1, "ok"),
            ]
            .into_iter()
            .map(spawn)
            .collect();
            holder.release(&lanes, 3).await;
            for r in rest {
                match (r.await.expect("joined"), retry) {
                    (Reply::Alone, true) => {}
                    (Reply::Done(Err(StoreError::Unavailable(why))), false) => {
                        assert!(why.contains("commit failed"), "{why}");
                    }
                    (other, _) => panic!(
                        "SQLSTATE {code} at the commit: got {}",
                        match other {
                            Reply::Alone => "handed back".to_owned(),
                            Reply::Done(r) => format!("{:?}", r.map(|_| ())),
                        }
                    ),
                }
            }
            let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM scratch")
                .fetch_one(&pool)
                .await
                .expect("read back");
            assert_eq!(kept, 0, "nothing of a batch whose commit failed is kept");
        }
        let last: i64 = sqlx::query_scalar("SELECT last_seq FROM sessions WHERE id = $1")
            .bind(session.to_string())
            .fetch_one(&pool)
            .await
            .expect("read the session");
        assert_eq!(last, 2, "the session row is as the first message left it");
        pool.close().await;
    }
}
