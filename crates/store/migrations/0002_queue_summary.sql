-- A summary of each session's waiting messages (baton_core::QueueSummary),
-- kept in step with the cursor so that posting a message and starting a turn
-- cost the same however long the queue is.
ALTER TABLE sessions ADD COLUMN waiting_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN last_gather_seq BIGINT;
ALTER TABLE sessions ADD COLUMN after_gather_count BIGINT NOT NULL DEFAULT 0;

UPDATE sessions SET waiting_count = (
    SELECT COUNT(*) FROM entries e
    WHERE e.session_id = sessions.id AND e.role = 'user' AND e.seq > sessions.consumed_seq
);
UPDATE sessions SET last_gather_seq = (
    SELECT MAX(e.seq) FROM entries e
    WHERE e.session_id = sessions.id AND e.role = 'user' AND e.seq > sessions.consumed_seq
      AND e.policy IN ('merge', 'interrupt')
);
UPDATE sessions SET after_gather_count = (
    SELECT COUNT(*) FROM entries e
    WHERE e.session_id = sessions.id AND e.role = 'user'
      AND e.seq > COALESCE(sessions.last_gather_seq, sessions.consumed_seq)
);
