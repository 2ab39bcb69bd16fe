//! The tables' columns, and rows read into the store's types.

use super::*;

pub(super) const SESSION_COLS: &str = "id, owner, agent, policy, metadata, created_at, last_seq, consumed_seq, \
     active_turn, lease_owner, lease_epoch, lease_expires_at, idempotency_key, request_fingerprint, agent_session, \
     waiting_count, last_gather_seq, after_gather_count, permission, open_permissions, \
     last_steer_seq, debounce_ms, pending_first, pending_until";

pub(super) const ENTRY_COLS: &str =
    "session_id, seq, kind, role, turn_id, content, status, reason, input_from, input_to, tool, permission, created_at";

pub(super) const TURN_COLS: &str =
    "id, session_id, status, input_from, input_to, started_at, ended_at, reason";

#[derive(Clone, Debug)]
pub(crate) struct SessionRow {
    pub(crate) id: SessionId,
    pub(super) owner: String,
    pub(super) agent: String,
    pub(super) metadata: String,
    pub(super) created_at: i64,
    /// What the session's decisions read and change ([`baton_core::flow`]).
    pub(super) flow: SessionState,
    pub(super) lease_owner: Option<String>,
    pub(super) lease_epoch: i64,
    pub(super) lease_expires_at: Option<i64>,
    pub(super) fingerprint: Option<String>,
    pub(super) agent_session: Option<String>,
    /// Set at creation only.
    pub(super) permission: Option<PermissionPolicy>,
    /// Pending permission requests; written by [`track_permission`] alone.
    pub(super) open_permissions: i64,
}

pub(super) fn corrupt(what: &str, value: &str) -> Fail {
    Fail::Store(StoreError::Internal(format!(
        "corrupt {what} in the store: {value:?}"
    )))
}

pub(super) fn parse_turn_id(s: Option<String>) -> R<Option<TurnId>> {
    s.map(|s| TurnId::parse(&s).map_err(|_| corrupt("turn id", &s)))
        .transpose()
}

pub(super) fn session_row(r: &Row) -> R<SessionRow> {
    let id: String = r.get("id")?;
    let policy: String = r.get("policy")?;
    let permission: Option<String> = r.get("permission")?;
    Ok(SessionRow {
        id: SessionId::parse(&id).map_err(|_| corrupt("session id", &id))?,
        owner: r.get("owner")?,
        agent: r.get("agent")?,
        metadata: r.get("metadata")?,
        created_at: r.get("created_at")?,
        flow: SessionState {
            last_seq: r.get::<i64>("last_seq")?.max(0) as Seq,
            cursor: r.get::<i64>("consumed_seq")?.max(0) as Seq,
            active: parse_turn_id(r.get("active_turn")?)?,
            // Read when a decision needs it: a cancel is asked for on the
            // turn's row.
            cancelling: None,
            queue: QueueSummary {
                waiting: r.get::<i64>("waiting_count")?.max(0) as u64,
                last_gather: r.get::<Option<i64>>("last_gather_seq")?.map(|s| s as Seq),
                after_gather: r.get::<i64>("after_gather_count")?.max(0) as u64,
                last_steer: r.get::<Option<i64>>("last_steer_seq")?.map(|s| s as Seq),
            },
            policy: policy.parse().map_err(|_| corrupt("policy", &policy))?,
            debounce_ms: r.get("debounce_ms")?,
            pending_first: r.get("pending_first")?,
            pending_until: r.get("pending_until")?,
        },
        lease_owner: r.get("lease_owner")?,
        lease_epoch: r.get("lease_epoch")?,
        lease_expires_at: r.get("lease_expires_at")?,
        fingerprint: r.get("request_fingerprint")?,
        agent_session: r.get("agent_session")?,
        permission: permission
            .map(|p| p.parse().map_err(|_| corrupt("permission policy", &p)))
            .transpose()?,
        open_permissions: r.get("open_permissions")?,
    })
}

pub(super) fn entry_row(r: &Row) -> R<Entry> {
    let sid: String = r.get("session_id")?;
    let kind: String = r.get("kind")?;
    let role: Option<String> = r.get("role")?;
    let status: Option<String> = r.get("status")?;
    let from: Option<i64> = r.get("input_from")?;
    let to: Option<i64> = r.get("input_to")?;
    let tool: Option<String> = r.get("tool")?;
    let permission: Option<String> = r.get("permission")?;
    Ok(Entry {
        seq: r.get::<i64>("seq")? as Seq,
        session_id: SessionId::parse(&sid).map_err(|_| corrupt("session id", &sid))?,
        kind: EntryType::parse(&kind).ok_or_else(|| corrupt("entry kind", &kind))?,
        role: role
            .map(|s| Role::parse(&s).ok_or_else(|| corrupt("role", &s)))
            .transpose()?,
        turn_id: parse_turn_id(r.get("turn_id")?)?,
        content: r.get("content")?,
        status: status
            .map(|s| TurnStatus::parse(&s).ok_or_else(|| corrupt("turn status", &s)))
            .transpose()?,
        reason: r.get("reason")?,
        input: from.zip(to).map(|(f, t)| InputRange {
            from: f as Seq,
            to: t as Seq,
        }),
        tool: tool
            .map(|s| serde_json::from_str::<ToolInfo>(&s).map_err(|_| corrupt("tool", &s)))
            .transpose()?,
        permission: permission
            .map(|s| {
                serde_json::from_str::<PermissionInfo>(&s).map_err(|_| corrupt("permission", &s))
            })
            .transpose()?,
        created_at: Timestamp(r.get("created_at")?),
    })
}

pub(super) fn turn_row(r: &Row) -> R<Turn> {
    let id: String = r.get("id")?;
    let sid: String = r.get("session_id")?;
    let status: String = r.get("status")?;
    Ok(Turn {
        id: TurnId::parse(&id).map_err(|_| corrupt("turn id", &id))?,
        session_id: SessionId::parse(&sid).map_err(|_| corrupt("session id", &sid))?,
        status: TurnStatus::parse(&status).ok_or_else(|| corrupt("turn status", &status))?,
        input: InputRange {
            from: r.get::<i64>("input_from")? as Seq,
            to: r.get::<i64>("input_to")? as Seq,
        },
        started_at: Timestamp(r.get("started_at")?),
        ended_at: r.get::<Option<i64>>("ended_at")?.map(Timestamp),
        reason: r.get("reason")?,
    })
}

pub(super) fn session_view(s: &SessionRow) -> R<Session> {
    Ok(Session {
        id: s.id,
        owner: s.owner.clone(),
        agent: s.agent.clone(),
        policy: s.flow.policy,
        status: if s.flow.active.is_some() {
            SessionStatus::Running
        } else {
            SessionStatus::Idle
        },
        turn_id: s.flow.active,
        last_seq: s.flow.last_seq as Seq,
        queued: s.flow.queue.waiting,
        debounce_ms: s.flow.debounce_ms.max(0) as u64,
        pending_until: s.flow.pending_until.map(Timestamp),
        created_at: Timestamp(s.created_at),
        metadata: serde_json::from_str(&s.metadata)
            .map_err(|_| corrupt("metadata", &s.metadata))?,
        permission: s.permission,
        pending_permissions: Vec::new(),
    })
}
