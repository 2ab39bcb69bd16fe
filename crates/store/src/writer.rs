//! The embedded store's single writer and its group commit.
//!
//! SQLite allows one writer at a time, so every write goes through this one
//! thread and its one connection (reads use a separate pool; WAL lets them
//! run beside it). Jobs that arrive while a transaction is in flight queue in
//! the channel; the next round takes all of them (up to [`MAX_BATCH`]) into
//! one transaction and one `fsync`. Each job runs inside its own savepoint,
//! so a job that fails (a rejected message, a stale epoch) is rolled back
//! alone, and each caller is told its own result only after the commit (I2).
//!
//! The connection is synchronous (`rusqlite`, statements cached), so a job's
//! future completes on its first poll; the thread polls it once and never
//! blocks an async runtime.
//!
//! Checkpoints (copying the WAL back into the database file) run on a second
//! thread and connection, [`checkpointer`], so the writer never stalls on one:
//! the writer's automatic checkpoints are off.

use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::db::Conn;

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
    Box<dyn for<'c> FnOnce(&'c mut Conn, i64) -> BoxFuture<'c, Completion> + Send>;

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

/// Past this many WAL pages (64 MiB at 4 KiB) the checkpointer makes room by
/// waiting for the writer once; below it, it never blocks the writer.
const WAL_RESTART_PAGES: i64 = 16_384;

/// At most one checkpoint per this interval.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs the writer on the current (dedicated) thread until every sender is
/// dropped; each commit nudges the checkpointer.
pub(crate) fn run(
    conn: rusqlite::Connection,
    mut jobs: mpsc::Receiver<Job>,
    clock: std::sync::Arc<Clock>,
    committed: std::sync::mpsc::SyncSender<()>,
) {
    let mut conn = Conn::Lite(conn);
    while let Some(first) = jobs.blocking_recv() {
        let mut batch: Vec<Job> = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch, &clock);
        // A nudge already pending is as good as a new one.
        let _ = committed.try_send(());
    }
    // Every handle is gone: dropping the connection (and `committed`, which
    // stops the checkpointer after a last full checkpoint) closes it.
}

/// Keeps the WAL short beside the writer: a `PASSIVE` checkpoint after
/// commits, at most every [`CHECKPOINT_EVERY`] (it copies what it can without taking any lock a writer or reader
/// needs); if the WAL still grew past [`WAL_RESTART_PAGES`] — a writer that
/// never pauses never lets SQLite rewind it — a `RESTART` checkpoint, which
/// waits for the writer's current transaction once. Ends with a `TRUNCATE`
/// checkpoint when the writer is gone.
pub(crate) fn checkpointer(conn: rusqlite::Connection, commits: std::sync::mpsc::Receiver<()>) {
    let checkpoint = |mode: &str| -> rusqlite::Result<i64> {
        // Columns: busy, frames in the WAL, frames checkpointed.
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1))
    };
    while commits.recv().is_ok() {
        // Paced: one checkpoint copies a page once however many commits
        // changed it since the last, and its syncs of the database file stay
        // off the disk the writer's commits are waiting on most of the time.
        std::thread::sleep(CHECKPOINT_EVERY);
        let _ = commits.try_recv();
        let outcome = checkpoint("PASSIVE").and_then(|frames| {
            if frames > WAL_RESTART_PAGES {
                checkpoint("RESTART")
            } else {
                Ok(frames)
            }
        });
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "checkpointing the embedded store's WAL");
        }
    }
    if let Err(e) = checkpoint("TRUNCATE") {
        tracing::warn!(error = %e, "final checkpoint of the embedded store's WAL");
    }
}

fn exec(conn: &mut Conn, sql: &'static str) -> Result<(), String> {
    match conn {
        Conn::Lite(c) => c
            .prepare_cached(sql)
            .and_then(|mut st| st.raw_execute())
            .map(|_| ())
            .map_err(|e| format!("{sql}: {e}")),
        _ => Err(format!("{sql}: the writer has no SQLite connection")),
    }
}

/// Runs a job: its future completes on the first poll, because every
/// statement on the writer's connection is synchronous.
fn run_job(conn: &mut Conn, job: Job, now: i64) -> Option<Completion> {
    let mut fut = job(conn, now);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(c) => Some(c),
        Poll::Pending => {
            // Unreachable by construction; dropping the future drops the
            // caller's reply channel, so the caller is told it failed.
            tracing::error!("a write job waited on the embedded store's writer; refused");
            None
        }
    }
}

fn run_batch(conn: &mut Conn, batch: Vec<Job>, clock: &Clock) {
    let single = batch.len() == 1;
    let mut done: Vec<Completion> = Vec::with_capacity(batch.len());
    let mut failure = exec(conn, "BEGIN IMMEDIATE").err();
    for job in batch {
        if failure.is_some() {
            // The transaction is unusable. Dropping the job unrun drops its
            // reply channel, so its caller is told the write did not happen.
            drop(job);
            continue;
        }
        if !single {
            if let Err(e) = exec(conn, "SAVEPOINT job") {
                failure = Some(e);
                continue;
            }
        }
        let c = run_job(conn, job, clock.now());
        let ok = c.as_ref().is_some_and(|c| c.ok);
        if !single {
            let undo = if ok {
                Ok(())
            } else {
                exec(conn, "ROLLBACK TO job")
            };
            if let Err(e) = undo.and(exec(conn, "RELEASE job")) {
                failure = Some(e);
            }
        } else if !ok {
            if let Err(e) = exec(conn, "ROLLBACK") {
                tracing::error!(error = %e, "rolling back a failed write");
            }
            if let Some(c) = c {
                (c.finish)(None);
            }
            return;
        }
        done.extend(c);
    }
    let outcome = match failure {
        Some(e) => {
            let _ = exec(conn, "ROLLBACK");
            Some(e)
        }
        None => exec(conn, "COMMIT").err(),
    };
    if let Some(e) = &outcome {
        tracing::error!(error = %e, "group commit failed; every write in the batch is refused");
        let _ = exec(conn, "ROLLBACK");
    }
    for c in done {
        (c.finish)(outcome.clone());
    }
}
