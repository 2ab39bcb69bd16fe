//! The embedded store's single writer and its group commit.
//!
//! SQLite allows one writer at a time, so every write goes through this one
//! task and its one connection (reads use a separate pool; WAL lets them run
//! beside it). Jobs that arrive while a transaction is in flight queue in the
//! channel; the next round takes all of them (up to [`MAX_BATCH`]) into one
//! transaction and one `fsync`. Each job runs inside its own savepoint, so a
//! job that fails (a rejected message, a stale epoch) is rolled back alone,
//! and each caller is told its own result only after the commit (I2).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use sqlx::AnyConnection;
use tokio::sync::mpsc;

/// How many jobs share one transaction at most.
pub(crate) const MAX_BATCH: usize = 512;

/// What a job leaves to do once its transaction's fate is known.
pub(crate) struct Completion {
    /// Whether the job succeeded (its savepoint is kept) or not (rolled back).
    pub ok: bool,
    /// Delivers the job's result, or the commit's failure, to its caller.
    pub finish: Box<dyn FnOnce(Option<String>) + Send>,
}

/// A write: runs on the writer's connection inside the batch transaction,
/// with the store clock's reading.
pub(crate) type Job =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection, i64) -> BoxFuture<'c, Completion> + Send>;

/// The store's clock for the embedded store: wall-clock microseconds, never
/// going backwards (a turn never starts before the previous one ended).
#[derive(Debug, Default)]
pub(crate) struct Clock {
    last: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let prev = self.last.fetch_max(sys, Ordering::AcqRel);
        prev.max(sys)
    }
}

/// Runs the writer until every sender is dropped.
pub(crate) async fn run(
    mut conn: AnyConnection,
    mut jobs: mpsc::Receiver<Job>,
    clock: std::sync::Arc<Clock>,
) {
    let clock = &*clock;
    while let Some(first) = jobs.recv().await {
        let mut batch: Vec<Job> = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch, clock).await;
    }
    // Every handle is gone: close cleanly so the WAL is checkpointed.
    if let Err(e) = sqlx::Connection::close(conn).await {
        tracing::warn!(error = %e, "closing the writer connection");
    }
}

// Boxed with an explicit `Send` so the compiler checks it at concrete
// lifetimes (an `async fn` here trips the higher-ranked `Send` inference).
fn exec<'a>(conn: &'a mut AnyConnection, sql: &'static str) -> BoxFuture<'a, Result<(), String>> {
    let run = sqlx::Executor::execute(conn, sql);
    Box::pin(async move { run.await.map(|_| ()).map_err(|e| format!("{sql}: {e}")) })
}

fn run_batch<'a>(
    conn: &'a mut AnyConnection,
    batch: Vec<Job>,
    clock: &'a Clock,
) -> BoxFuture<'a, ()> {
    Box::pin(run_batch_inner(conn, batch, clock))
}

async fn run_batch_inner(conn: &mut AnyConnection, batch: Vec<Job>, clock: &Clock) {
    let single = batch.len() == 1;
    let mut done: Vec<Completion> = Vec::with_capacity(batch.len());
    let mut failure = exec(conn, "BEGIN IMMEDIATE").await.err();
    for job in batch {
        if failure.is_some() {
            // The transaction is unusable. Dropping the job unrun drops its
            // reply channel, so its caller is told the write did not happen.
            drop(job);
            continue;
        }
        if !single {
            if let Err(e) = exec(conn, "SAVEPOINT job").await {
                failure = Some(e);
                continue;
            }
        }
        let c = job(conn, clock.now()).await;
        if !single {
            let undo = if c.ok {
                Ok(())
            } else {
                exec(conn, "ROLLBACK TO job").await
            };
            if let Err(e) = undo.and(exec(conn, "RELEASE job").await) {
                failure = Some(e);
            }
        } else if !c.ok {
            if let Err(e) = exec(conn, "ROLLBACK").await {
                tracing::error!(error = %e, "rolling back a failed write");
            }
            (c.finish)(None);
            return;
        }
        done.push(c);
    }
    let outcome = match failure {
        Some(e) => {
            let _ = exec(conn, "ROLLBACK").await;
            Some(e)
        }
        None => exec(conn, "COMMIT").await.err(),
    };
    if let Some(e) = &outcome {
        tracing::error!(error = %e, "group commit failed; every write in the batch is refused");
        let _ = exec(conn, "ROLLBACK").await;
    }
    for c in done {
        (c.finish)(outcome.clone());
    }
}
