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
//! earlier than the commit it waited for. Each write then runs in a
//! savepoint: one that fails (a rejected message, a stale epoch, a
//! conflict) is rolled back alone and the others commit. A write reads its
//! session's row from memory and saves it there; the rows are written with
//! one statement before the commit (see [`crate::db::PgBatch`]). One
//! commit, and so one flush of the WAL, for the whole batch.
//!
//! A write that met a conflict PostgreSQL asks to retry (a concurrent first
//! use of an idempotency key, a deadlock with a write outside the lanes),
//! or whose batch could not be run, is handed back to its caller, who runs
//! it alone with the usual retries: batching never turns a retry into an
//! error.
//!
//! A batch is at most [`MAX_BATCH`] writes because each write's savepoint
//! is a subtransaction, and past 64 of them a transaction overflows the
//! per-backend cache that other sessions' snapshots consult.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use baton_core::SessionId;
use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use crate::db::{Conn, Fail, PgBatch, R};
use crate::sql::{lock_batch, retryable, unfail, write_deferred_sessions};
use crate::{Result, StoreError};

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
    /// Runs the body and keeps its result; whether it succeeded.
    fn run<'a>(&'a mut self, c: &'a mut Conn, now: i64) -> BoxFuture<'a, bool>;
    /// Delivers the result once the batch's fate is known.
    fn finish(self: Box<Self>, fate: &Fate);
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
        let reply = match (self.result, fate) {
            (None, _) | (_, Fate::Void) => Reply::Alone,
            // Rolled back to its savepoint: its own failure is the answer,
            // unless PostgreSQL asks for a retry.
            (Some(Err(Fail::Db(e))), _) if retryable(&e) => Reply::Alone,
            (Some(Err(f)), _) => Reply::Done(Err(unfail(f))),
            (Some(Ok(v)), Fate::Settled) => Reply::Done(Ok(v)),
            (Some(Ok(_)), Fate::CommitFailed { retry: true, .. }) => Reply::Alone,
            (Some(Ok(_)), Fate::CommitFailed { why, .. }) => Reply::Done(Err(
                StoreError::Unavailable(format!("commit failed: {why}")),
            )),
        };
        let _ = self.reply.send(reply);
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
    pub(crate) fn start(pool: &AnyPool, n: usize, stats: crate::CommitStats) -> Self {
        let lanes: Vec<_> = (0..n.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(LANE_DEPTH);
                tokio::spawn(lane(pool.clone(), rx, stats.clone()));
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
        let mut h = std::hash::DefaultHasher::new();
        session.hash(&mut h);
        let lane = (h.finish() % self.lanes.len() as u64) as usize;
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Write {
            session,
            body,
            result: None,
            reply,
        });
        if self.lanes[lane].send(job).await.is_err() {
            return Reply::Alone;
        }
        answer.await.unwrap_or(Reply::Alone)
    }
}

async fn lane(pool: AnyPool, mut rx: mpsc::Receiver<Box<dyn Job>>, stats: crate::CommitStats) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let fate = run_batch(&pool, &mut jobs, &stats).await;
        for job in jobs {
            job.finish(&fate);
        }
    }
}

/// Runs one batch: lock, clock, each write in its savepoint, the session
/// rows, commit.
async fn run_batch(pool: &AnyPool, jobs: &mut [Box<dyn Job>], stats: &crate::CommitStats) -> Fate {
    let mut ids: Vec<String> = jobs.iter().map(|j| j.session().to_string()).collect();
    ids.sort();
    ids.dedup();
    let ran: R<Option<sqlx::Transaction<'static, sqlx::Any>>> = async {
        let mut c = Conn::Batch(Box::new(PgBatch::new(pool.begin().await?)));
        let now = lock_batch(&mut c, &ids).await?;
        if let [job] = jobs {
            // A batch of one needs no savepoint: if it fails, nothing of
            // the transaction is kept.
            if !job.run(&mut c, now).await {
                return Ok(None);
            }
        } else {
            // Savepoints are not released: a released one still holds its
            // subtransaction id until the commit, so releasing would only
            // cost a round trip. Each new one shadows the last of the same
            // name, which is the one a failure rolls back to.
            for job in jobs.iter_mut() {
                c.execute("SAVEPOINT job", &[]).await?;
                if let Conn::Batch(b) = &mut c {
                    b.begin_write();
                }
                if !job.run(&mut c, now).await {
                    c.execute("ROLLBACK TO SAVEPOINT job", &[]).await?;
                    if let Conn::Batch(b) = &mut c {
                        b.undo_write();
                    }
                }
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

    #[tokio::test]
    async fn a_refused_write_fails_alone_and_its_batch_commits() {
        let Some(url) = crate::testing::database_url("the PostgreSQL lanes") else {
            return;
        };
        let schema = crate::testing::PgSchema::create(&url).await;
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
        let lanes = Lanes::start(&pool, 1, stats);

        // The first write holds the lane until the others are queued behind
        // it, so they form the next batch together.
        let (open, gate) = tokio::sync::oneshot::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let gate = Arc::new(tokio::sync::Mutex::new(Some((started, gate))));
        let first: Body<i64> = Arc::new(move |c: &mut Conn, _now| {
            let gate = gate.clone();
            Box::pin(async move {
                if let Some((started, g)) = gate.lock().await.take() {
                    let _ = started.send(());
                    let _ = g.await;
                }
                c.execute("INSERT INTO scratch (v) VALUES ('first')", &[])
                    .await?;
                Ok(0)
            })
        });
        let spawn = |b: Body<i64>| {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.write(session, b).await })
        };
        let first = spawn(first);
        running.await.expect("the first write runs");
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
        while LANE_DEPTH - lanes.lanes[0].capacity() < 4 {
            tokio::task::yield_now().await;
        }
        open.send(()).expect("the first write waits");
        assert!(matches!(first.await.expect("joined"), Reply::Done(Ok(0))));
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
}
