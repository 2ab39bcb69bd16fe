//! The write procedures: each reads the rows it needs, asks
//! [`baton_core::flow`] what happens, and writes what it decided: creating
//! a session, posting, starting, beginning, ending and recovering turns,
//! steered input, permissions, and the statements they share.

use super::*;

pub(super) async fn lock_session(c: &mut Conn, d: Dialect, id: SessionId) -> R<Option<SessionRow>> {
    fetch_session(c, id, d.for_update()).await
}

/// The session row the connection remembers, as a write may use it.
pub(super) fn remembered_row(c: &Conn, id: SessionId) -> Option<SessionRow> {
    let mut s = c.remembered(id)?.clone();
    // Not kept between writes: a cancel changes the turn's row only.
    s.flow.cancelling = None;
    Some(s)
}

/// Reads a session row; `suffix` is empty for a plain read.
pub(super) async fn fetch_session(
    c: &mut Conn,
    id: SessionId,
    suffix: &str,
) -> R<Option<SessionRow>> {
    if let Some(s) = remembered_row(c, id) {
        return Ok(Some(s));
    }
    let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1{suffix}");
    let row = c.fetch_optional(&sql, &args![id.to_string()]).await?;
    let s = row.as_ref().map(session_row).transpose()?;
    if let Some(s) = &s {
        c.remember(s);
    }
    Ok(s)
}

pub(super) async fn lock_owned(
    c: &mut Conn,
    d: Dialect,
    owner: &str,
    id: SessionId,
) -> R<SessionRow> {
    match lock_session(c, d, id).await? {
        Some(s) if s.owner == owner => Ok(s),
        _ => Err(StoreError::NotFound.into()),
    }
}

/// Locks the session for a write of `lease`'s holder; anyone else is stale.
pub(super) async fn lock_fenced(c: &mut Conn, d: Dialect, lease: &Lease) -> R<SessionRow> {
    match lock_session(c, d, lease.session_id).await? {
        Some(s)
            if s.lease_owner.as_deref() == Some(lease.owner.as_str())
                && s.lease_epoch == lease.epoch =>
        {
            Ok(s)
        }
        _ => Err(StoreError::StaleEpoch { epoch: lease.epoch }.into()),
    }
}

/// Reads the session held under `lease` (outside a write: no lock); a
/// stale epoch if the lease is no longer this one.
pub(super) async fn fetch_leased(c: &mut Conn, lease: &Lease) -> R<SessionRow> {
    match fetch_session(c, lease.session_id, "").await? {
        Some(s)
            if s.lease_owner.as_deref() == Some(lease.owner.as_str())
                && s.lease_epoch == lease.epoch =>
        {
            Ok(s)
        }
        _ => Err(StoreError::StaleEpoch { epoch: lease.epoch }.into()),
    }
}

/// How many values [`saved_columns`] gives.
pub(super) const SAVED_COLUMNS: usize = 14;

/// The id and every column a write may change of session row `s`, in the
/// order both session writes bind them: `id, last_seq, consumed_seq,
/// active_turn, lease_owner, lease_epoch, lease_expires_at, agent_session,
/// waiting_count, last_gather_seq, after_gather_count, last_steer_seq,
/// pending_first, pending_until`.
pub(super) fn saved_columns(s: &SessionRow) -> [Val; SAVED_COLUMNS] {
    args![
        s.id.to_string(),
        s.flow.last_seq as i64,
        s.flow.cursor as i64,
        s.flow.active.map(|t| t.to_string()),
        s.lease_owner.clone(),
        s.lease_epoch,
        s.lease_expires_at,
        s.agent_session.clone(),
        s.flow.queue.waiting as i64,
        s.flow.queue.last_gather.map(|g| g as i64),
        s.flow.queue.after_gather as i64,
        s.flow.queue.last_steer.map(|g| g as i64),
        s.flow.pending_first,
        s.flow.pending_until
    ]
}

pub(super) async fn save_session(c: &mut Conn, s: &SessionRow) -> R<()> {
    if c.defer_save(s) {
        return Ok(());
    }
    // Most posts only move the log's counters (a message queued behind a
    // running turn). When the writer remembers the row, it knows that, and
    // writes just those columns: none is indexed, so no index entry moves.
    let counters_only = c.remembered(s.id).is_some_and(|old| {
        old.flow.active == s.flow.active
            && old.lease_owner == s.lease_owner
            && old.lease_epoch == s.lease_epoch
            && old.lease_expires_at == s.lease_expires_at
            && old.agent_session == s.agent_session
            && old.flow.pending_until == s.flow.pending_until
    });
    let n = if counters_only {
        c.execute(
            "UPDATE sessions SET last_seq = $2, consumed_seq = $3, waiting_count = $4, \
             last_gather_seq = $5, after_gather_count = $6, last_steer_seq = $7, pending_first = $8 \
             WHERE id = $1",
            &args![
                s.id.to_string(),
                s.flow.last_seq as i64,
                s.flow.cursor as i64,
                s.flow.queue.waiting as i64,
                s.flow.queue.last_gather.map(|g| g as i64),
                s.flow.queue.after_gather as i64,
                s.flow.queue.last_steer.map(|g| g as i64),
                s.flow.pending_first
            ],
        )
        .await?
    } else {
        c.execute(
            "UPDATE sessions SET last_seq = $2, consumed_seq = $3, active_turn = $4, lease_owner = $5, \
             lease_epoch = $6, lease_expires_at = $7, agent_session = $8, waiting_count = $9, \
             last_gather_seq = $10, after_gather_count = $11, last_steer_seq = $12, pending_first = $13, \
             pending_until = $14 WHERE id = $1",
            &saved_columns(s),
        )
        .await?
    };
    if n == 1 {
        c.remember(s);
    } else {
        c.forget(s.id);
    }
    Ok(())
}

/// Locks the rows of sessions `ids` (sorted: every batch takes its locks in
/// id order, so two nodes batching the same sessions wait for each other
/// instead of deadlocking) for a lane's batch, which remembers them; the
/// time read once they are all locked, so no write is stamped earlier than
/// the commit it waited for.
///
/// The clock is read by the same statement: the locking query is a
/// subquery (PostgreSQL never flattens one that locks), so the outer
/// projection reads the clock for each row after that row's lock is held,
/// and the last row's reading follows every lock.
pub(crate) async fn lock_batch(c: &mut Conn, ids: &[String]) -> R<i64> {
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT s.*, {PG_CLOCK} AS locked_at FROM (SELECT {SESSION_COLS} FROM sessions \
         WHERE id IN ({}) ORDER BY id FOR UPDATE) AS s",
        placeholders.join(", ")
    );
    let args: Vec<Val> = ids.iter().map(Val::from).collect();
    let rows = c.fetch_all(&sql, &args).await?;
    let Conn::Batch(b) = c else {
        return Err(StoreError::Internal("locking a batch outside one".into()).into());
    };
    let mut now = None;
    for row in &rows {
        b.locked(session_row(row)?);
        now = now.max(Some(row.get::<i64>("locked_at")?));
    }
    match now {
        Some(now) => Ok(now),
        None => pg_now(c).await,
    }
}

/// Writes the session rows a lane's batch saved in memory, with one
/// statement.
pub(crate) async fn write_deferred_sessions(c: &mut Conn) -> R<()> {
    let Conn::Batch(b) = c else {
        return Ok(());
    };
    // Entries the batch's posts left to write go in the same statement, as
    // a data-modifying `WITH`: one round trip fewer for the batch.
    let mut args = b.take_entries();
    let entries = args.len() / ENTRY_VALUES;
    let mut rows = Vec::new();
    for (i, s) in b.deferred().enumerate() {
        let at = entries * ENTRY_VALUES + i * SAVED_COLUMNS;
        let cells: Vec<String> = (1..=SAVED_COLUMNS)
            .map(|k| format!("${}", at + k))
            .collect();
        rows.push(format!("({})", cells.join(", ")));
        args.extend(saved_columns(s));
    }
    if rows.is_empty() {
        if entries > 0 {
            c.execute(&super::posts::entries_insert(0, entries), &args)
                .await?;
        }
        return Ok(());
    }
    let n = rows.len() as u64;
    b.written();
    let with = if entries > 0 {
        format!(
            "WITH new_entries AS ({}) ",
            super::posts::entries_insert(0, entries)
        )
    } else {
        String::new()
    };
    let sql = format!(
        "{with}UPDATE sessions AS s SET last_seq = v.last_seq, consumed_seq = v.consumed_seq, \
         active_turn = v.active_turn, lease_owner = v.lease_owner, lease_epoch = v.lease_epoch, \
         lease_expires_at = v.lease_expires_at, agent_session = v.agent_session, \
         waiting_count = v.waiting_count, last_gather_seq = v.last_gather_seq, \
         after_gather_count = v.after_gather_count, last_steer_seq = v.last_steer_seq, \
         pending_first = v.pending_first, pending_until = v.pending_until \
         FROM (VALUES {}) AS v(id, last_seq, consumed_seq, active_turn, lease_owner, lease_epoch, \
         lease_expires_at, agent_session, waiting_count, last_gather_seq, after_gather_count, \
         last_steer_seq, pending_first, pending_until) WHERE s.id = v.id",
        rows.join(", ")
    );
    let written = c.execute(&sql, &args).await?;
    if written != n {
        return Err(StoreError::Internal(format!(
            "writing {n} locked session rows changed {written}"
        ))
        .into());
    }
    Ok(())
}

/// Moves session `id`'s counter by `by` the way a write does (read the
/// row, change it, save it), for tests of the lanes; the new value.
#[cfg(test)]
pub(crate) async fn bump_last_seq(c: &mut Conn, id: SessionId, by: i64) -> R<i64> {
    let mut s = lock_session(c, Dialect::Postgres, id)
        .await?
        .ok_or(StoreError::NotFound)?;
    s.flow.last_seq = s.flow.last_seq.saturating_add_signed(by);
    save_session(c, &s).await?;
    Ok(s.flow.last_seq as i64)
}

/// Extra columns a user message carries.
pub(super) struct UserMeta<'a> {
    pub(super) policy: Policy,
    pub(super) requested: Option<Policy>,
    pub(super) disposition: &'a Disposition,
    pub(super) key: Option<&'a str>,
}

/// Appends `e` at the next seq (I1: the counter lives in `s` and is saved by
/// the caller in the same transaction).
pub(super) async fn append(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    e: NewEntry,
    user: Option<UserMeta<'_>>,
) -> R<Entry> {
    let seq = s.flow.next_seq();
    put(c, s, now, seq, e, user).await
}

/// The `INSERT` of entries, without its `VALUES`: [`ENTRY_VALUES`] columns.
macro_rules! entry_insert {
    () => {
        "INSERT INTO entries (session_id, seq, kind, role, turn_id, content, status, \
         reason, input_from, input_to, tool, permission, policy, requested_policy, disposition, \
         idempotency_key, created_at)"
    };
}
pub(super) const ENTRY_INSERT: &str = entry_insert!();

/// The `INSERT` of one entry.
const ENTRY_INSERT_ONE: &str = concat!(
    entry_insert!(),
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
);

/// How many values [`entry_values`] gives.
pub(super) const ENTRY_VALUES: usize = 17;

/// The values of entry `e` at `seq` of session `id`, in [`ENTRY_INSERT`]'s
/// order.
pub(super) fn entry_values(
    id: SessionId,
    seq: Seq,
    e: &NewEntry,
    user: Option<&UserMeta<'_>>,
    now: i64,
) -> R<[Val; ENTRY_VALUES]> {
    let json = |what: &str, v: Result<String, serde_json::Error>| {
        v.map_err(|err| Fail::from(StoreError::Internal(format!("encoding {what}: {err}"))))
    };
    let tool = e
        .tool
        .as_ref()
        .map(|t| json("a tool call", serde_json::to_string(t)))
        .transpose()?;
    let permission = e
        .permission
        .as_ref()
        .map(|p| json("a permission", serde_json::to_string(p)))
        .transpose()?;
    let disposition = user
        .map(|u| json("a disposition", serde_json::to_string(u.disposition)))
        .transpose()?;
    Ok(args![
        id.to_string(),
        seq as i64,
        e.kind.as_str(),
        e.role.map(Role::as_str),
        e.turn_id.map(|t| t.to_string()),
        e.content.clone(),
        e.status.map(TurnStatus::as_str),
        e.reason.clone(),
        e.input.map(|i| i.from as i64),
        e.input.map(|i| i.to as i64),
        tool,
        permission,
        user.map(|u| u.policy.as_str()),
        user.and_then(|u| u.requested.map(Policy::as_str)),
        disposition,
        user.and_then(|u| u.key.map(str::to_owned)),
        now
    ])
}

/// Writes `e` at `seq`, which the session's procedure gave.
pub(super) async fn put(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    seq: Seq,
    e: NewEntry,
    user: Option<UserMeta<'_>>,
) -> R<Entry> {
    let values = entry_values(s.id, seq, &e, user.as_ref(), now)?;
    c.execute(ENTRY_INSERT_ONE, &values).await?;
    let entry = e.committed(s.id, seq, Timestamp(now));
    track_permission(c, s, &entry).await?;
    Ok(entry)
}

/// Keeps `permission_requests` in step with the log: a request entry opens
/// a pending row; a decision entry closes its request's row, which must be
/// pending (exactly once: a second decision for one request is refused).
pub(super) async fn track_permission(c: &mut Conn, s: &mut SessionRow, e: &Entry) -> R<()> {
    let (Some(p), Some(turn)) = (&e.permission, e.turn_id) else {
        return Ok(());
    };
    let opened = match e.kind {
        EntryType::PermissionRequest => {
            let request = serde_json::to_string(p)
                .map_err(|err| StoreError::Internal(format!("encoding a permission: {err}")))?;
            c.execute(
                "INSERT INTO permission_requests (session_id, request_id, turn_id, request_seq, request, state) \
                 VALUES ($1, $2, $3, $4, $5, 'pending')",
                &args![
                    e.session_id.to_string(),
                    p.request_id.clone(),
                    turn.to_string(),
                    e.seq as i64,
                    request
                ],
            )
            .await?;
            1
        }
        EntryType::PermissionDecision => {
            let n = c
                .execute(
                    "UPDATE permission_requests SET state = $3, decision_seq = $4 \
                     WHERE session_id = $1 AND request_id = $2 AND state = 'pending'",
                    &args![
                        e.session_id.to_string(),
                        p.request_id.clone(),
                        PermissionState::of_decision(p).as_str(),
                        e.seq as i64
                    ],
                )
                .await?;
            if n != 1 {
                return Err(StoreError::Internal(format!(
                    "a decision for permission request {:?}, which is not pending",
                    p.request_id
                ))
                .into());
            }
            -1
        }
        _ => return Ok(()),
    };
    s.open_permissions += opened;
    c.execute(
        "UPDATE sessions SET open_permissions = $2 WHERE id = $1",
        &args![s.id.to_string(), s.open_permissions],
    )
    .await?;
    Ok(())
}

/// Closes `turn`'s pending permission requests (with `only`, that one) as
/// `cancelled` by `decided_by`: one decision entry each, in request order.
pub(super) async fn close_pending(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    turn: TurnId,
    only: Option<&str>,
    decided_by: &str,
    reason: &str,
) -> R<Vec<Entry>> {
    if s.open_permissions <= 0 {
        return Ok(Vec::new());
    }
    let rows = c
        .fetch_all(
            "SELECT request_id, request FROM permission_requests \
             WHERE session_id = $1 AND turn_id = $2 AND state = 'pending' ORDER BY request_seq",
            &args![s.id.to_string(), turn.to_string()],
        )
        .await?;
    let mut closed = Vec::new();
    for row in &rows {
        let id: String = row.get("request_id")?;
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let raw: String = row.get("request")?;
        let request: PermissionInfo =
            serde_json::from_str(&raw).map_err(|_| corrupt("permission request", &raw))?;
        let mut e = NewEntry::permission_decision(turn, request.decision(None, decided_by));
        e.reason = Some(reason.to_owned());
        closed.push(append(c, s, now, e, None).await?);
    }
    Ok(closed)
}

/// A permission request of the session: its turn, what it asked, and its
/// decision if it has one.
pub(super) async fn permission_request(
    c: &mut Conn,
    s: &SessionRow,
    request_id: &str,
) -> R<(TurnId, PermissionInfo, PermissionState, Option<Entry>)> {
    // No request id holds a NUL byte, and PostgreSQL refuses one in text.
    if request_id.contains('\0') {
        return Err(StoreError::PermissionNotFound {
            request_id: request_id.to_owned(),
        }
        .into());
    }
    let row = c
        .fetch_optional(
            "SELECT turn_id, request, state, decision_seq FROM permission_requests \
             WHERE session_id = $1 AND request_id = $2",
            &args![s.id.to_string(), request_id],
        )
        .await?
        .ok_or_else(|| StoreError::PermissionNotFound {
            request_id: request_id.to_owned(),
        })?;
    let turn = parse_turn_id(row.get("turn_id")?)?
        .ok_or_else(|| corrupt("permission request", request_id))?;
    let raw: String = row.get("request")?;
    let request: PermissionInfo =
        serde_json::from_str(&raw).map_err(|_| corrupt("permission request", &raw))?;
    let state: String = row.get("state")?;
    let state =
        PermissionState::parse(&state).ok_or_else(|| corrupt("permission state", &state))?;
    let decision = match row.get::<Option<i64>>("decision_seq")? {
        Some(seq) => {
            let sql =
                format!("SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq = $2");
            let row = c.fetch_one(&sql, &args![s.id.to_string(), seq]).await?;
            Some(entry_row(&row)?)
        }
        None => None,
    };
    Ok((turn, request, state, decision))
}

pub(super) async fn op_answer(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    req: &AnswerPermission,
) -> R<Answered> {
    let mut s = lock_owned(c, d, &req.owner, req.session_id).await?;
    let (turn, request, state, decision) = permission_request(c, &s, &req.request_id).await?;
    let decided_by = format!("user:{}", req.owner);
    let recorded = decision.as_ref().and_then(|e| e.permission.as_ref());
    let closed = |state: PermissionState| {
        StoreError::PermissionClosed(Box::new(PermissionStatus {
            request_id: req.request_id.clone(),
            state,
            option_id: recorded.and_then(|p| p.option_id.clone()),
            decided_by: recorded.and_then(|p| p.decided_by.clone()),
            decision_seq: decision.as_ref().map(|e| e.seq),
        }))
    };
    match judge(&request, recorded, &req.option_id, &decided_by) {
        Judgement::UnknownOption => Err(StoreError::UnknownOption {
            request_id: req.request_id.clone(),
            option_id: req.option_id.clone(),
        }
        .into()),
        Judgement::Closed => Err(closed(state).into()),
        Judgement::Replay => match decision {
            Some(decision) => Ok(Answered {
                decision,
                replayed: true,
            }),
            None => Err(corrupt("permission decision", &req.request_id)),
        },
        // Pending rows belong to the active turn (a turn's end closes its
        // requests in the same transaction); checked all the same, so an
        // answer never lands outside its turn (I8).
        Judgement::Record if state != PermissionState::Pending || s.flow.active != Some(turn) => {
            Err(closed(state).into())
        }
        Judgement::Record => {
            let e = NewEntry::permission_decision(
                turn,
                request.decision(Some(req.option_id.clone()), decided_by),
            );
            let decision = append(c, &mut s, now, e, None).await?;
            save_session(c, &s).await?;
            Ok(Answered {
                decision,
                replayed: false,
            })
        }
    }
}

/// Refuses, before anything is written, entries a running turn may not
/// store as output: anything but the agent's messages, thoughts, tool calls
/// and results and permission requests and decisions, or an entry of another
/// turn. A `turn_ended` in the output would
/// be a second terminal entry (I7).
pub(super) fn check_output(turn: TurnId, entries: &[NewEntry]) -> Result<()> {
    for e in entries {
        let output = match e.kind {
            EntryType::Message => e.role.is_some_and(|r| r != Role::User),
            EntryType::Thought
            | EntryType::ToolCall
            | EntryType::ToolResult
            | EntryType::PermissionRequest
            | EntryType::PermissionDecision => true,
            EntryType::TurnStarted | EntryType::TurnEnded => false,
        };
        if !output || e.turn_id != Some(turn) {
            return Err(StoreError::Internal(format!(
                "not output of turn {turn}: a {:?} entry (role {:?}) of turn {:?}",
                e.kind, e.role, e.turn_id
            )));
        }
    }
    Ok(())
}

/// Refuses a turn end that is not: a terminal `status`, output, then the
/// turn's one `turn_ended` with that status, last.
pub(super) fn check_end(turn: TurnId, status: TurnStatus, entries: &[NewEntry]) -> Result<()> {
    if !status.is_terminal() {
        return Err(StoreError::Internal(format!(
            "turn {turn} cannot end {}: not a terminal status",
            status.as_str()
        )));
    }
    match entries.split_last() {
        Some((last, output))
            if last.kind == EntryType::TurnEnded
                && last.turn_id == Some(turn)
                && last.status == Some(status) =>
        {
            check_output(turn, output)
        }
        _ => Err(StoreError::Internal(format!(
            "the end of turn {turn} must close with its turn_ended ({})",
            status.as_str()
        ))),
    }
}

/// Creates a turn consuming `input`: the turn row, the cursor, the
/// `turn_started` entry — one transaction with whatever made it start.
pub(super) async fn start_turn(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    start: Start,
) -> R<Entry> {
    c.execute(
        "INSERT INTO turns (id, session_id, status, input_from, input_to, started_at) \
         VALUES ($1, $2, 'starting', $3, $4, $5)",
        &args![
            start.turn.to_string(),
            s.id.to_string(),
            start.input.from as i64,
            start.input.to as i64,
            now
        ],
    )
    .await?;
    put(
        c,
        s,
        now,
        start.seq,
        NewEntry::turn_started(start.turn, start.input),
        None,
    )
    .await
}

/// The first waiting message: the first user message after the cursor,
/// found by scanning the primary key from there (past the previous turn's
/// output), never the whole queue.
pub(super) async fn first_waiting(c: &mut Conn, s: &SessionRow) -> R<Seq> {
    let first: Option<i64> = c
        .scalar(
            "SELECT MIN(seq) FROM entries WHERE session_id = $1 AND role = 'user' AND seq > $2",
            &args![s.id.to_string(), s.flow.cursor as i64],
        )
        .await?;
    match first {
        Some(seq) => Ok(seq as Seq),
        None => Err(StoreError::Internal(format!(
            "session {} counts {} waiting messages but has none after seq {}",
            s.id, s.flow.queue.waiting, s.flow.cursor
        ))
        .into()),
    }
}

/// Starts the turn that is due, if one is: messages wait, none is active
/// and no debounce window holds them past `now`.
pub(super) async fn start_next(c: &mut Conn, s: &mut SessionRow, now: i64) -> R<Option<Entry>> {
    if s.flow.due(now).is_none() {
        return Ok(None);
    }
    let first = first_waiting(c, s).await?;
    match s.flow.heal(now, Some(first), TurnId::new()) {
        Ok(Some(start)) => Ok(Some(start_turn(c, s, now, start).await?)),
        Ok(None) => Ok(None),
        Err(need) => Err(StoreError::Internal(format!("starting a turn lacks {need:?}")).into()),
    }
}

/// Takes the lease for `node` if nobody holds it or the holder's expired.
pub(super) fn try_claim(s: &mut SessionRow, node: &str, now: i64, ttl: Duration) -> Option<Lease> {
    let free = s.lease_owner.is_none() || s.lease_expires_at.is_none_or(|t| t < now);
    free.then(|| claim(s, node, now, ttl))
}

pub(super) fn claim(s: &mut SessionRow, node: &str, now: i64, ttl: Duration) -> Lease {
    s.lease_owner = Some(node.to_owned());
    s.lease_epoch += 1;
    s.lease_expires_at = Some(now + ttl.as_micros() as i64);
    Lease {
        session_id: s.id,
        owner: node.to_owned(),
        epoch: s.lease_epoch,
    }
}

/// Ends the active turn with `status` if it is still starting or running
/// (compare-and-set: ended is absorbing), appends `entries`, and starts the
/// next turn if messages wait.
pub(super) async fn finish_turn(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    turn: TurnId,
    status: TurnStatus,
    reason: Option<String>,
    entries: Vec<NewEntry>,
) -> R<Ended> {
    let done = c
        .execute(
            "UPDATE turns SET status = $2, ended_at = $3, reason = $4 \
         WHERE id = $1 AND status IN ('starting', 'running')",
            &args![turn.to_string(), status.as_str(), now, reason.clone()],
        )
        .await?;
    if done != 1 || s.flow.active != Some(turn) {
        return Err(StoreError::TurnNotActive { turn_id: turn }.into());
    }
    let mut committed = Vec::with_capacity(entries.len() + 1);
    // A request still waiting is answered `cancelled` before the terminal
    // entry (never left open; nothing of the turn follows its end, I8), and
    // before the trailing tool results (the calls the end closes), so a
    // call's request and decision come before its result.
    let mut entries = entries;
    let last = entries.pop();
    let results_from = entries
        .iter()
        .rposition(|e| e.kind != EntryType::ToolResult)
        .map_or(0, |i| i + 1);
    let results = entries.split_off(results_from);
    for e in entries {
        committed.push(append(c, s, now, e, None).await?);
    }
    let by = if reason.as_deref() == Some("shutdown") {
        "shutdown"
    } else {
        "turn_end"
    };
    let why = format!("the turn ended {}", status.as_str());
    committed.extend(close_pending(c, s, now, turn, None, by, &why).await?);
    for e in results {
        committed.push(append(c, s, now, e, None).await?);
    }
    committed.extend(match last {
        Some(e) => Some(append(c, s, now, e, None).await?),
        None => None,
    });
    s.flow
        .end(turn)
        .map_err(|_| StoreError::TurnNotActive { turn_id: turn })?;
    let next = start_next(c, s, now).await?;
    let next_id = next.as_ref().and_then(|e| e.turn_id);
    committed.extend(next);
    Ok(Ended {
        committed,
        next: next_id,
    })
}

/// The session's active turn if it is still `starting`, with its input
/// messages and any cancel requested before it ran.
pub(super) async fn starting_turn(
    c: &mut Conn,
    s: &SessionRow,
) -> R<Option<(TurnToRun, Option<String>)>> {
    let Some(turn_id) = s.flow.active else {
        return Ok(None);
    };
    let sql = format!("SELECT {TURN_COLS}, cancel_reason FROM turns WHERE id = $1");
    let row = c.fetch_one(&sql, &args![turn_id.to_string()]).await?;
    let turn = turn_row(&row)?;
    if turn.status != TurnStatus::Starting {
        return Ok(None);
    }
    let cancel = row.get("cancel_reason")?;
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND role = 'user' AND seq >= $2 AND seq <= $3 ORDER BY seq"
    );
    let rows = c
        .fetch_all(
            &sql,
            &args![
                s.id.to_string(),
                turn.input.from as i64,
                turn.input.to as i64
            ],
        )
        .await?;
    let inputs = rows.iter().map(entry_row).collect::<R<Vec<_>>>()?;
    let todo = TurnToRun {
        turn,
        agent: s.agent.clone(),
        inputs,
        agent_session: s.agent_session.clone(),
        permission: s.permission,
    };
    Ok(Some((todo, cancel)))
}

/// Moves a `starting` turn to `running` under the lease of `epoch`.
pub(super) async fn mark_running(c: &mut Conn, turn: TurnId, epoch: baton_core::Epoch) -> R<()> {
    c.execute(
        "UPDATE turns SET status = 'running', epoch = $2 WHERE id = $1 AND status = 'starting'",
        &args![turn.to_string(), epoch],
    )
    .await?;
    Ok(())
}

/// Moves the locked session's starting `turn` to `running` under `lease`,
/// unless a cancel came first (then it stays `starting`, to be ended).
pub(super) async fn begin(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    cfg: &StoreConfig,
    lease: &Lease,
    turn: TurnId,
    cancel: Option<String>,
) -> R<Begin> {
    if let Some(reason) = cancel {
        return Ok(Begin::Cancelled(reason));
    }
    mark_running(c, turn, lease.epoch).await?;
    // Starting a turn proves the holder alive: extend the lease, so
    // back-to-back turns shorter than a heartbeat never let it lapse.
    s.lease_expires_at = Some(now + cfg.lease_ttl.as_micros() as i64);
    save_session(c, s).await?;
    Ok(Begin::Run)
}

// ---------------------------------------------------------------------------
// Operations

pub(super) async fn op_create(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    cfg: &StoreConfig,
    req: &CreateSession,
) -> R<Created> {
    if let Some(key) = &req.idempotency_key {
        let sql = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE owner = $1 AND idempotency_key = $2{}",
            d.for_update()
        );
        let row = c.fetch_optional(&sql, &args![&req.owner, key]).await?;
        if let Some(row) = row {
            let s = session_row(&row)?;
            if s.fingerprint.as_deref() != Some(req.fingerprint.as_str()) {
                return Err(StoreError::IdempotencyConflict.into());
            }
            return Ok(Created {
                session: session_view(&s)?,
                created: false,
                committed: Vec::new(),
                lease: None,
            });
        }
    }
    let metadata = serde_json::to_string(&req.metadata)
        .map_err(|e| StoreError::Internal(format!("encoding metadata: {e}")))?;
    let mut s = SessionRow {
        id: SessionId::new(),
        owner: req.owner.clone(),
        agent: req.agent.clone(),
        metadata,
        created_at: now,
        flow: SessionState::new(
            req.policy,
            i64::try_from(req.debounce_ms).unwrap_or(i64::MAX),
        ),
        lease_owner: None,
        lease_epoch: 0,
        lease_expires_at: None,
        fingerprint: req
            .idempotency_key
            .as_ref()
            .map(|_| req.fingerprint.clone()),
        agent_session: None,
        permission: req.permission,
        open_permissions: 0,
    };
    c.execute("INSERT INTO sessions (id, owner, agent, policy, metadata, created_at, idempotency_key, request_fingerprint, permission, debounce_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", &args![s.id.to_string(), &s.owner, &s.agent, s.flow.policy.as_str(), &s.metadata, now, req.idempotency_key.clone(), s.fingerprint.clone(), s.permission.map(PermissionPolicy::as_str), s.flow.debounce_ms])
    .await?;
    let mut committed = Vec::new();
    let mut lease = None;
    if let Some(content) = &req.message {
        // The first message is decided like any other on an idle session: a
        // turn starts with it, or a debounce window opens.
        let post = Post {
            policy: None,
            agent_takes_input: false,
            capacity: cfg.queue_capacity as u64,
            now,
            heal_turn: TurnId::new(),
            turn: TurnId::new(),
        };
        let Ok(Ok(a)) = s.flow.post(&post, None) else {
            return Err(
                StoreError::Internal("an idle session refused its first message".into()).into(),
            );
        };
        let meta = UserMeta {
            policy: a.waits_as,
            requested: None,
            disposition: &a.disposition,
            key: None,
        };
        let msg = put(
            c,
            &mut s,
            now,
            a.seq,
            NewEntry::user_message(content.clone()),
            Some(meta),
        )
        .await?;
        committed.push(msg);
        if let Some(start) = a.started {
            committed.push(start_turn(c, &mut s, now, start).await?);
            lease = Some(claim(&mut s, &req.node, now, cfg.lease_ttl));
        }
        save_session(c, &s).await?;
    }
    Ok(Created {
        session: session_view(&s)?,
        created: true,
        committed,
        lease,
    })
}

pub(super) async fn op_post(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    cfg: &StoreConfig,
    req: &PostMessage,
    run_here: bool,
) -> R<Posted> {
    let mut s = lock_owned(c, d, &req.owner, req.session_id).await?;
    if let Some(key) = &req.idempotency_key {
        let sql = format!(
            "SELECT {ENTRY_COLS}, requested_policy, disposition FROM entries WHERE session_id = $1 AND idempotency_key = $2"
        );
        let row = c
            .fetch_optional(&sql, &args![s.id.to_string(), key])
            .await?;
        if let Some(row) = row {
            let stored = StoredMessage::from_row(&row)?;
            if !stored.is(req) {
                return Err(StoreError::IdempotencyConflict.into());
            }
            return stored.replay();
        }
    }
    let post = Post {
        policy: req.policy,
        agent_takes_input: req.mid_turn_agents.contains(&s.agent),
        capacity: cfg.queue_capacity as u64,
        now,
        heal_turn: TurnId::new(),
        turn: TurnId::new(),
    };
    // The procedure asks for what it needs beyond the row: each question is
    // asked at most once.
    let mut first = None;
    let decided = loop {
        match s.flow.post(&post, first) {
            Ok(decided) => break decided,
            Err(Need::FirstWaiting) if first.is_none() => {
                first = Some(first_waiting(c, &s).await?);
            }
            Err(Need::Cancelling(turn)) if s.flow.cancelling.is_none() => {
                s.flow.cancelling = Some(cancel_requested(c, turn).await?);
            }
            Err(need) => {
                return Err(
                    StoreError::Internal(format!("deciding a message lacks {need:?}")).into(),
                )
            }
        }
    };
    let a = match decided {
        Ok(a) => a,
        Err(Refusal::Busy { turn }) => return Err(StoreError::SessionBusy { turn_id: turn }.into()),
        Err(Refusal::QueueFull { capacity }) => {
            return Err(StoreError::QueueFull {
                capacity: capacity as usize,
            }
            .into())
        }
    };
    write_post(c, now, cfg, req, run_here, &mut s, &a).await
}

/// A message stored under an idempotency key, as a retry finds it: read
/// from [`ENTRY_COLS`] and the `requested_policy` and `disposition` columns.
pub(super) struct StoredMessage {
    pub(super) entry: Entry,
    requested: Option<String>,
    disposition: String,
}

impl StoredMessage {
    pub(super) fn from_row(row: &Row) -> R<Self> {
        Ok(Self {
            entry: entry_row(row)?,
            requested: row.get("requested_policy")?,
            disposition: row
                .get::<Option<String>>("disposition")?
                .unwrap_or_default(),
        })
    }

    /// Whether `req` is the request stored (same content, same requested
    /// policy): a retry, not a key used again for something else.
    pub(super) fn is(&self, req: &PostMessage) -> bool {
        self.entry.content.as_deref() == Some(req.content.as_str())
            && self.requested.as_deref() == req.policy.map(Policy::as_str)
    }

    /// The answer to a retry of it.
    pub(super) fn replay(&self) -> R<Posted> {
        let disposition = serde_json::from_str(&self.disposition)
            .map_err(|_| corrupt("disposition", &self.disposition))?;
        Ok(replayed(self.entry.clone(), disposition))
    }
}

/// The answer to a retry of the message stored as `entry`: nothing new was
/// committed, started or asked for.
pub(super) fn replayed(entry: Entry, disposition: Disposition) -> Posted {
    Posted {
        entry,
        disposition,
        replayed: true,
        committed: Vec::new(),
        lease: None,
        cancel: None,
        begun: None,
        steer: None,
        pending_until: None,
    }
}

/// The turn `start` of session `s`, begun (`running`) by the post that
/// started it, whose message is `entry`.
pub(super) fn begun_turn(s: &SessionRow, now: i64, start: Start, entry: &Entry) -> TurnToRun {
    TurnToRun {
        turn: Turn {
            id: start.turn,
            session_id: s.id,
            status: TurnStatus::Running,
            input: start.input,
            started_at: Timestamp(now),
            ended_at: None,
            reason: None,
        },
        agent: s.agent.clone(),
        inputs: vec![entry.clone()],
        agent_session: s.agent_session.clone(),
        permission: s.permission,
    }
}

/// Writes what the procedure decided for message `req` on session `s`:
/// the turn it healed, the message, the turn it started, the cancel it
/// asked for, and the session row.
pub(super) async fn write_post(
    c: &mut Conn,
    now: i64,
    cfg: &StoreConfig,
    req: &PostMessage,
    run_here: bool,
    s: &mut SessionRow,
    a: &Accepted,
) -> R<Posted> {
    let mut committed = Vec::new();
    let mut lease = None;
    if let Some(healed) = a.healed {
        committed.push(start_turn(c, s, now, healed).await?);
        lease = try_claim(s, &req.node, now, cfg.lease_ttl);
    }
    let meta = UserMeta {
        policy: a.waits_as,
        requested: req.policy,
        disposition: &a.disposition,
        key: req.idempotency_key.as_deref(),
    };
    let entry = put(
        c,
        s,
        now,
        a.seq,
        NewEntry::user_message(req.content.clone()),
        Some(meta),
    )
    .await?;
    committed.push(entry.clone());
    let mut begun = None;
    if let Some(start) = a.started {
        committed.push(start_turn(c, s, now, start).await?);
        if lease.is_none() {
            lease = try_claim(s, &req.node, now, cfg.lease_ttl);
            // The turn is this message's alone and this node takes the lease
            // now: begin it here (as `begin` would, with no cancel possible
            // yet), so the worker need not commit a `take_turn` first.
            if let (true, Some(l)) = (run_here, &lease) {
                mark_running(c, start.turn, l.epoch).await?;
                begun = Some(begun_turn(s, now, start, &entry));
            }
        }
    }
    if let Some(turn) = a.cancel {
        request_cancel_turn(c, turn, &format!("interrupted by message {}", entry.seq)).await?;
    }
    save_session(c, s).await?;
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

/// Whether a cancel was asked for `turn` (it will not take more input).
pub(super) async fn cancel_requested(c: &mut Conn, turn: TurnId) -> R<bool> {
    let reason: Option<String> = c
        .scalar(
            "SELECT cancel_reason FROM turns WHERE id = $1",
            &args![turn.to_string()],
        )
        .await?;
    Ok(reason.is_some())
}

pub(super) async fn request_cancel_turn(c: &mut Conn, turn: TurnId, reason: &str) -> R<()> {
    // The first reason sticks: a later cancel is idempotent.
    c.execute(
        "UPDATE turns SET cancel_reason = COALESCE(cancel_reason, $2) WHERE id = $1",
        &args![turn.to_string(), reason],
    )
    .await?;
    Ok(())
}

pub(super) async fn op_recover_one(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    cfg: &StoreConfig,
    node: &str,
    id: SessionId,
    all_foreign: bool,
) -> R<Option<Recovered>> {
    let Some(mut s) = lock_session(c, d, id).await? else {
        return Ok(None);
    };
    let Some(turn) = s.flow.active else {
        return Ok(None);
    };
    // A lease given up on purpose (a node shutting down between turns)
    // hands the queue over: that is not a worker vanishing, so it does not
    // count against the turn's bounded recovery.
    let released = s.lease_owner.is_none();
    let expired = released || s.lease_expires_at.is_none_or(|t| t < now);
    let foreign = s.lease_owner.as_deref() != Some(node);
    if !(expired || (all_foreign && foreign)) {
        return Ok(None);
    }
    let lease = claim(&mut s, node, now, cfg.lease_ttl);
    let row = c
        .fetch_one(
            "SELECT status, recoveries, input_from FROM turns WHERE id = $1",
            &args![turn.to_string()],
        )
        .await?;
    let status: String = row.get("status")?;
    let recoveries: i64 = row.get("recoveries")?;
    let input_from: i64 = row.get("input_from")?;
    let mut committed = Vec::new();
    let end = match status.as_str() {
        "running" => Some((
            TurnStatus::Lost,
            "lost: the worker running this turn vanished and its lease expired".to_owned(),
        )),
        _ if released => None,
        _ if recoveries >= cfg.max_recoveries => Some((
            TurnStatus::Failed,
            format!("failed: handed to {recoveries} workers that vanished before running it"),
        )),
        _ => {
            c.execute(
                "UPDATE turns SET recoveries = recoveries + 1 WHERE id = $1",
                &args![turn.to_string()],
            )
            .await?;
            None
        }
    };
    if let Some((status, reason)) = end {
        // The vanished worker's open tool calls are closed here, in the
        // transaction that ends its turn.
        let mut entries: Vec<NewEntry> = open_tool_calls(c, s.id, turn, input_from)
            .await?
            .into_iter()
            .map(|id| NewEntry::tool_closed(turn, id, status, Some(&reason)))
            .collect();
        entries.push(NewEntry::turn_ended(turn, status, Some(reason.clone())));
        committed = finish_turn(c, &mut s, now, turn, status, Some(reason), entries)
            .await?
            .committed;
    }
    save_session(c, &s).await?;
    Ok(Some(Recovered { lease, committed }))
}

/// The tool calls `turn` stored and never answered, in call order. The
/// turn's output lies after its first input (`input_from`): the scan starts
/// there on the primary key. Not after its last input: a turn that took
/// steered input has output before it.
pub(super) async fn open_tool_calls(
    c: &mut Conn,
    session: SessionId,
    turn: TurnId,
    input_from: i64,
) -> R<Vec<String>> {
    let rows = c
        .fetch_all(
            "SELECT kind, tool FROM entries WHERE session_id = $1 AND seq > $2 AND turn_id = $3 \
             AND kind IN ('tool_call', 'tool_result') ORDER BY seq",
            &args![session.to_string(), input_from, turn.to_string()],
        )
        .await?;
    let mut open: Vec<String> = Vec::new();
    for row in rows {
        let kind: String = row.get("kind")?;
        let tool: Option<String> = row.get("tool")?;
        let Some(tool) = tool else { continue };
        let id = serde_json::from_str::<ToolInfo>(&tool)
            .map_err(|_| corrupt("tool", &tool))?
            .id;
        if kind == "tool_call" {
            if !open.contains(&id) {
                open.push(id);
            }
        } else {
            open.retain(|o| *o != id);
        }
    }
    Ok(open)
}
