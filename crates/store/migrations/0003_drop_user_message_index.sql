-- The partial index of user messages cost every append one more B-tree
-- insert and, on SQLite, one more page written per session per commit.
-- Its two readers (the first waiting message; a turn's inputs) scan the
-- primary key (session_id, seq) from the cursor instead: what lies between
-- the cursor and the first waiting message is the previous turn's output,
-- which that turn already paid to write.
DROP INDEX IF EXISTS entries_user_messages;
