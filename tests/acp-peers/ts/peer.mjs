#!/usr/bin/env node
// Offline ACP test agent on the official TypeScript SDK (npm
// `@agentclientprotocol/sdk`, pinned in package.json / package-lock.json).
//
// Baton's interop tests spawn this process and drive it over stdio. It never
// calls a model: it echoes, and it can be told to misbehave by directives at
// the start of the prompt text. Behaviour is identical to the Python peer
// (tests/acp-peers/python/peer.py) and the Rust peer (crates/acp-peer); see
// tests/acp-peers/README.md for the full contract.
//
// stdout is the JSON-RPC channel: nothing else may be printed there (no
// console.log). Diagnostics go to stderr.

import { randomUUID } from "node:crypto";
import { appendFileSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Readable, Writable } from "node:stream";

const PEER_NAME = "baton-acp-peer-ts";

if (process.env.ACP_PEER_CRASH_ON_START === "1") {
  process.stderr.write("peer refuses to start\n");
  process.exit(4);
}

// Imported after the crash-on-start check, on purpose.
const { agent, methods, ndJsonStream, RequestError } = await import("@agentclientprotocol/sdk");

const log = (message) => process.stderr.write(`[${PEER_NAME}] ${message}\n`);

const LOAD_SESSION = process.env.ACP_PEER_LOAD_SESSION === "1";
const STATE_DIR = process.env.ACP_PEER_STATE_DIR || null;
function envMs(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) {
    log(`ignoring bad ${name}=${JSON.stringify(raw)}`);
    return fallback;
  }
  return n;
}
const DELAY_MS = envMs("ACP_PEER_DELAY_MS", 5);
const STDIN_DELAY_MS = envMs("ACP_PEER_STDIN_DELAY_MS", 0);
const INIT_DELAY_MS = envMs("ACP_PEER_INIT_DELAY_MS", 0);

// Directives understood at the start of the prompt text; they may be chained
// ("/slow 50 /tool hello").
const SIMPLE_DIRECTIVES = new Set([
  "/hang",
  "/late",
  "/ignore-cancel",
  "/die",
  "/tool",
  "/permission",
  "/ask-permission",
  "/after-done",
  "/chatty",
  "/chatty-hang",
  "/think",
]);

function parseDirectives(text) {
  const found = new Map();
  let rest = text.trimStart();
  while (rest.startsWith("/")) {
    const m = /^(\S+)\s*([\s\S]*)$/.exec(rest);
    const word = m[1];
    const after = m[2];
    if (SIMPLE_DIRECTIVES.has(word)) {
      found.set(word, true);
      rest = after;
      continue;
    }
    if (word === "/slow") {
      const arg = /^(\d+)(?:\s+([\s\S]*))?$/.exec(after);
      if (arg) {
        found.set("/slow", Number(arg[1]));
        rest = (arg[2] ?? "").trimStart();
        continue;
      }
    }
    break; // not a directive: part of the text to echo
  }
  return { directives: found, rest };
}

// One chunk per word, each carrying the whitespace that follows it.
function splitChunks(reply) {
  const chunks = reply.match(/\S+\s*/g) ?? [];
  const lead = reply.slice(0, reply.length - reply.trimStart().length);
  if (lead) {
    if (chunks.length) chunks[0] = lead + chunks[0];
    else chunks.push(lead);
  }
  return chunks;
}

const SAFE_ID = /^[A-Za-z0-9_.-]+$/;

class Session {
  constructor(id, history = []) {
    this.id = id;
    this.history = history; // [{role: "user"|"agent", text}]
    this.turns = new Set(); // running turns, cancelled by session/cancel
  }

  save() {
    if (!STATE_DIR) return;
    mkdirSync(STATE_DIR, { recursive: true });
    const path = join(STATE_DIR, `${this.id}.json`);
    writeFileSync(`${path}.tmp`, JSON.stringify({ sessionId: this.id, history: this.history }));
    renameSync(`${path}.tmp`, path);
  }

  static load(id) {
    if (!STATE_DIR || !SAFE_ID.test(id)) return null;
    try {
      const data = JSON.parse(readFileSync(join(STATE_DIR, `${id}.json`), "utf8"));
      return new Session(id, Array.isArray(data.history) ? data.history : []);
    } catch {
      return null;
    }
  }
}

const sessions = new Map();

function lookup(id) {
  let session = sessions.get(id);
  if (!session) {
    session = Session.load(id);
    if (!session) throw RequestError.sessionNotFound(id);
    sessions.set(id, session);
  }
  return session;
}

const textUpdate = (sessionUpdate, text) => ({ sessionUpdate, content: { type: "text", text } });

class Turn {
  constructor(client, session) {
    this.client = client;
    this.session = session;
    this.cancelled = false;
    this.sent = []; // agent text streamed before the response
    this.onCancel = new Promise((resolve) => {
      this.cancel = () => {
        this.cancelled = true;
        resolve();
      };
    });
  }

  update(update) {
    return this.client.notify(methods.client.session.update, { sessionId: this.session.id, update });
  }

  async chunk(text, record = true) {
    await this.update(textUpdate("agent_message_chunk", text));
    if (record) this.sent.push(text);
  }

  // Sleep ms, waking early on cancel.
  async pause(ms) {
    let timer;
    await Promise.race([this.onCancel, new Promise((r) => (timer = setTimeout(r, ms)))]);
    clearTimeout(timer);
  }

  // Send steps (a string: an agent chunk; else a session update) delayMs
  // apart; false if cancelled midway.
  async play(steps, delayMs) {
    for (let i = 0; i < steps.length; i++) {
      if (i > 0 && delayMs > 0) await this.pause(delayMs);
      if (this.cancelled) return false;
      const step = steps[i];
      if (typeof step === "string") await this.chunk(step);
      else await this.update(step);
    }
    return !this.cancelled;
  }
}

const toolCall = (toolCallId, title, kind) => ({
  sessionUpdate: "tool_call",
  toolCallId,
  title,
  kind,
  status: "pending",
});
const toolDone = (toolCallId, text) => ({
  sessionUpdate: "tool_call_update",
  toolCallId,
  status: "completed",
  content: [{ type: "content", content: { type: "text", text } }],
});

// /chatty: agent text between tool calls. /chatty-hang stops at the first
// tool call, left pending.
function chattySteps(hang) {
  const steps = ["Let me look. ", toolCall("chat-1", "grep", "search")];
  if (hang) return steps;
  return [
    ...steps,
    toolDone("chat-1", "found 3 matches"),
    "Found them. ",
    toolCall("chat-2", "read", "read"),
    toolDone("chat-2", "file contents"),
  ];
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const never = () => new Promise(() => {});

// Returns the stop reason, or null for "never answer".
async function runTurn(turn, directives, rest) {
  const delay = directives.has("/slow") ? directives.get("/slow") : DELAY_MS;
  let reply = `echo: ${rest}`;
  const first = splitChunks(reply)[0];

  if (directives.has("/die")) {
    await turn.chunk(first);
    await sleep(20); // let the chunk reach the pipe
    process.stderr.write("peer dying on purpose\n");
    process.exit(3);
  }

  if (directives.has("/ignore-cancel")) {
    await turn.chunk(first);
    return null;
  }

  if (directives.has("/hang") || directives.has("/late")) {
    await turn.chunk(first);
    await turn.onCancel;
    if (directives.has("/late")) await turn.chunk("LATE");
    return "cancelled";
  }

  if (directives.has("/tool")) {
    await turn.update({
      sessionUpdate: "tool_call",
      toolCallId: "call-1",
      title: "grep",
      kind: "search",
      status: "pending",
    });
    await turn.update({
      sessionUpdate: "tool_call_update",
      toolCallId: "call-1",
      status: "completed",
      content: [{ type: "content", content: { type: "text", text: "found 3 matches" } }],
    });
  }

  if (directives.has("/permission")) {
    await turn.update({
      sessionUpdate: "tool_call",
      toolCallId: "call-2",
      title: "write file",
      kind: "edit",
      status: "pending",
    });
    const response = await turn.client.request(methods.client.session.requestPermission, {
      sessionId: turn.session.id,
      toolCall: { toolCallId: "call-2", title: "write file", kind: "edit", status: "pending" },
      options: [
        { optionId: "allow-once", name: "Allow once", kind: "allow_once" },
        { optionId: "reject-once", name: "Reject once", kind: "reject_once" },
      ],
    });
    const outcome = response.outcome;
    if (outcome.outcome === "cancelled" || turn.cancelled) return "cancelled";
    reply = outcome.outcome === "selected" && outcome.optionId === "allow-once" ? "permission granted" : "permission denied";
  }

  if (directives.has("/ask-permission")) {
    await turn.update({
      sessionUpdate: "tool_call",
      toolCallId: "call-3",
      title: "run command",
      kind: "execute",
      status: "pending",
    });
    const response = await turn.client.request(methods.client.session.requestPermission, {
      sessionId: turn.session.id,
      toolCall: { toolCallId: "call-3", title: "run command", kind: "execute", status: "pending" },
      options: [
        { optionId: "allow-once", name: "Allow once", kind: "allow_once" },
        { optionId: "allow-always", name: "Allow always", kind: "allow_always" },
        { optionId: "reject-once", name: "Reject once", kind: "reject_once" },
        { optionId: "reject-always", name: "Reject always", kind: "reject_always" },
      ],
    });
    const outcome = response.outcome;
    const chosen = outcome.outcome === "selected" ? outcome.optionId : "cancelled";
    // `/ask-permission` appends the outcome it received here, one line each.
    if (process.env.ACP_PEER_PERMISSION_LOG) appendFileSync(process.env.ACP_PEER_PERMISSION_LOG, `${chosen}\n`);
    if (turn.cancelled) return "cancelled";
    reply = `permission: ${chosen}`;
  }

  if (directives.has("/chatty-hang")) {
    if (await turn.play(chattySteps(true), delay)) await turn.onCancel; // the tool call stays open
    return "cancelled";
  }

  // /think: one thought chunk before everything else the turn says.
  const thought = directives.has("/think") ? [textUpdate("agent_thought_chunk", "Thinking it over.")] : [];
  const steps = [...thought, ...(directives.has("/chatty") ? chattySteps(false) : [])];
  return (await turn.play([...steps, ...splitChunks(reply)], delay)) ? "end_turn" : "cancelled";
}

const app = agent({ name: PEER_NAME })
  .onRequest(methods.agent.initialize, async () => {
    if (INIT_DELAY_MS > 0) await sleep(INIT_DELAY_MS);
    return {
      protocolVersion: 1,
      agentCapabilities: { loadSession: LOAD_SESSION },
      agentInfo: { name: PEER_NAME, version: "0.1.0" },
    };
  })
  .onRequest(methods.agent.session.new, () => {
    const session = new Session(`sess-${randomUUID().replaceAll("-", "")}`);
    sessions.set(session.id, session);
    session.save();
    return { sessionId: session.id };
  })
  .onRequest(methods.agent.session.load, async ({ params, client }) => {
    if (!LOAD_SESSION) throw RequestError.methodNotFound(methods.agent.session.load);
    const session = sessions.get(params.sessionId) ?? Session.load(params.sessionId);
    if (!session) throw RequestError.sessionNotFound(params.sessionId);
    sessions.set(session.id, session);
    for (const entry of session.history) {
      const kind = entry.role === "user" ? "user_message_chunk" : "agent_message_chunk";
      await client.notify(methods.client.session.update, {
        sessionId: session.id,
        update: textUpdate(kind, entry.text ?? ""),
      });
    }
    return {};
  })
  .onNotification(methods.agent.session.cancel, ({ params }) => {
    const session = sessions.get(params.sessionId);
    if (!session) return;
    for (const turn of session.turns) turn.cancel();
  })
  .onRequest(methods.agent.session.prompt, async ({ params, client }) => {
    const session = lookup(params.sessionId);
    const text = params.prompt
      .filter((block) => block.type === "text")
      .map((block) => block.text)
      .join("");
    const { directives, rest } = parseDirectives(text);
    const turn = new Turn(client, session);
    session.turns.add(turn);
    let stop;
    try {
      stop = await runTurn(turn, directives, rest);
    } finally {
      session.turns.delete(turn);
    }
    if (stop === null) await never(); // /ignore-cancel: never answer
    session.history.push({ role: "user", text });
    const reply = turn.sent.join("");
    if (reply) session.history.push({ role: "agent", text: reply });
    session.save();
    // The SDK writes the prompt response once this handler returns; the delay
    // puts these chunks on the wire after the response. Not recorded.
    const sendLate = (text, ms) =>
      setTimeout(() => {
        turn.chunk(text, false).catch((err) => log(`could not send ${text}: ${err}`));
      }, ms);
    if (directives.has("/late")) sendLate("LATE2", 50);
    if (directives.has("/after-done")) sendLate("LATE-AFTER-DONE", 100);
    return { stopReason: stop };
  });

// Slow cold start: stdin is not read (nor stdout written) until then.
if (STDIN_DELAY_MS > 0) await sleep(STDIN_DELAY_MS);
const connection = app.connect(ndJsonStream(Writable.toWeb(process.stdout), Readable.toWeb(process.stdin)));
await connection.closed;
// stdin closed: the client is gone. Exit even if a turn (/hang, /ignore-cancel)
// is still pending.
process.exit(0);
