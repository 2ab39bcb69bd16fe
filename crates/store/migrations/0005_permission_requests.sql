-- A session may set what its agent's permission requests get (allow, deny,
-- ask); NULL: the agent's own policy.
ALTER TABLE sessions ADD COLUMN permission TEXT;

-- Every permission request of a turn and where it stands. The request and
-- its decision are entries of the log; this row is what makes the answer
-- exactly once: it moves from 'pending' to 'answered' or 'cancelled' in the
-- transaction that appends the decision, with the session row locked.
CREATE TABLE permission_requests (
    session_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    turn_id      TEXT NOT NULL,
    -- The permission_request entry, and its PermissionInfo as JSON.
    request_seq  BIGINT NOT NULL,
    request      TEXT NOT NULL,
    state        TEXT NOT NULL,
    -- The permission_decision entry, once there is one.
    decision_seq BIGINT,
    PRIMARY KEY (session_id, request_id)
);
CREATE INDEX permission_requests_pending ON permission_requests (session_id, turn_id)
    WHERE state = 'pending';

-- How many of the session's requests are pending: a turn's end looks for
-- requests to close only when there are some, so turns that never ask pay
-- nothing for it.
ALTER TABLE sessions ADD COLUMN open_permissions BIGINT NOT NULL DEFAULT 0;
