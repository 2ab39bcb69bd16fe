#!/usr/bin/env python3
"""Offline ACP test agent on the official Python SDK (PyPI `agent-client-protocol`).

Baton's interop tests spawn this process and drive it over stdio. It never
calls a model: it echoes, and it can be told to misbehave by directives at the
start of the prompt text. Behaviour is identical to the TypeScript peer
(tests/acp-peers/ts/peer.mjs) and the Rust peer (crates/acp-peer); see
tests/acp-peers/README.md for the full contract.

stdout is the JSON-RPC channel: nothing else may be printed there.
Diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

PEER_NAME = "baton-acp-peer-python"


def log(message: str) -> None:
    sys.stderr.write(f"[{PEER_NAME}] {message}\n")
    sys.stderr.flush()


if os.environ.get("ACP_PEER_CRASH_ON_START") == "1":
    sys.stderr.write("peer refuses to start\n")
    sys.stderr.flush()
    sys.exit(4)

# The SDK is imported after the crash-on-start check, on purpose.
from acp import (  # noqa: E402
    Agent,
    InitializeResponse,
    LoadSessionResponse,
    NewSessionResponse,
    PromptResponse,
    RequestError,
    run_agent,
    start_tool_call,
    text_block,
    tool_content,
    update_agent_message_text,
    update_agent_thought_text,
    update_tool_call,
    update_user_message_text,
)
from acp.interfaces import Client  # noqa: E402
from acp.schema import (  # noqa: E402
    AgentCapabilities,
    AllowedOutcome,
    Implementation,
    PermissionOption,
    ToolCallUpdate,
)

LOAD_SESSION = os.environ.get("ACP_PEER_LOAD_SESSION") == "1"
STATE_DIR = os.environ.get("ACP_PEER_STATE_DIR") or None
# `/ask-permission` appends the outcome it received here, one line each.
PERMISSION_LOG = os.environ.get("ACP_PEER_PERMISSION_LOG") or None


def env_ms(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        log(f"ignoring bad {name}={raw!r}")
        return default


DELAY_MS = env_ms("ACP_PEER_DELAY_MS", 5.0)
STDIN_DELAY_MS = env_ms("ACP_PEER_STDIN_DELAY_MS", 0.0)
INIT_DELAY_MS = env_ms("ACP_PEER_INIT_DELAY_MS", 0.0)

# Directives understood at the start of the prompt text; they may be chained
# ("/slow 50 /tool hello").
SIMPLE_DIRECTIVES = {
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
}


def parse_directives(text: str) -> tuple[dict[str, Any], str]:
    """Strip leading directives; return (directives, rest of the text)."""
    found: dict[str, Any] = {}
    rest = text.lstrip()
    while rest.startswith("/"):
        parts = rest.split(None, 1)
        word = parts[0]
        after = parts[1] if len(parts) > 1 else ""
        if word in SIMPLE_DIRECTIVES:
            found[word] = True
            rest = after.lstrip()
            continue
        if word == "/slow":
            arg_parts = after.split(None, 1)
            if arg_parts and re.fullmatch(r"\d+", arg_parts[0]):
                found["/slow"] = int(arg_parts[0])
                rest = (arg_parts[1] if len(arg_parts) > 1 else "").lstrip()
                continue
        break  # not a directive: part of the text to echo
    return found, rest


def split_chunks(reply: str) -> list[str]:
    """One chunk per word, each carrying the whitespace that follows it."""
    chunks = re.findall(r"\S+\s*", reply)
    lead = reply[: len(reply) - len(reply.lstrip())]
    if lead:
        if chunks:
            chunks[0] = lead + chunks[0]
        else:
            chunks = [lead]
    return chunks


class Session:
    def __init__(self, session_id: str, history: list[dict[str, str]] | None = None) -> None:
        self.id = session_id
        self.history: list[dict[str, str]] = history or []
        self.turns: set[asyncio.Event] = set()  # cancel events of running turns

    def path(self) -> Path | None:
        if STATE_DIR is None:
            return None
        return Path(STATE_DIR) / f"{self.id}.json"

    def save(self) -> None:
        path = self.path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"sessionId": self.id, "history": self.history}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, session_id: str) -> Session | None:
        if STATE_DIR is None or not re.fullmatch(r"[A-Za-z0-9_.-]+", session_id):
            return None
        path = Path(STATE_DIR) / f"{session_id}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls(session_id, list(data.get("history", [])))


class Turn:
    """One session/prompt being served."""

    def __init__(self, peer: EchoPeer, session: Session) -> None:
        self.peer = peer
        self.session = session
        self.cancel = asyncio.Event()
        self.sent: list[str] = []  # agent text streamed before the response

    async def chunk(self, text: str, record: bool = True) -> None:
        await self.peer.client().session_update(self.session.id, update_agent_message_text(text))
        if record:
            self.sent.append(text)

    async def play(self, steps: list[Any], delay_ms: float) -> bool:
        """Send steps (text: an agent chunk; else a session update) delay_ms
        apart; False if cancelled midway."""
        for i, step in enumerate(steps):
            if i > 0 and delay_ms > 0:
                try:
                    await asyncio.wait_for(self.cancel.wait(), delay_ms / 1000.0)
                except asyncio.TimeoutError:
                    pass
            if self.cancel.is_set():
                return False
            if isinstance(step, str):
                await self.chunk(step)
            else:
                await self.peer.client().session_update(self.session.id, step)
        return not self.cancel.is_set()


def chatty_steps(hang: bool) -> list[Any]:
    """/chatty: agent text between tool calls. /chatty-hang stops at the
    first tool call, left pending."""
    steps: list[Any] = [
        "Let me look. ",
        start_tool_call("chat-1", "grep", kind="search", status="pending"),
    ]
    if hang:
        return steps
    return steps + [
        update_tool_call("chat-1", status="completed", content=[tool_content(text_block("found 3 matches"))]),
        "Found them. ",
        start_tool_call("chat-2", "read", kind="read", status="pending"),
        update_tool_call("chat-2", status="completed", content=[tool_content(text_block("file contents"))]),
    ]


class EchoPeer(Agent):
    def __init__(self) -> None:
        self._conn: Client | None = None
        self.sessions: dict[str, Session] = {}
        self._background: set[asyncio.Task[None]] = set()  # sends after a response

    def on_connect(self, conn: Client) -> None:
        self._conn = conn

    def client(self) -> Client:
        if self._conn is None:
            raise RequestError.internal_error({"details": "no connection"})
        return self._conn

    async def initialize(self, protocol_version: int, client_capabilities=None, client_info=None, **kwargs: Any):
        if INIT_DELAY_MS > 0:
            await asyncio.sleep(INIT_DELAY_MS / 1000.0)
        return InitializeResponse(
            protocol_version=1,
            agent_capabilities=AgentCapabilities(load_session=LOAD_SESSION),
            agent_info=Implementation(name=PEER_NAME, version="0.1.0"),
        )

    async def new_session(self, cwd: str, mcp_servers=None, **kwargs: Any) -> NewSessionResponse:
        session = Session(f"sess-{uuid.uuid4().hex}")
        self.sessions[session.id] = session
        session.save()
        return NewSessionResponse(session_id=session.id)

    def _lookup(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            session = Session.load(session_id)
            if session is None:
                raise RequestError(-32002, "Resource not found", {"sessionId": session_id})
            self.sessions[session_id] = session
        return session

    async def load_session(self, cwd: str, session_id: str, mcp_servers=None, **kwargs: Any):
        if not LOAD_SESSION:
            raise RequestError.method_not_found("session/load")
        session = self.sessions.get(session_id) or Session.load(session_id)
        if session is None:
            raise RequestError(-32002, "Resource not found", {"sessionId": session_id})
        self.sessions[session_id] = session
        conn = self.client()
        for entry in session.history:
            if entry.get("role") == "user":
                await conn.session_update(session_id, update_user_message_text(entry.get("text", "")))
            else:
                await conn.session_update(session_id, update_agent_message_text(entry.get("text", "")))
        return LoadSessionResponse()

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        for event in list(session.turns):
            event.set()

    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> PromptResponse:
        session = self._lookup(session_id)
        text = "".join(getattr(block, "text", "") for block in prompt if getattr(block, "type", None) == "text")
        directives, rest = parse_directives(text)
        turn = Turn(self, session)
        session.turns.add(turn.cancel)
        try:
            stop = await self._run(turn, directives, rest)
        finally:
            session.turns.discard(turn.cancel)
        if stop is None:  # never answer (/ignore-cancel)
            await asyncio.Event().wait()
        session.history.append({"role": "user", "text": text})
        reply = "".join(turn.sent)
        if reply:
            session.history.append({"role": "agent", "text": reply})
        session.save()
        if "/late" in directives:
            self._after_response(session_id, "LATE2", 0.05)
        if "/after-done" in directives:
            self._after_response(session_id, "LATE-AFTER-DONE", 0.1)
        return PromptResponse(stop_reason=stop)

    def _after_response(self, session_id: str, text: str, delay_s: float) -> None:
        task = asyncio.get_running_loop().create_task(self._send_late(session_id, text, delay_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_late(self, session_id: str, text: str, delay_s: float) -> None:
        # The SDK writes the prompt response once prompt() returns; the delay
        # puts this chunk on the wire after the response. Not recorded.
        await asyncio.sleep(delay_s)
        try:
            await self.client().session_update(session_id, update_agent_message_text(text))
        except Exception as exc:  # connection gone
            log(f"could not send {text}: {exc}")

    async def _run(self, turn: Turn, directives: dict[str, Any], rest: str) -> str | None:
        delay = float(directives.get("/slow", DELAY_MS))
        reply = f"echo: {rest}"
        first = split_chunks(reply)[0]
        conn = self.client()
        sid = turn.session.id

        if "/die" in directives:
            await turn.chunk(first)
            sys.stderr.write("peer dying on purpose\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(3)

        if "/ignore-cancel" in directives:
            await turn.chunk(first)
            return None

        if "/hang" in directives or "/late" in directives:
            await turn.chunk(first)
            await turn.cancel.wait()
            if "/late" in directives:
                await turn.chunk("LATE")
            return "cancelled"

        if "/tool" in directives:
            await conn.session_update(sid, start_tool_call("call-1", "grep", kind="search", status="pending"))
            await conn.session_update(
                sid,
                update_tool_call(
                    "call-1", status="completed", content=[tool_content(text_block("found 3 matches"))]
                ),
            )

        if "/permission" in directives:
            await conn.session_update(sid, start_tool_call("call-2", "write file", kind="edit", status="pending"))
            response = await conn.request_permission(
                session_id=sid,
                tool_call=ToolCallUpdate(tool_call_id="call-2", title="write file", kind="edit", status="pending"),
                options=[
                    PermissionOption(option_id="allow-once", name="Allow once", kind="allow_once"),
                    PermissionOption(option_id="reject-once", name="Reject once", kind="reject_once"),
                ],
            )
            outcome = response.outcome
            if outcome.outcome == "cancelled" or turn.cancel.is_set():
                return "cancelled"
            if isinstance(outcome, AllowedOutcome) and outcome.option_id == "allow-once":
                reply = "permission granted"
            else:
                reply = "permission denied"

        if "/ask-permission" in directives:
            await conn.session_update(sid, start_tool_call("call-3", "run command", kind="execute", status="pending"))
            response = await conn.request_permission(
                session_id=sid,
                tool_call=ToolCallUpdate(tool_call_id="call-3", title="run command", kind="execute", status="pending"),
                options=[
                    PermissionOption(option_id="allow-once", name="Allow once", kind="allow_once"),
                    PermissionOption(option_id="allow-always", name="Allow always", kind="allow_always"),
                    PermissionOption(option_id="reject-once", name="Reject once", kind="reject_once"),
                    PermissionOption(option_id="reject-always", name="Reject always", kind="reject_always"),
                ],
            )
            outcome = response.outcome
            chosen = outcome.option_id if isinstance(outcome, AllowedOutcome) else "cancelled"
            if PERMISSION_LOG:
                with open(PERMISSION_LOG, "a", encoding="utf-8") as f:
                    f.write(f"{chosen}\n")
            if turn.cancel.is_set():
                return "cancelled"
            reply = f"permission: {chosen}"

        if "/chatty-hang" in directives:
            if await turn.play(chatty_steps(hang=True), delay):
                await turn.cancel.wait()  # the tool call stays open
            return "cancelled"

        # /think: one thought chunk before everything else the turn says.
        steps: list[Any] = [update_agent_thought_text("Thinking it over.")] if "/think" in directives else []
        steps += chatty_steps(hang=False) if "/chatty" in directives else []
        if not await turn.play(steps + split_chunks(reply), delay):
            return "cancelled"
        return "end_turn"


async def main() -> None:
    if STDIN_DELAY_MS > 0:
        # Slow cold start: stdin is not read (nor stdout written) until then.
        await asyncio.sleep(STDIN_DELAY_MS / 1000.0)
    await run_agent(EchoPeer())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
