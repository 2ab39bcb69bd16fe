//! The embedded store's single writer and its group commit.
//!
//! SQLite allows one writer at a time, so every write goes through this one
//! thread and its one connection (reads use a separate pool; WAL lets them
//! run beside it). Jobs that arrive while a transaction is in flight queue in
//! the channel; the next round takes all of them (up to [`MAX_BATCH`]) into
//! one transaction and one `fsync`, and each caller is told its own result
//! only after the commit (I2). A job that fails (a rejected message, a stale
//! epoch) fails before it writes, so jobs run without savepoints; should one
//! fail having written, the batch is rolled back and replayed without it,
//! each job in its own savepoint.
//!
//! The connection is synchronous (`rusqlite`, statements cached), so a job's
//! future completes on its first poll ([`complete`]); the thread never blocks
//! an async runtime.
//!
//! Checkpoints (copying the WAL back into the database file) run on a second
//! thread and connection, [`checkpointer`], so the writer seldom stalls on
//! one: the writer's automatic checkpoints are off. Under a load that never
//! pauses, that is not enough to keep the WAL short (see [`WAL_CATCH_UP_PAGES`]):
//! then the writer, between two batches, finishes the checkpointer's work.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use std::future::Future;
use tokio::sync::mpsc;

use crate::db::{Conn, Lite};

/// How many jobs share one transaction at most.
pub(crate) const MAX_BATCH: usize = 512;

/// A write: a transaction body the writer runs inside its batch
/// transaction. It can run more than once (a batch is replayed when another
/// job in it fails after writing); only the last run's result is delivered.
pub(crate) trait Job: Send {
    /// Runs the body with the store clock's reading and keeps its result;
    /// whether it succeeded. `None`: the body waited, which a body on the
    /// writer's synchronous connection never does; it counts as a failure.
    fn run(&mut self, conn: &mut Conn, now: i64) -> Option<bool>;

    /// Delivers the kept result once the transaction's fate is known:
    /// `commit_error` is why it did not commit, if it did not.
    fn finish(self: Box<Self>, commit_error: Option<String>);
}

/// Polls a future that never waits (every statement on the writer's
/// connection is synchronous) to its end.
pub(crate) fn complete<T>(fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => {
            tracing::error!("a write job waited on the embedded store's writer; refused");
            None
        }
    }
}

/// The store's clock for the embedded store: wall-clock microseconds, never
/// going backwards (a turn never starts before the previous one ended), not
/// even across a restart (it starts after the latest time the file holds).
#[derive(Debug, Default)]
pub(crate) struct Clock {
    last: AtomicI64,
}

impl Clock {
    /// A clock that never reads earlier than `last` (the latest time the
    /// file holds: a previous run's clock may have been ahead of this one's).
    pub fn after(last: i64) -> Self {
        Self {
            last: AtomicI64::new(last),
        }
    }

    pub fn now(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let prev = self.last.fetch_max(sys, Ordering::AcqRel);
        prev.max(sys)
    }
}

/// Past this many WAL pages (64 MiB at 4 KiB) the writer itself finishes a
/// checkpoint between two batches (the default of
/// [`StoreConfig::wal_catch_up_pages`](crate::StoreConfig::wal_catch_up_pages)).
///
/// SQLite rewinds the WAL only when a write transaction begins with every
/// frame already copied back. A checkpointer beside a writer that never
/// pauses never gets there: each pass copies what was committed when it
/// began, and the writer has committed more by the time it ends. Waiting for
/// the writer's lock instead (a `RESTART` checkpoint) starves: the writer
/// takes the lock again between two of the busy handler's polls. Measured:
/// the WAL grew past 1 GiB in 10 s of 256 writers, and went on growing. The
/// writer's own passive checkpoint copies only what was committed since the
/// checkpointer's last pass, and the next batch starts the WAL over.
pub(crate) const WAL_CATCH_UP_PAGES: u32 = 16_384;

/// At most one checkpoint per this interval.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Batches at most this size are answered by the writer itself; larger ones
/// by the replies thread, so that waking hundreds of callers (a cross-thread
/// wake each) overlaps the next batch instead of delaying it, while a lone
/// caller is not made to wait for one more thread hop.
const INLINE_REPLIES: usize = 4;

/// A settled batch: its jobs, and why it did not commit, if it did not.
type Settled = (Vec<Box<dyn Job>>, Option<String>);

/// Runs the writer on the current (dedicated) thread until every sender is
/// dropped; each commit nudges the checkpointer.
pub(crate) fn run(
    conn: rusqlite::Connection,
    mut jobs: mpsc::Receiver<Box<dyn Job>>,
    clock: Arc<Clock>,
    committed: std::sync::mpsc::SyncSender<()>,
    catch_up: Arc<AtomicBool>,
    stats: crate::CommitStats,
) {
    let mut conn = Conn::Lite(Lite::new(conn));
    std::thread::scope(|scope| {
        let (replies, settled) = std::sync::mpsc::channel::<Settled>();
        let spawned = std::thread::Builder::new()
            .name("baton-replies".into())
            .spawn_scoped(scope, move || {
                for (batch, outcome) in settled {
                    reply(batch, &outcome);
                }
            });
        let replies = match spawned {
            Ok(_) => Some(replies),
            Err(e) => {
                tracing::warn!(error = %e, "no replies thread; the writer answers every caller itself");
                None
            }
        };
        while let Some(first) = jobs.blocking_recv() {
            let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let writes = batch.len();
            let started = std::time::Instant::now();
            let (batch, outcome) = run_batch(&mut conn, batch, &clock);
            if outcome.is_none() {
                stats.observe(started.elapsed().as_secs_f64(), writes);
            }
            // A nudge already pending is as good as a new one.
            let _ = committed.try_send(());
            match &replies {
                Some(r) if batch.len() > INLINE_REPLIES => {
                    if let Err(std::sync::mpsc::SendError((batch, outcome))) =
                        r.send((batch, outcome))
                    {
                        reply(batch, &outcome);
                    }
                }
                _ => reply(batch, &outcome),
            }
            // After the replies: the callers need not wait for it.
            if catch_up.swap(false, Ordering::AcqRel) {
                catch_up_wal(&mut conn);
            }
        }
        // Ends the replies thread once it has answered everything.
        drop(replies);
    });
    // Every handle is gone: dropping the connection (and `committed`, which
    // stops the checkpointer after a last full checkpoint) closes it.
}

/// The writer's passive checkpoint, outside any transaction: it copies back
/// what the checkpointer has not, so the next batch can start the WAL over.
fn catch_up_wal(conn: &mut Conn) {
    let done =
        lite(conn).and_then(|l| wal_checkpoint(&l.conn, "PASSIVE").map_err(|e| e.to_string()));
    match done {
        Ok((frames, copied)) => {
            tracing::debug!(frames, copied, "the writer caught the WAL's checkpoint up")
        }
        Err(e) => tracing::warn!(error = %e, "the writer's checkpoint of the embedded store's WAL"),
    }
}

/// A checkpoint of `mode`: the frames in the WAL, and how many of them are
/// now copied back.
fn wal_checkpoint(conn: &rusqlite::Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    // Columns: busy, frames in the WAL, frames checkpointed.
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

fn reply(batch: Vec<Box<dyn Job>>, outcome: &Option<String>) {
    for job in batch {
        job.finish(outcome.clone());
    }
}

/// Keeps the WAL short beside the writer: a `PASSIVE` checkpoint after
/// commits, at most every [`CHECKPOINT_EVERY`] (it copies what it can without
/// taking any lock a writer or reader needs); if the WAL still holds more
/// than `catch_up_pages` ([`WAL_CATCH_UP_PAGES`]), it asks the writer to
/// finish the job (`catch_up`). Ends with a `TRUNCATE` checkpoint when the
/// writer is gone.
pub(crate) fn checkpointer(
    conn: rusqlite::Connection,
    commits: std::sync::mpsc::Receiver<()>,
    catch_up: Arc<AtomicBool>,
    catch_up_pages: i64,
) {
    while commits.recv().is_ok() {
        // Paced: one checkpoint copies a page once however many commits
        // changed it since the last, and its syncs of the database file stay
        // off the disk the writer's commits are waiting on most of the time.
        std::thread::sleep(CHECKPOINT_EVERY);
        let _ = commits.try_recv();
        match wal_checkpoint(&conn, "PASSIVE") {
            Ok((frames, _)) if frames > catch_up_pages => catch_up.store(true, Ordering::Release),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checkpointing the embedded store's WAL"),
        }
    }
    if let Err(e) = wal_checkpoint(&conn, "TRUNCATE") {
        tracing::warn!(error = %e, "final checkpoint of the embedded store's WAL");
    }
}

fn exec(conn: &mut Conn, sql: &'static str) -> Result<(), String> {
    lite(conn)?
        .conn
        .prepare_cached(sql)
        .and_then(|mut st| st.raw_execute())
        .map(|_| ())
        .map_err(|e| format!("{sql}: {e}"))
}

/// `ROLLBACK` or `ROLLBACK TO`: whatever the undone writes left in the
/// writer's memory is not on disk any more, so it is forgotten too.
fn rollback(conn: &mut Conn, sql: &'static str) -> Result<(), String> {
    lite(conn)?.forget_sessions();
    exec(conn, sql)
}

fn lite(conn: &mut Conn) -> Result<&mut Lite, String> {
    match conn {
        Conn::Lite(c) => Ok(c),
        _ => Err("the writer has no SQLite connection".into()),
    }
}

/// Whether the batch transaction is still open (SQLite ends it itself on
/// some errors: an I/O error, a full disk).
fn in_transaction(conn: &mut Conn) -> bool {
    lite(conn).is_ok_and(|l| !l.conn.is_autocommit())
}

/// How a batch's jobs are isolated from one another.
#[derive(Clone, Copy)]
enum Isolation {
    /// No savepoints: a job that fails without having changed a row leaves
    /// nothing to undo, which is how jobs fail (they check, then write).
    /// Savepoints cost every job two statements and a copy of every page it
    /// touches into the sub-journal.
    Optimistic,
    /// A savepoint per job, each failed job rolled back alone: the replay
    /// after a job failed having written.
    Savepoints,
}

/// What one pass over a batch came to.
enum Pass {
    /// Every job ran (or the transaction failed): commit or not, and tell.
    Settled(Option<String>),
    /// Job `i` failed after changing rows, with no savepoint to undo it:
    /// the transaction was rolled back, to be replayed without that job.
    Dirty(usize),
}

/// Runs and commits (or not) one batch; the jobs are answered by the caller.
fn run_batch(conn: &mut Conn, mut batch: Vec<Box<dyn Job>>, clock: &Clock) -> Settled {
    let mut outcome = match pass(conn, &mut batch, clock, Isolation::Optimistic) {
        Pass::Settled(outcome) => outcome,
        Pass::Dirty(i) => {
            // Its result is its own failure; the others run again, in their
            // order, as if it had never been sent.
            let failed = batch.remove(i);
            failed.finish(None);
            match pass(conn, &mut batch, clock, Isolation::Savepoints) {
                Pass::Settled(outcome) => outcome,
                Pass::Dirty(_) => Some("a failed write could not be undone".into()),
            }
        }
    };
    if outcome.is_none() {
        outcome = exec(conn, "COMMIT").err();
    }
    if let Some(e) = &outcome {
        tracing::error!(error = %e, "group commit failed; every write in the batch is refused");
        if in_transaction(conn) {
            let _ = rollback(conn, "ROLLBACK");
        } else if let Ok(l) = lite(conn) {
            // SQLite ended the transaction itself (an I/O error, a full
            // disk): nothing of it is on disk.
            l.forget_sessions();
        }
    }
    (batch, outcome)
}

/// Runs every job of `batch` in one open transaction, left open for the
/// caller to commit, or to roll back if the pass failed.
fn pass(conn: &mut Conn, batch: &mut [Box<dyn Job>], clock: &Clock, iso: Isolation) -> Pass {
    let began = lite(conn).and_then(|l| {
        l.begin()
            .map_err(|e| format!("beginning the batch transaction: {e}"))
    });
    if let Err(e) = began {
        return Pass::Settled(Some(e));
    }
    for (i, job) in batch.iter_mut().enumerate() {
        let step = match iso {
            Isolation::Optimistic => optimistic(conn, job.as_mut(), clock),
            Isolation::Savepoints => isolated(conn, job.as_mut(), clock),
        };
        match step {
            Ok(true) => {}
            Ok(false) => {
                let _ = rollback(conn, "ROLLBACK");
                return Pass::Dirty(i);
            }
            Err(e) => return Pass::Settled(Some(e)),
        }
    }
    Pass::Settled(None)
}

/// Runs a job with no savepoint. `Ok(false)`: it failed having changed rows.
fn optimistic(conn: &mut Conn, job: &mut dyn Job, clock: &Clock) -> Result<bool, String> {
    let before = lite(conn)?.conn.total_changes();
    let ok = job.run(conn, clock.now()).unwrap_or(false);
    if !in_transaction(conn) {
        return Err("the batch transaction was aborted".into());
    }
    Ok(ok || lite(conn)?.conn.total_changes() == before)
}

/// Runs a job inside its own savepoint, rolled back alone if it fails.
fn isolated(conn: &mut Conn, job: &mut dyn Job, clock: &Clock) -> Result<bool, String> {
    exec(conn, "SAVEPOINT job")?;
    let ok = job.run(conn, clock.now()).unwrap_or(false);
    if !in_transaction(conn) {
        return Err("the batch transaction was aborted".into());
    }
    if !ok {
        rollback(conn, "ROLLBACK TO job")?;
    }
    exec(conn, "RELEASE job")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    //! The batch rules against real SQLite: a failed job leaves no trace and
    //! costs no one else their write, whether it failed before or after
    //! writing; an aborted transaction refuses the whole batch.

    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Copy)]
    enum Act {
        /// Inserts its key.
        Insert,
        /// Inserts its key, then fails.
        InsertThenFail,
        /// Fails before writing.
        Refuse,
        /// Inserts its key and records how many rows it saw before.
        Count,
        /// Ends the transaction behind the writer's back.
        Abort,
    }

    /// What each job's caller was told: (key, Ok(rows seen) or the error).
    type Told = Arc<Mutex<Vec<(String, Result<i64, String>)>>>;

    struct TestJob {
        key: String,
        act: Act,
        runs: usize,
        seen: Option<Result<i64, String>>,
        told: Told,
    }

    fn insert(c: &rusqlite::Connection, key: &str) -> rusqlite::Result<usize> {
        c.execute("INSERT INTO t (k) VALUES (?1)", [key])
    }

    impl Job for TestJob {
        fn run(&mut self, conn: &mut Conn, _now: i64) -> Option<bool> {
            self.runs += 1;
            let Conn::Lite(Lite { conn: c, .. }) = conn else {
                return None;
            };
            let count = || c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get::<_, i64>(0));
            let seen = match self.act {
                Act::Insert => insert(c, &self.key).map(|_| 0),
                Act::Count => count().and_then(|n| insert(c, &self.key).map(|_| n)),
                Act::InsertThenFail => {
                    let _ = insert(c, &self.key);
                    Err(rusqlite::Error::InvalidQuery)
                }
                Act::Refuse => Err(rusqlite::Error::InvalidQuery),
                Act::Abort => c.execute_batch("ROLLBACK").map(|_| 0),
            };
            let ok = seen.is_ok();
            self.seen = Some(seen.map_err(|e| e.to_string()));
            Some(ok)
        }

        fn finish(self: Box<Self>, commit_error: Option<String>) {
            let told = match (self.seen, commit_error) {
                (Some(Err(e)), _) => Err(e),
                (Some(Ok(n)), None) => Ok(n),
                (_, Some(e)) => Err(format!("refused: {e}")),
                (None, None) => Err("never ran".into()),
            };
            self.told.lock().expect("the record").push((self.key, told));
        }
    }

    fn store() -> (tempfile::TempDir, Conn) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let c = rusqlite::Connection::open(dir.path().join("w.db")).expect("open");
        c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (k TEXT PRIMARY KEY);")
            .expect("schema");
        (dir, Conn::Lite(Lite::new(c)))
    }

    fn batch(jobs: &[(&str, Act)], told: &Told) -> Vec<Box<dyn Job>> {
        jobs.iter()
            .map(|&(key, act)| {
                Box::new(TestJob {
                    key: key.into(),
                    act,
                    runs: 0,
                    seen: None,
                    told: told.clone(),
                }) as Box<dyn Job>
            })
            .collect()
    }

    fn settle(conn: &mut Conn, jobs: Vec<Box<dyn Job>>) {
        let (jobs, outcome) = run_batch(conn, jobs, &Clock::default());
        reply(jobs, &outcome);
    }

    fn keys(conn: &mut Conn) -> Vec<String> {
        let c = &lite(conn).expect("the writer's connection").conn;
        let mut st = c.prepare("SELECT k FROM t ORDER BY k").expect("prepare");
        let rows = st.query_map([], |r| r.get(0)).expect("query");
        rows.collect::<rusqlite::Result<_>>().expect("rows")
    }

    fn told(t: &Told, key: &str) -> Result<i64, String> {
        let t = t.lock().expect("the record");
        let (_, r) = t
            .iter()
            .find(|(k, _)| k == key)
            .expect("every caller is told");
        r.clone()
    }

    #[test]
    fn a_job_refused_before_writing_costs_no_one_else() {
        let (_dir, mut conn) = store();
        let t = Told::default();
        let jobs = batch(
            &[("a", Act::Insert), ("b", Act::Refuse), ("c", Act::Count)],
            &t,
        );
        settle(&mut conn, jobs);
        assert_eq!(keys(&mut conn), ["a", "c"]);
        assert!(told(&t, "b").is_err());
        assert_eq!(told(&t, "c"), Ok(1));
        assert_eq!(t.lock().expect("the record").len(), 3);
    }

    #[test]
    fn a_job_failing_after_writing_is_undone_alone() {
        let (_dir, mut conn) = store();
        let t = Told::default();
        let jobs = batch(
            &[
                ("a", Act::Insert),
                ("b", Act::InsertThenFail),
                ("c", Act::Count),
                ("d", Act::InsertThenFail),
                ("e", Act::Count),
            ],
            &t,
        );
        settle(&mut conn, jobs);
        // Neither failed job's row survives, and the jobs after them saw
        // only the rows of jobs that succeeded before them.
        assert_eq!(keys(&mut conn), ["a", "c", "e"]);
        assert!(told(&t, "b").is_err());
        assert!(told(&t, "d").is_err());
        assert_eq!(told(&t, "c"), Ok(1));
        assert_eq!(told(&t, "e"), Ok(2));
        assert_eq!(t.lock().expect("the record").len(), 5);
        // The writer is ready for the next batch.
        settle(&mut conn, batch(&[("f", Act::Count)], &t));
        assert_eq!(told(&t, "f"), Ok(3));
    }

    #[test]
    fn a_lone_job_failing_after_writing_leaves_nothing() {
        let (_dir, mut conn) = store();
        let t = Told::default();
        settle(&mut conn, batch(&[("a", Act::InsertThenFail)], &t));
        assert!(keys(&mut conn).is_empty());
        assert!(told(&t, "a").is_err());
    }

    #[test]
    fn an_aborted_transaction_refuses_the_whole_batch() {
        let (_dir, mut conn) = store();
        let t = Told::default();
        let jobs = batch(
            &[("a", Act::Insert), ("b", Act::Abort), ("c", Act::Insert)],
            &t,
        );
        settle(&mut conn, jobs);
        assert!(keys(&mut conn).is_empty());
        for k in ["a", "b", "c"] {
            assert!(told(&t, k).is_err(), "{k} must be refused");
        }
        settle(&mut conn, batch(&[("d", Act::Count)], &t));
        assert_eq!(told(&t, "d"), Ok(0));
    }
}
