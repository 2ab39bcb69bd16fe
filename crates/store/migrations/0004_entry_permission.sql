-- Permission requests and decisions carry their request id, tool call,
-- options and outcome as JSON, like `tool` does for tool calls.
ALTER TABLE entries ADD COLUMN permission TEXT;
