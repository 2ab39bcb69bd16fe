-- One schema for SQLite and PostgreSQL: only types and syntax both accept.
-- Times are microseconds since the Unix epoch from the store's clock.

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    owner               TEXT NOT NULL,
    agent               TEXT NOT NULL,
    policy              TEXT NOT NULL,
    metadata            TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    -- I1: the per-session counter, bumped in the transaction that inserts.
    last_seq            BIGINT NOT NULL DEFAULT 0,
    -- I6: the durable cursor: the last user message handed to a turn.
    consumed_seq        BIGINT NOT NULL DEFAULT 0,
    -- I4: the turn starting or running; at most one by construction.
    active_turn         TEXT,
    -- I4: who may run this session's turns, with a fencing epoch.
    lease_owner         TEXT,
    lease_epoch         BIGINT NOT NULL DEFAULT 0,
    lease_expires_at    BIGINT,
    idempotency_key     TEXT,
    request_fingerprint TEXT,
    -- The agent's own id for this conversation (ACP session id).
    agent_session       TEXT
);
CREATE UNIQUE INDEX sessions_owner_idempotency ON sessions (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX sessions_owner_created ON sessions (owner, created_at);
CREATE INDEX sessions_with_work ON sessions (lease_expires_at) WHERE active_turn IS NOT NULL;

CREATE TABLE entries (
    session_id       TEXT NOT NULL,
    seq              BIGINT NOT NULL,
    kind             TEXT NOT NULL,
    role             TEXT,
    turn_id          TEXT,
    content          TEXT,
    status           TEXT,
    reason           TEXT,
    input_from       BIGINT,
    input_to         BIGINT,
    tool             TEXT,
    -- User messages: the policy in force, what the request asked for, and
    -- the disposition answered, so a retry gets the same answer (I3).
    policy           TEXT,
    requested_policy TEXT,
    disposition      TEXT,
    idempotency_key  TEXT,
    created_at       BIGINT NOT NULL,
    -- I1's backstop.
    PRIMARY KEY (session_id, seq)
);
-- I3's backstop.
CREATE UNIQUE INDEX entries_idempotency ON entries (session_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX entries_user_messages ON entries (session_id, seq) WHERE role = 'user';

CREATE TABLE turns (
    id            TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL,
    status        TEXT NOT NULL,
    input_from    BIGINT NOT NULL,
    input_to      BIGINT NOT NULL,
    started_at    BIGINT NOT NULL,
    ended_at      BIGINT,
    reason        TEXT,
    -- A requested cancel, durable so any node running the turn sees it.
    cancel_reason TEXT,
    -- Times the turn was handed to a worker that then vanished before running it.
    recoveries    BIGINT NOT NULL DEFAULT 0,
    epoch         BIGINT
);
-- I4's backstop: one turn starting or running per session.
CREATE UNIQUE INDEX turns_one_active ON turns (session_id)
    WHERE status IN ('starting', 'running');
CREATE INDEX turns_session ON turns (session_id, started_at);
