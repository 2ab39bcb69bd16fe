-- Steering: the last waiting steered message (baton_core::QueueSummary's
-- last_steer): the running turn may take every waiting message up to it.
ALTER TABLE sessions ADD COLUMN last_steer_seq BIGINT;
-- Debounce: the session's window (ms; 0: off), and the window open now: when
-- its first message arrived and when its turn starts (store clock, µs). The
-- start is decided from these, so it survives a restart and any node may
-- make it.
ALTER TABLE sessions ADD COLUMN debounce_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN pending_first BIGINT;
ALTER TABLE sessions ADD COLUMN pending_until BIGINT;
CREATE INDEX sessions_pending ON sessions (pending_until) WHERE pending_until IS NOT NULL;
