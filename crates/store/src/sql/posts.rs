//! Posts decided as a batch: every post waiting in a PostgreSQL lane is
//! decided at once by [`baton_core::flow::post_batch`] and written with one
//! statement per table.
//!
//! The lane's transaction has locked every session of the batch, so the
//! rows read here stay true until the commit. The store reads what the
//! procedure needs (the messages stored under the batch's idempotency keys,
//! with one statement; the first waiting message of a session whose turn is
//! due; whether a running turn was asked to cancel), decides in `core`, and
//! writes the new turns with one `INSERT`, the new entries with another, and
//! the session rows with the lane's one `UPDATE` before the commit. A post
//! the procedure refuses (`reject`, `queue_full`, a reused key) writes
//! nothing and fails alone; the others commit.

use std::collections::HashMap;
use std::sync::Arc;

use baton_core::flow::{
    post_batch, Accepted, BatchPost, Facts, Outcome, Post, Refusal, Start, Stored,
};
use baton_core::{Entry, NewEntry, Policy, SessionId, Timestamp, TurnId};

use super::{
    begun_turn, cancel_requested, entry_values, first_waiting, remembered_row, replayed,
    save_session, try_claim, SessionRow, StoreConfig, StoredMessage, UserMeta, ENTRY_COLS,
    ENTRY_INSERT, ENTRY_VALUES,
};
use crate::db::{args, Conn, Val, R};
use crate::{PostMessage, Posted, StoreError};

/// A post waiting in a lane.
#[derive(Clone)]
pub(crate) struct Waiting {
    pub req: Arc<PostMessage>,
    /// Begin a turn it starts here (`Store::post_message_to_run`).
    pub run_here: bool,
}

/// What a post of the batch gets: its answer, or `None` when it must run
/// on its own (the procedure needed a fact the batch did not read).
pub(crate) type Answer = Option<R<Posted>>;

/// A turn row to insert.
struct NewTurn {
    session: SessionId,
    id: TurnId,
    running: Option<i64>,
    from: i64,
    to: i64,
}

/// Decides and writes the posts `posts` in the lane's transaction `c`
/// (which holds their sessions' locks), at time `now`.
pub(crate) async fn post_all(
    c: &mut Conn,
    now: i64,
    cfg: &StoreConfig,
    posts: &[Waiting],
) -> R<Vec<Answer>> {
    let mut answers: Vec<Answer> = posts.iter().map(|_| None).collect();

    // The batch's sessions, each once, from the rows the lane locked.
    let mut index: HashMap<SessionId, usize> = HashMap::new();
    let mut rows: Vec<SessionRow> = Vec::new();
    let mut session_of: Vec<Option<usize>> = Vec::with_capacity(posts.len());
    for (i, p) in posts.iter().enumerate() {
        let id = p.req.session_id;
        let k = match index.get(&id) {
            Some(&k) => Some(k),
            // The lane locked (and so remembers) every session of the batch
            // that exists; no other row may be written here.
            None => match remembered_row(c, id) {
                Some(row) => {
                    rows.push(row);
                    index.insert(id, rows.len() - 1);
                    Some(rows.len() - 1)
                }
                None => None,
            },
        };
        let k = k.filter(|&k| rows[k].owner == p.req.owner);
        if k.is_none() {
            answers[i] = Some(Err(StoreError::NotFound.into()));
        }
        session_of.push(k);
    }

    let stored = stored_messages(c, posts, &session_of).await?;
    let requests: Vec<String> = posts
        .iter()
        .map(|p| {
            format!(
                "{}\n{}",
                p.req.policy.map_or("", Policy::as_str),
                p.req.content
            )
        })
        .collect();

    // The facts the procedure needs beyond the rows.
    let mut facts = vec![Facts::default(); rows.len()];
    for (k, row) in rows.iter_mut().enumerate() {
        if row.flow.due(now).is_some() {
            facts[k].first_waiting = Some(first_waiting(c, row).await?);
        }
    }
    for (i, p) in posts.iter().enumerate() {
        let Some(k) = session_of[i] else { continue };
        let row = &mut rows[k];
        let steer = p.req.policy.unwrap_or(row.flow.policy) == Policy::Steer;
        if let (true, Some(turn), None) = (steer, row.flow.active, row.flow.cancelling) {
            row.flow.cancelling = Some(cancel_requested(c, turn).await?);
        }
    }

    let mut batch = Vec::with_capacity(posts.len());
    let mut of_batch = Vec::with_capacity(posts.len());
    for (i, p) in posts.iter().enumerate() {
        let Some(k) = session_of[i] else { continue };
        let key = p.req.idempotency_key.as_deref();
        let found = key.and_then(|key| stored.get(&(p.req.session_id, key.to_owned())));
        batch.push(BatchPost {
            session: k,
            post: Post {
                policy: p.req.policy,
                agent_takes_input: p.req.mid_turn_agents.contains(&rows[k].agent),
                capacity: cfg.queue_capacity as u64,
                now,
                heal_turn: TurnId::new(),
                turn: TurnId::new(),
            },
            key,
            request: &requests[i],
            stored: match found {
                None => Stored::None,
                Some(m) if m.is(&p.req) => Stored::Same,
                Some(_) => Stored::Different,
            },
        });
        of_batch.push(i);
    }
    let mut states: Vec<_> = rows.iter().map(|r| r.flow).collect();
    let outcomes = post_batch(&mut states, &facts, &batch);

    // What the accepted posts write, in order.
    let mut out = Writes::default();
    let mut touched = vec![false; rows.len()];
    let mut cancels: Vec<(TurnId, String)> = Vec::new();
    for (b, outcome) in outcomes.iter().enumerate() {
        let i = of_batch[b];
        let p = &posts[i];
        let k = batch[b].session;
        let answer: R<Posted> = match *outcome {
            Outcome::Need(_) => continue,
            Outcome::Refused(Refusal::Busy { turn }) => {
                Err(StoreError::SessionBusy { turn_id: turn }.into())
            }
            Outcome::Refused(Refusal::QueueFull { capacity }) => Err(StoreError::QueueFull {
                capacity: capacity as usize,
            }
            .into()),
            Outcome::KeyConflict => Err(StoreError::IdempotencyConflict.into()),
            Outcome::Replay => {
                let key = p.req.idempotency_key.clone().unwrap_or_default();
                match stored.get(&(p.req.session_id, key)) {
                    Some(m) => m.replay(),
                    None => Err(StoreError::Internal("a replay of nothing stored".into()).into()),
                }
            }
            Outcome::ReplayOf(earlier) => match &answers[of_batch[earlier]] {
                Some(Ok(first)) => Ok(replayed(first.entry.clone(), first.disposition)),
                _ => Err(StoreError::Internal("a replay of a post not accepted".into()).into()),
            },
            Outcome::Accepted(a) => {
                touched[k] = true;
                if let Some(turn) = a.cancel {
                    cancels.push((turn, format!("interrupted by message {}", a.seq)));
                }
                out.accepted(&mut rows[k], now, cfg, p, &a)
            }
        };
        answers[i] = Some(answer);
    }

    // Turns first: an interrupt may cancel a turn this batch started.
    insert_turns(c, now, &out.turns).await?;
    for (turn, reason) in cancels {
        super::request_cancel_turn(c, turn, &reason).await?;
    }
    for ((row, state), touched) in rows.iter_mut().zip(states).zip(touched) {
        if touched {
            row.flow = state;
            save_session(c, row).await?;
        }
    }
    out.insert_entries(c).await?;
    Ok(answers)
}

/// The rows a batch's accepted posts write.
#[derive(Default)]
struct Writes {
    turns: Vec<NewTurn>,
    /// The entries' values, [`ENTRY_VALUES`] per entry.
    entries: Vec<Val>,
}

impl Writes {
    /// Adds the rows of a turn `start`ed on session `s`.
    fn turn(&mut self, s: &SessionRow, now: i64, start: Start, running: Option<i64>) -> R<Entry> {
        self.turns.push(NewTurn {
            session: s.id,
            id: start.turn,
            running,
            from: start.input.from as i64,
            to: start.input.to as i64,
        });
        let e = NewEntry::turn_started(start.turn, start.input);
        self.entries
            .extend(entry_values(s.id, start.seq, &e, None, now)?);
        Ok(e.committed(s.id, start.seq, Timestamp(now)))
    }

    /// Adds the rows of post `p`, accepted on session `s` as `a`, and
    /// claims the lease as `op_post` does; its answer.
    fn accepted(
        &mut self,
        s: &mut SessionRow,
        now: i64,
        cfg: &StoreConfig,
        p: &Waiting,
        a: &Accepted,
    ) -> R<Posted> {
        let mut committed = Vec::new();
        let mut lease = None;
        if let Some(healed) = a.healed {
            committed.push(self.turn(s, now, healed, None)?);
            lease = try_claim(s, &p.req.node, now, cfg.lease_ttl);
        }
        let meta = UserMeta {
            policy: a.waits_as,
            requested: p.req.policy,
            disposition: &a.disposition,
            key: p.req.idempotency_key.as_deref(),
        };
        let msg = NewEntry::user_message(p.req.content.clone());
        self.entries
            .extend(entry_values(s.id, a.seq, &msg, Some(&meta), now)?);
        let entry = msg.committed(s.id, a.seq, Timestamp(now));
        committed.push(entry.clone());
        let mut begun = None;
        if let Some(start) = a.started {
            let mut running = None;
            if lease.is_none() {
                lease = try_claim(s, &p.req.node, now, cfg.lease_ttl);
                // As `op_post` does: the turn is begun here, inserted
                // already `running` under the new lease.
                if let (true, Some(l)) = (p.run_here, &lease) {
                    running = Some(l.epoch);
                    begun = Some(begun_turn(s, now, start, &entry));
                }
            }
            committed.push(self.turn(s, now, start, running)?);
        }
        Ok(Posted {
            entry,
            disposition: a.disposition,
            replayed: false,
            committed,
            lease,
            cancel: a.cancel,
            begun,
            steer: a.steer,
            pending_until: a.pending_until,
        })
    }

    /// Inserts the entries with one statement: in a lane's batch, the
    /// statement that writes the session rows before the commit, so the
    /// batch's posts cost it no round trip of their own.
    async fn insert_entries(self, c: &mut Conn) -> R<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        if let Conn::Batch(b) = c {
            b.defer_entries(self.entries);
            return Ok(());
        }
        let sql = entries_insert(0, self.entries.len() / ENTRY_VALUES);
        c.execute(&sql, &self.entries).await?;
        Ok(())
    }
}

/// The messages stored under the idempotency keys of `posts`, by session
/// and key: one statement.
async fn stored_messages(
    c: &mut Conn,
    posts: &[Waiting],
    session_of: &[Option<usize>],
) -> R<HashMap<(SessionId, String), StoredMessage>> {
    let mut args: Vec<Val> = Vec::new();
    let mut pairs = Vec::new();
    for (p, k) in posts.iter().zip(session_of) {
        if let (Some(key), Some(_)) = (&p.req.idempotency_key, k) {
            pairs.push(format!("(${}, ${})", args.len() + 1, args.len() + 2));
            args.extend(args![p.req.session_id.to_string(), key.clone()]);
        }
    }
    let mut found = HashMap::new();
    if pairs.is_empty() {
        return Ok(found);
    }
    let sql = format!(
        "SELECT {ENTRY_COLS}, idempotency_key, requested_policy, disposition FROM entries \
         WHERE (session_id, idempotency_key) IN ({})",
        pairs.join(", ")
    );
    for row in c.fetch_all(&sql, &args).await? {
        let key: Option<String> = row.get("idempotency_key")?;
        let message = StoredMessage::from_row(&row)?;
        found.insert((message.entry.session_id, key.unwrap_or_default()), message);
    }
    Ok(found)
}

/// The `INSERT` of `count` entries, with placeholders from `$(from + 1)`.
pub(crate) fn entries_insert(from: usize, count: usize) -> String {
    let rows: Vec<String> = (0..count)
        .map(|r| {
            let cells: Vec<String> = (1..=ENTRY_VALUES)
                .map(|k| format!("${}", from + r * ENTRY_VALUES + k))
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect();
    format!("{ENTRY_INSERT} VALUES {}", rows.join(", "))
}

/// Inserts the batch's new turns with one statement.
async fn insert_turns(c: &mut Conn, now: i64, turns: &[NewTurn]) -> R<()> {
    if turns.is_empty() {
        return Ok(());
    }
    let mut values = Vec::with_capacity(turns.len());
    let mut args: Vec<Val> = Vec::with_capacity(turns.len() * 7);
    for (r, t) in turns.iter().enumerate() {
        let at = r * 7;
        let cells: Vec<String> = (1..=7).map(|k| format!("${}", at + k)).collect();
        values.push(format!("({})", cells.join(", ")));
        args.extend(args![
            t.id.to_string(),
            t.session.to_string(),
            if t.running.is_some() {
                "running"
            } else {
                "starting"
            },
            t.from,
            t.to,
            now,
            t.running
        ]);
    }
    let sql = format!(
        "INSERT INTO turns (id, session_id, status, input_from, input_to, started_at, epoch) VALUES {}",
        values.join(", ")
    );
    c.execute(&sql, &args).await?;
    Ok(())
}
