//! [`SqlStore`]: the one implementation of [`Store`] over SQLite and
//! PostgreSQL. The schema and every statement are shared (both accept `$N`
//! placeholders and the same DDL); what differs is how a write transaction
//! is run and whose clock stamps it: the embedded store's single writer
//! with group commit ([`crate::writer`]), or on PostgreSQL a lane's group
//! commit ([`crate::pg_writer`]), with a write that meets a conflict run
//! alone in a pooled transaction and retried. Statements run on
//! [`crate::db::Conn`], so each transaction is written once for sqlx
//! (PostgreSQL, the embedded readers) and for the embedded writer's
//! synchronous connection.
//!
//! - `open`: opening either store, running a write, the clock, errors;
//! - `rows`: the columns, and rows read into the store's types;
//! - `ops`: the write procedures, deciding with [`baton_core::flow`];
//! - `posts`: a PostgreSQL lane's posts, decided and written together;
//! - here: the [`Store`] trait's methods, each one transaction of `ops` or
//!   a read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use baton_core::flow::{Accepted, Need, Post, Refusal, SessionState, Start, TakeRefusal};
use baton_core::permission::{judge, Judgement};
use baton_core::policy::QueueSummary;
use baton_core::{
    Disposition, Entry, EntryType, InputRange, NewEntry, PermissionInfo, PermissionPolicy,
    PermissionState, PermissionStatus, Policy, Role, Seq, Session, SessionId, SessionStatus,
    Timestamp, ToolInfo, Turn, TurnId, TurnStatus,
};
use futures_util::future::BoxFuture;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyConnection;
use sqlx::{AnyPool, Connection};
use tokio::sync::{mpsc, oneshot};

use crate::db::{args, Conn, Fail, Row, Val, R};

use crate::pg_writer::{self, Lanes};
use crate::writer::{self, Clock, Job};
use crate::{
    AnswerPermission, Answered, Begin, CreateSession, Created, Due, DueStart, Ended, Lease, Listed,
    Page, PostMessage, Posted, Recovered, Renewal, Result, SessionPage, SessionQuery, SteerBatch,
    Store, StoreError, Take, TurnToRun,
};
mod open;
mod ops;
mod posts;
mod rows;

use open::*;
use ops::*;
use rows::*;

pub use open::{pg_timeouts, PgTimeouts};
pub(crate) use open::{retryable, unfail};
#[cfg(test)]
pub(crate) use ops::bump_last_seq;
pub(crate) use ops::{lock_batch, write_deferred_sessions};
pub(crate) use posts::{post_all, Waiting as WaitingPost};
pub(crate) use rows::SessionRow;

/// Tunables that the store applies inside its transactions.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How many user messages may wait for a turn (`429 queue_full` past it).
    pub queue_capacity: usize,
    /// How often a `starting` turn may be handed to a worker that vanishes
    /// before running it, before it is ended `failed` (bounded recovery).
    pub max_recoveries: i64,
    /// PostgreSQL pool size.
    pub max_connections: u32,
    /// How many group-commit lanes a PostgreSQL store runs (see
    /// [`crate::pg_writer`]): writes to different sessions commit in
    /// parallel across lanes, and each lane holds a connection only while a
    /// batch runs. Fewer lanes make bigger batches: on a database with 2
    /// cores, 2 lanes committed 15–30 % more posts to 1,000 sessions from 32
    /// writers than 4 did, and 8 fewer still (BENCHMARKS.md).
    pub pg_lanes: usize,
    /// Embedded store: WAL pages (4 KiB each) past which the writer finishes
    /// the checkpoint itself between two batches, so that the WAL starts
    /// over even under a load that never pauses.
    pub wal_catch_up_pages: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            queue_capacity: 1000,
            max_recoveries: 3,
            max_connections: 16,
            pg_lanes: 2,
            wal_catch_up_pages: writer::WAL_CATCH_UP_PAGES,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Row locking: SQLite has one writer, so a plain read is already exclusive.
    fn for_update(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE",
        }
    }
}

enum Exec {
    Sqlite(mpsc::Sender<Box<dyn Job>>),
    Postgres(AnyPool, Lanes),
}

/// The SQL store. Cheap to share behind an `Arc`.
pub struct SqlStore {
    dialect: Dialect,
    read: AnyPool,
    exec: Exec,
    cfg: Arc<StoreConfig>,
    clock: Arc<Clock>,
    /// How often each backstop fired, by constraint.
    breaches: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    stats: crate::CommitStats,
    // Held for the store's lifetime: the embedded store is owned by one process.
    _lock: Option<std::fs::File>,
}

/// Runs `$body` as one write transaction on the session `$lock` names (if
/// any). The closure may run more than once (PostgreSQL retries), so the
/// listed captures are cloned for each run.
macro_rules! op {
    ($store:expr, $lock:expr, [$($cap:ident),*], |$c:ident, $now:ident| $body:expr) => {{
        $store
            .write($lock, move |$c: &mut Conn, $now: i64| {
                $(let $cap = $cap.clone();)*
                Box::pin(async move { $body })
            })
            .await
    }};
}

#[async_trait]
impl Store for SqlStore {
    fn invariant_breaches(&self) -> Vec<(String, u64)> {
        let counts = self.breaches.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn commit_stats(&self) -> Option<crate::CommitStats> {
        Some(self.stats.clone())
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.reader().await?;
        c.execute("SELECT 1", &[])
            .await
            .map(|_| ())
            .map_err(unfail)?;
        drop(c);
        if self.dialect == Dialect::Sqlite {
            // The embedded store writes on one thread: healthy only if it
            // commits (a dead or stuck writer is `503`, not `200`).
            tokio::time::timeout(WRITER_PATIENCE, self.flush())
                .await
                .map_err(|_| {
                    StoreError::Unavailable("the store's writer does not answer".into())
                })??;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        match self.exec {
            Exec::Sqlite(_) => {
                self.write(None, |_c, _now| Box::pin(async { Ok(()) }))
                    .await
            }
            Exec::Postgres(..) => Ok(()),
        }
    }

    async fn create_session(&self, req: CreateSession) -> Result<Created> {
        let (d, cfg, req) = (self.dialect, self.cfg.clone(), Arc::new(req));
        op!(self, None, [cfg, req], |c, now| op_create(
            c, d, now, &cfg, &req
        )
        .await)
    }

    async fn session(&self, owner: &str, id: SessionId) -> Result<Session> {
        let mut c = self.reader().await?;
        let get = async {
            let s = fetch_session(&mut c, id, "").await?;
            match s {
                Some(s) if s.owner == owner => session_view(&s),
                _ => Err(StoreError::NotFound.into()),
            }
        };
        get.await.map_err(unfail)
    }

    async fn session_by_key(&self, owner: &str, key: &str) -> Result<Option<Session>> {
        let mut c = self.reader().await?;
        let get = async {
            let sql = format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE owner = $1 AND idempotency_key = $2"
            );
            let row = c.fetch_optional(&sql, &args![owner, key]).await?;
            match row {
                Some(row) => Ok(Some(session_view(&session_row(&row)?)?)),
                None => Ok(None),
            }
        };
        get.await.map_err(unfail)
    }

    async fn list_sessions(&self, owner: &str, query: &SessionQuery) -> Result<SessionPage> {
        // No agent name holds a NUL byte, and PostgreSQL refuses one in text.
        if query.agent.as_ref().is_some_and(|a| a.contains('\0')) {
            return Ok(SessionPage {
                sessions: Vec::new(),
                more: false,
            });
        }
        let mut c = self.reader().await?;
        let list = async {
            // Keyset paging on (created_at, id), newest first: a page never
            // skips or repeats a session, however many are created meanwhile.
            let mut sql = format!(
                "SELECT {SESSION_COLS}, COALESCE((SELECT e.created_at FROM entries e \
                 WHERE e.session_id = sessions.id AND e.seq = sessions.last_seq), created_at) \
                 AS last_activity_at FROM sessions WHERE owner = $1"
            );
            let mut args = vec![Val::from(owner)];
            if let Some(after) = query.after {
                args.push(Val::from(after.created_at.micros()));
                args.push(Val::from(after.id.to_string()));
                let (t, i) = (args.len() - 1, args.len());
                sql.push_str(&format!(
                    " AND (created_at < ${t} OR (created_at = ${t} AND id < ${i}))"
                ));
            }
            match query.status {
                Some(SessionStatus::Running) => sql.push_str(" AND active_turn IS NOT NULL"),
                Some(SessionStatus::Idle) => sql.push_str(" AND active_turn IS NULL"),
                None => {}
            }
            if let Some(agent) = &query.agent {
                args.push(Val::from(agent));
                sql.push_str(&format!(" AND agent = ${}", args.len()));
            }
            // One more than asked: whether another page follows.
            let limit = i64::from(query.limit.max(1));
            args.push(Val::from(limit + 1));
            sql.push_str(&format!(
                " ORDER BY created_at DESC, id DESC LIMIT ${}",
                args.len()
            ));
            let rows = c.fetch_all(&sql, &args).await?;
            let more = rows.len() as i64 > limit;
            let mut sessions = Vec::with_capacity(rows.len());
            for r in rows.iter().take(limit as usize) {
                let s = session_row(r)?;
                sessions.push(Listed {
                    session: session_view(&s)?,
                    last_activity_at: Timestamp(r.get("last_activity_at")?),
                });
            }
            Ok(SessionPage { sessions, more })
        };
        list.await.map_err(unfail)
    }

    async fn delete_session(&self, owner: &str, id: SessionId) -> Result<()> {
        let (d, owner) = (self.dialect, owner.to_owned());
        op!(self, Some(id), [owner], |c, _now| {
            lock_owned(c, d, &owner, id).await?;
            for table in ["entries", "turns", "permission_requests"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE session_id = $1"),
                    &args![id.to_string()],
                )
                .await?;
            }
            c.execute("DELETE FROM sessions WHERE id = $1", &args![id.to_string()])
                .await?;
            c.forget(id);
            Ok(())
        })
    }

    async fn post_message(&self, req: PostMessage) -> Result<Posted> {
        self.post(req, false).await
    }

    async fn post_message_to_run(&self, req: PostMessage) -> Result<Posted> {
        self.post(req, true).await
    }

    async fn entries(&self, id: SessionId, after: Seq, limit: u32) -> Result<Page> {
        let mut c = self.reader().await?;
        let page = async {
            // Read the counter first: every seq up to it is committed, so
            // `last_seq` never promises an entry the page could not show.
            let last: i64 = c
                .fetch_optional(
                    "SELECT last_seq FROM sessions WHERE id = $1",
                    &args![id.to_string()],
                )
                .await?
                .ok_or(StoreError::NotFound)?
                .first()?;
            let sql = format!(
                "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
            );
            let rows = c
                .fetch_all(
                    &sql,
                    &args![
                        id.to_string(),
                        after.min(i64::MAX as u64) as i64,
                        last,
                        i64::from(limit)
                    ],
                )
                .await?;
            let entries = rows.iter().map(entry_row).collect::<R<Vec<_>>>()?;
            Ok(Page {
                entries,
                last_seq: last as Seq,
            })
        };
        page.await.map_err(unfail)
    }

    async fn turns(&self, id: SessionId) -> Result<Vec<Turn>> {
        let sql =
            format!("SELECT {TURN_COLS} FROM turns WHERE session_id = $1 ORDER BY input_from");
        let mut c = self.reader().await?;
        let list = async {
            let rows = c.fetch_all(&sql, &args![id.to_string()]).await?;
            rows.iter().map(turn_row).collect::<R<Vec<_>>>()
        };
        list.await.map_err(unfail)
    }

    async fn request_cancel(
        &self,
        owner: &str,
        id: SessionId,
        reason: &str,
        only: Option<TurnId>,
    ) -> Result<Option<TurnId>> {
        let (d, owner, reason) = (self.dialect, owner.to_owned(), reason.to_owned());
        op!(self, Some(id), [owner, reason], |c, _now| {
            let s = lock_owned(c, d, &owner, id).await?;
            let target = s.flow.active.filter(|t| only.is_none_or(|o| o == *t));
            if let Some(turn) = target {
                request_cancel_turn(c, turn, &reason).await?;
            }
            Ok(target)
        })
    }

    async fn next_turn(&self, lease: &Lease) -> Result<Option<TurnToRun>> {
        let mut c = self.reader().await?;
        let next = async {
            let s = fetch_leased(&mut c, lease).await?;
            Ok(starting_turn(&mut c, &s).await?.map(|(todo, _)| todo))
        };
        next.await.map_err(unfail)
    }

    async fn begin_turn(&self, lease: &Lease, turn: TurnId) -> Result<Begin> {
        let (d, cfg, lease) = (self.dialect, self.cfg.clone(), lease.clone());
        op!(self, Some(lease.session_id), [cfg, lease], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active != Some(turn) {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let row = c
                .fetch_one(
                    "SELECT status, cancel_reason FROM turns WHERE id = $1",
                    &args![turn.to_string()],
                )
                .await?;
            let status: String = row.get("status")?;
            if status != "starting" {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let cancel = row.get("cancel_reason")?;
            begin(c, &mut s, now, &cfg, &lease, turn, cancel).await
        })
    }

    async fn take_turn(&self, lease: &Lease) -> Result<Take> {
        let (d, cfg, lease) = (self.dialect, self.cfg.clone(), lease.clone());
        op!(self, Some(lease.session_id), [cfg, lease], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active.is_none() {
                // Idle: give the lease up in the same transaction that saw
                // nothing to do, so a message that arrives later finds the
                // lease free and its node starts the turn.
                s.lease_owner = None;
                s.lease_expires_at = None;
                save_session(c, &s).await?;
                return Ok(Take::Released);
            }
            let Some((todo, cancel)) = starting_turn(c, &s).await? else {
                return Ok(Take::Busy);
            };
            let begun = begin(c, &mut s, now, &cfg, &lease, todo.turn.id, cancel).await?;
            Ok(Take::Run(Box::new(todo), begun))
        })
    }

    async fn append_output(
        &self,
        lease: &Lease,
        turn: TurnId,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<Entry>> {
        check_output(turn, &entries)?;
        let (d, lease, entries) = (self.dialect, lease.clone(), Arc::new(entries));
        op!(self, Some(lease.session_id), [lease, entries], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active != Some(turn) {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let mut out = Vec::with_capacity(entries.len());
            for e in entries.iter() {
                out.push(append(c, &mut s, now, e.clone(), None).await?);
            }
            save_session(c, &s).await?;
            Ok(out)
        })
    }

    async fn end_turn(
        &self,
        lease: &Lease,
        turn: TurnId,
        status: TurnStatus,
        reason: Option<String>,
        entries: Vec<NewEntry>,
    ) -> Result<Ended> {
        check_end(turn, status, &entries)?;
        let (d, cfg, lease, entries) = (
            self.dialect,
            self.cfg.clone(),
            lease.clone(),
            Arc::new(entries),
        );
        op!(
            self,
            Some(lease.session_id),
            [cfg, lease, entries, reason],
            |c, now| {
                let mut s = lock_fenced(c, d, &lease).await?;
                let ended =
                    finish_turn(c, &mut s, now, turn, status, reason, entries.to_vec()).await?;
                // The holder is alive and may start the next turn at once: the
                // lease runs a full term from here.
                s.lease_expires_at = Some(now + cfg.lease_ttl.as_micros() as i64);
                save_session(c, &s).await?;
                Ok(ended)
            }
        )
    }

    async fn renew_lease(&self, lease: &Lease) -> Result<Renewal> {
        let (d, cfg, lease) = (self.dialect, self.cfg.clone(), lease.clone());
        op!(self, Some(lease.session_id), [cfg, lease], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            s.lease_expires_at = Some(now + cfg.lease_ttl.as_micros() as i64);
            save_session(c, &s).await?;
            let mut renewal = Renewal::default();
            if let Some(turn) = s.flow.active {
                let reason: Option<String> = c
                    .scalar(
                        "SELECT cancel_reason FROM turns WHERE id = $1",
                        &args![turn.to_string()],
                    )
                    .await?;
                renewal.cancel = reason.map(|r| (turn, r));
                renewal.steer = s.flow.queue.last_steer.map(|upto| (turn, upto));
            }
            Ok(renewal)
        })
    }

    async fn release_lease(&self, lease: &Lease, force: bool) -> Result<bool> {
        let (d, lease) = (self.dialect, lease.clone());
        op!(self, Some(lease.session_id), [lease], |c, _now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active.is_some() && !force {
                return Ok(false);
            }
            s.lease_owner = None;
            s.lease_expires_at = None;
            save_session(c, &s).await?;
            Ok(true)
        })
    }

    async fn answer_permission(&self, req: AnswerPermission) -> Result<Answered> {
        let (d, req) = (self.dialect, Arc::new(req));
        op!(self, Some(req.session_id), [req], |c, now| op_answer(
            c, d, now, &req
        )
        .await)
    }

    async fn close_permissions(
        &self,
        lease: &Lease,
        turn: TurnId,
        only: Option<String>,
        decided_by: &str,
        reason: &str,
    ) -> Result<Vec<Entry>> {
        let (d, lease) = (self.dialect, lease.clone());
        let (by, reason) = (decided_by.to_owned(), reason.to_owned());
        op!(
            self,
            Some(lease.session_id),
            [lease, only, by, reason],
            |c, now| {
                let mut s = lock_fenced(c, d, &lease).await?;
                if s.flow.active != Some(turn) {
                    return Err(StoreError::TurnNotActive { turn_id: turn }.into());
                }
                let closed =
                    close_pending(c, &mut s, now, turn, only.as_deref(), &by, &reason).await?;
                if !closed.is_empty() {
                    save_session(c, &s).await?;
                }
                Ok(closed)
            }
        )
    }

    async fn pending_permissions(&self, id: SessionId) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq IN \
             (SELECT request_seq FROM permission_requests WHERE session_id = $1 AND state = 'pending') \
             ORDER BY seq"
        );
        let mut c = self.reader().await?;
        let list = async {
            let rows = c.fetch_all(&sql, &args![id.to_string()]).await?;
            rows.iter().map(entry_row).collect::<R<Vec<_>>>()
        };
        list.await.map_err(unfail)
    }

    async fn permission_decisions(&self, id: SessionId, turn: TurnId) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq IN \
             (SELECT decision_seq FROM permission_requests WHERE session_id = $1 AND turn_id = $2 \
              AND decision_seq IS NOT NULL) ORDER BY seq"
        );
        let mut c = self.reader().await?;
        let list = async {
            let rows = c
                .fetch_all(&sql, &args![id.to_string(), turn.to_string()])
                .await?;
            rows.iter().map(entry_row).collect::<R<Vec<_>>>()
        };
        list.await.map_err(unfail)
    }

    async fn set_agent_session(&self, lease: &Lease, agent_session: &str) -> Result<()> {
        let (d, lease, value) = (self.dialect, lease.clone(), agent_session.to_owned());
        op!(self, Some(lease.session_id), [lease, value], |c, _now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            s.agent_session = Some(value.clone());
            save_session(c, &s).await?;
            Ok(())
        })
    }

    async fn steered_input(
        &self,
        lease: &Lease,
        turn: TurnId,
        after: Seq,
    ) -> Result<Option<SteerBatch>> {
        let mut c = self.reader().await?;
        let read = async {
            let s = fetch_leased(&mut c, lease).await?;
            if s.flow.active != Some(turn) {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let from = after.max(s.flow.cursor);
            let Some(upto) = s.flow.queue.last_steer.filter(|l| *l > from) else {
                return Ok(None);
            };
            let sql = format!(
                "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND role = 'user' AND seq > $2 AND seq <= $3 ORDER BY seq"
            );
            let rows = c
                .fetch_all(&sql, &args![s.id.to_string(), from as i64, upto as i64])
                .await?;
            let messages = rows.iter().map(entry_row).collect::<R<Vec<_>>>()?;
            Ok(Some(SteerBatch { upto, messages }))
        };
        read.await.map_err(unfail)
    }

    async fn take_input(&self, lease: &Lease, turn: TurnId, upto: Seq) -> Result<()> {
        let (d, lease) = (self.dialect, lease.clone());
        op!(self, Some(lease.session_id), [lease], |c, _now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            match s.flow.may_take(turn, upto) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                // The turn ended first: its end gave the input to the next turn.
                Err(TakeRefusal::NotActive) => {
                    return Err(StoreError::TurnNotActive { turn_id: turn }.into())
                }
                Err(TakeRefusal::NoSteer) => {
                    return Err(StoreError::Internal(format!(
                    "turn {turn} cannot take messages up to {upto}: no steered message waits there"
                ))
                    .into())
                }
            }
            let row = c
                .fetch_one(
                    "SELECT COUNT(*) AS n, MAX(seq) AS last FROM entries WHERE session_id = $1 AND role = 'user' \
                     AND seq > $2 AND seq <= $3",
                    &args![s.id.to_string(), s.flow.cursor as i64, upto as i64],
                )
                .await?;
            let count: i64 = row.get("n")?;
            let last: Option<i64> = row.get("last")?;
            if last != Some(upto as i64) {
                return Err(StoreError::Internal(format!(
                    "turn {turn} cannot take messages up to {upto}: it is not a waiting message"
                ))
                .into());
            }
            let moved = c
                .execute(
                    "UPDATE turns SET input_to = $2 WHERE id = $1 AND status IN ('starting', 'running')",
                    &args![turn.to_string(), upto as i64],
                )
                .await?;
            if moved != 1 {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            s.flow.take(upto, count.max(0) as u64);
            save_session(c, &s).await?;
            Ok(())
        })
    }

    async fn start_due(&self, node: &str) -> Result<Due> {
        let now = self.now().await?;
        let ids = self
            .session_ids(
                "SELECT id FROM sessions WHERE pending_until IS NOT NULL AND pending_until <= $1 LIMIT 500",
                &args![now],
            )
            .await?;
        let mut due = Due {
            now,
            ..Due::default()
        };
        for id in ids {
            let (d, cfg, node) = (self.dialect, self.cfg.clone(), node.to_owned());
            let started = op!(self, Some(id), [cfg, node], |c, now| {
                let Some(mut s) = lock_session(c, d, id).await? else {
                    return Ok(None);
                };
                // Another node (or a post) may have started it meanwhile, or
                // a later message moved the window.
                let Some(started) = start_next(c, &mut s, now).await? else {
                    return Ok(None);
                };
                let lease = try_claim(&mut s, &node, now, cfg.lease_ttl);
                save_session(c, &s).await?;
                Ok(Some(DueStart {
                    lease,
                    committed: vec![started],
                }))
            })?;
            due.started.extend(started);
        }
        let mut c = self.reader().await?;
        let next = async {
            c.scalar::<Option<i64>>(
                "SELECT MIN(pending_until) FROM sessions WHERE pending_until IS NOT NULL",
                &[],
            )
            .await
        };
        due.next = next.await.map_err(unfail)?;
        Ok(due)
    }

    async fn recover(&self, node: &str, all_foreign: bool) -> Result<Vec<Recovered>> {
        let now = self.now().await?;
        let ids = self
            .session_ids(
                "SELECT id FROM sessions WHERE active_turn IS NOT NULL \
                 AND (lease_owner IS NULL OR lease_expires_at < $1 OR ($2 = 1 AND lease_owner <> $3)) LIMIT 500",
                &args![now, i64::from(all_foreign), node],
            )
            .await?;
        let mut out = Vec::new();
        for id in ids {
            let (d, cfg, node) = (self.dialect, self.cfg.clone(), node.to_owned());
            let got = op!(self, Some(id), [cfg, node], |c, now| op_recover_one(
                c,
                d,
                now,
                &cfg,
                &node,
                id,
                all_foreign
            )
            .await)?;
            out.extend(got);
        }
        Ok(out)
    }
}
