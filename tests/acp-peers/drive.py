#!/usr/bin/env python3
"""Drive an ACP test peer end to end, without Baton.

A tiny ACP *client*: newline-delimited JSON-RPC 2.0 over the peer's stdio,
standard library only. Runs every scenario of the peer contract (see README.md)
against the given command and prints PASS/FAIL per scenario.

    python3 tests/acp-peers/drive.py -- target/acp-venv/bin/python tests/acp-peers/python/peer.py
    python3 tests/acp-peers/drive.py -- node tests/acp-peers/ts/peer.mjs
    python3 tests/acp-peers/drive.py -- target/debug/acp-peer
    python3 tests/acp-peers/drive.py --only echo,load -v -- target/debug/acp-peer

Exit status: 0 when every scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback
from typing import Any, Callable

TIMEOUT = 10.0
VERBOSE = False
PEERS: list["Peer"] = []  # peers spawned by the running scenario


class Fail(Exception):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise Fail(message)


class Peer:
    """One spawned peer process and the JSON-RPC traffic with it."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        for key in (
            "ACP_PEER_LOAD_SESSION",
            "ACP_PEER_STATE_DIR",
            "ACP_PEER_DELAY_MS",
            "ACP_PEER_CRASH_ON_START",
            "ACP_PEER_STDIN_DELAY_MS",
            "ACP_PEER_INIT_DELAY_MS",
        ):
            full_env.pop(key, None)
        full_env.update(env or {})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr_lines: list[str] = []
        self.violations: list[str] = []
        self.next_id = 0
        PEERS.append(self)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    # -- plumbing ---------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.strip():
                continue
            if VERBOSE:
                print(f"    <- {line}", file=sys.stderr)
            try:
                msg = json.loads(line)
            except ValueError:
                self.violations.append(f"non-JSON line on stdout: {line[:200]!r}")
                continue
            if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
                self.violations.append(f"not a JSON-RPC 2.0 message: {line[:200]!r}")
                continue
            self.inbox.put(msg)
        self.inbox.put(None)  # EOF

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg)
        if VERBOSE:
            print(f"    -> {line}", file=sys.stderr)
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> int:
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        return self.next_id

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def respond(self, req_id: Any, result: dict[str, Any]) -> None:
        self.send({"jsonrpc": "2.0", "id": req_id, "result": result})

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any] | None:
        """Next message; None on EOF; raises Fail on timeout."""
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise Fail(f"no message from peer within {timeout:.1f}s") from None
        if msg is None:
            self.inbox.put(None)  # keep EOF sticky
        return msg

    def recv_until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """All messages up to and including the first one matching pred."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail(f"timed out; saw {summarize(seen)}")
            msg = self.recv(left)
            if msg is None:
                raise Fail(f"peer closed stdout (exit {self.proc.poll()}); saw {summarize(seen)}")
            seen.append(msg)
            if pred(msg):
                return seen

    def quiet_for(self, seconds: float) -> list[dict[str, Any]]:
        """Messages that arrive within `seconds` (stops early at EOF)."""
        deadline = time.monotonic() + seconds
        seen: list[dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return seen
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                return seen
            if msg is None:
                self.inbox.put(None)
                return seen
            seen.append(msg)

    def call(self, method: str, params: dict[str, Any], timeout: float = TIMEOUT) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Send a request; return (messages before the response, the response)."""
        rid = self.request(method, params)
        seen = self.recv_until(lambda m: is_response(m, rid), timeout)
        return seen[:-1], seen[-1]

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Fail(f"peer did not exit within {timeout:.1f}s") from None

    def close(self) -> None:
        """Close stdin (the clean shutdown), then make sure the process is gone."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # -- ACP helpers ------------------------------------------------------

    def initialize(self) -> dict[str, Any]:
        _, resp = self.call(
            "initialize",
            {
                "protocolVersion": 1,
                "clientCapabilities": {"fs": {"readTextFile": False, "writeTextFile": False}, "terminal": False},
                "clientInfo": {"name": "drive.py", "version": "0"},
            },
        )
        check("result" in resp, f"initialize failed: {resp}")
        check(resp["result"].get("protocolVersion") == 1, f"protocolVersion != 1: {resp['result']}")
        return resp["result"]

    def new_session(self) -> str:
        _, resp = self.call("session/new", {"cwd": os.getcwd(), "mcpServers": []})
        check("result" in resp, f"session/new failed: {resp}")
        sid = resp["result"].get("sessionId")
        check(isinstance(sid, str) and sid != "", f"no sessionId: {resp}")
        return sid

    def prompt_request(self, sid: str, text: str) -> int:
        return self.request("session/prompt", {"sessionId": sid, "prompt": [{"type": "text", "text": text}]})

    def cancel(self, sid: str) -> None:
        self.notify("session/cancel", {"sessionId": sid})

    def ping(self) -> int:
        """A request for an unknown method. Every SDK answers it with an
        error, even before initialize, so its answer shows the peer is up."""
        return self.request("drive/ping", {})

    def load(self, sid: str) -> list[tuple[str, str]]:
        """session/load in this process; the replayed history as (role, text)."""
        before, resp = self.call("session/load", {"sessionId": sid, "cwd": os.getcwd(), "mcpServers": []})
        check("result" in resp, f"session/load failed: {resp}")
        replay = []
        for m in before:
            upd = update_of(m)
            check(upd is not None, f"unexpected message during load: {m}")
            kind = upd.get("sessionUpdate")
            check(kind in ("user_message_chunk", "agent_message_chunk"), f"replay update kind {kind}")
            replay.append(("user" if kind == "user_message_chunk" else "agent", upd["content"]["text"]))
        return replay

    def unread_stdin(self) -> int | None:
        """Bytes written to the peer's stdin that it has not read yet (None if unknown)."""
        assert self.proc.stdin is not None
        try:
            buf = fcntl.ioctl(self.proc.stdin.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return None
        return int.from_bytes(buf, sys.byteorder)


# -- message predicates ------------------------------------------------------


def is_response(msg: dict[str, Any], rid: Any) -> bool:
    return "method" not in msg and msg.get("id") == rid


def update_of(msg: dict[str, Any]) -> dict[str, Any] | None:
    if msg.get("method") == "session/update" and "id" not in msg:
        return msg.get("params", {}).get("update")
    return None


def chunk_text(msg: dict[str, Any], kind: str = "agent_message_chunk") -> str | None:
    upd = update_of(msg)
    if upd and upd.get("sessionUpdate") == kind:
        content = upd.get("content", {})
        if content.get("type") == "text":
            return content.get("text")
    return None


def agent_chunks(msgs: list[dict[str, Any]]) -> list[str]:
    return [t for t in (chunk_text(m) for m in msgs) if t is not None]


def is_agent_chunk(msg: dict[str, Any]) -> bool:
    return chunk_text(msg) is not None


def summarize(msgs: list[dict[str, Any]]) -> str:
    out = []
    for m in msgs[-8:]:
        upd = update_of(m)
        if upd:
            out.append(f"update:{upd.get('sessionUpdate')}:{json.dumps(upd.get('content', upd.get('toolCallId')))[:60]}")
        elif "method" in m:
            out.append(f"{'request' if 'id' in m else 'notification'}:{m['method']}")
        else:
            out.append(f"response#{m.get('id')}:{json.dumps(m.get('result', m.get('error')))[:80]}")
    return "[" + ", ".join(out) + "]" + (f" (+{len(msgs) - 8} earlier)" if len(msgs) > 8 else "")


def stop_reason(resp: dict[str, Any]) -> Any:
    check("result" in resp, f"prompt failed: {resp}")
    return resp["result"].get("stopReason")


def describe(upd: dict[str, Any]) -> tuple[Any, ...]:
    """A session update as a comparable tuple (missing status/kind read as
    the Rust SDK's defaults, pending/other)."""
    kind = upd.get("sessionUpdate")
    if kind == "agent_message_chunk":
        return ("chunk", upd.get("content", {}).get("text"))
    if kind == "tool_call":
        return ("tool_call", upd.get("toolCallId"), upd.get("title"), upd.get("kind", "other"), upd.get("status", "pending"))
    if kind == "tool_call_update":
        texts = [
            c.get("content", {}).get("text") if c.get("type") == "content" else c for c in upd.get("content") or []
        ]
        return ("tool_call_update", upd.get("toolCallId"), upd.get("status"), texts)
    return (kind,)


def described(msgs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [describe(u) for u in (update_of(m) for m in msgs) if u]


def read_history(state: str, sid: str) -> list[tuple[str, str]]:
    with open(os.path.join(state, f"{sid}.json")) as f:
        data = json.load(f)
    return [(e.get("role"), e.get("text")) for e in data.get("history", [])]


# -- scenarios ---------------------------------------------------------------


def sc_echo(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        init = peer.initialize()
        caps = init.get("agentCapabilities") or {}
        check(not caps.get("loadSession", False), f"loadSession advertised without ACP_PEER_LOAD_SESSION: {caps}")
        sid = peer.new_session()
        text = "hello  big world "
        rid = peer.prompt_request(sid, text)
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        chunks = agent_chunks(msgs)
        check("".join(chunks) == f"echo: {text}", f"chunks concatenate to {''.join(chunks)!r}")
        check(chunks == ["echo: ", "hello  ", "big ", "world "], f"unexpected chunking {chunks!r}")
        for m in msgs[:-1]:
            check(m.get("params", {}).get("sessionId") == sid, f"update for another session: {m}")
        check(stop_reason(msgs[-1]) == "end_turn", f"stopReason {msgs[-1]}")
        # Two text blocks are concatenated; second turn on the same session.
        rid = peer.request(
            "session/prompt",
            {"sessionId": sid, "prompt": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
        )
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == "echo: one two", f"two blocks gave {agent_chunks(msgs)!r}")
        check(stop_reason(msgs[-1]) == "end_turn", f"stopReason {msgs[-1]}")
        # Unknown session -> JSON-RPC error.
        rid = peer.prompt_request("no-such-session", "hi")
        resp = peer.recv_until(lambda m: is_response(m, rid))[-1]
        check("error" in resp, f"prompt on unknown session did not fail: {resp}")
        # Without the env flag, session/load must not work.
        _, resp = peer.call("session/load", {"sessionId": sid, "cwd": os.getcwd(), "mcpServers": []})
        check("error" in resp, f"session/load answered although not advertised: {resp}")
        check(not peer.violations, f"stdout violations: {peer.violations}")
        eof_exit(peer)
    finally:
        peer.close()


def eof_exit(peer: Peer) -> None:
    """Closing stdin is the clean shutdown: the peer must exit on its own."""
    assert peer.proc.stdin is not None
    peer.proc.stdin.close()
    code = peer.wait_exit(5)
    check(code == 0, f"exit code {code} after stdin EOF, want 0")


def sc_slow_and_cancel(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        start = time.monotonic()
        rid = peer.prompt_request(sid, "/slow 120 a b c")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        elapsed = time.monotonic() - start
        check("".join(agent_chunks(msgs)) == "echo: a b c", f"/slow reply {agent_chunks(msgs)!r}")
        check(elapsed >= 0.3, f"/slow 120 with 4 chunks took only {elapsed * 1000:.0f} ms")
        # Cancel mid-stream.
        rid = peer.prompt_request(sid, "/slow 200 one two three four five six seven eight")
        seen = peer.recv_until(is_agent_chunk)
        seen += peer.recv_until(is_agent_chunk)
        peer.cancel(sid)
        seen += peer.recv_until(lambda m: is_response(m, rid), timeout=3)
        check(stop_reason(seen[-1]) == "cancelled", f"stopReason after cancel: {seen[-1]}")
        check(len(agent_chunks(seen)) < 9, f"cancel did not stop the stream: {agent_chunks(seen)!r}")
        check(not peer.quiet_for(0.3), "updates after the cancelled response")
        # ACP_PEER_DELAY_MS overrides the default delay.
    finally:
        peer.close()
    peer = Peer(cmd, {"ACP_PEER_DELAY_MS": "150"})
    try:
        peer.initialize()
        sid = peer.new_session()
        start = time.monotonic()
        rid = peer.prompt_request(sid, "x y")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        elapsed = time.monotonic() - start
        check("".join(agent_chunks(msgs)) == "echo: x y", f"reply {agent_chunks(msgs)!r}")
        check(elapsed >= 0.28, f"ACP_PEER_DELAY_MS=150 with 3 chunks took only {elapsed * 1000:.0f} ms")
    finally:
        peer.close()


def sc_hang(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/hang hello world")
        first = peer.recv_until(is_agent_chunk)
        check(agent_chunks(first) == ["echo: "], f"first chunk {agent_chunks(first)!r}")
        more = peer.quiet_for(0.5)
        check(not more, f"/hang kept talking before cancel: {summarize(more)}")
        peer.cancel(sid)
        seen = peer.recv_until(lambda m: is_response(m, rid), timeout=3)
        check(stop_reason(seen[-1]) == "cancelled", f"stopReason {seen[-1]}")
        check(not agent_chunks(seen), f"/hang sent chunks after cancel: {agent_chunks(seen)!r}")
        # The session still works afterwards.
        rid = peer.prompt_request(sid, "again")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == "echo: again", f"next turn {agent_chunks(msgs)!r}")
    finally:
        peer.close()


def sc_late(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/late hi")
        peer.recv_until(is_agent_chunk)
        peer.cancel(sid)
        seen = peer.recv_until(lambda m: is_response(m, rid), timeout=3)
        check(agent_chunks(seen[:-1]) == ["LATE"], f"before the response: {agent_chunks(seen[:-1])!r}")
        check(stop_reason(seen[-1]) == "cancelled", f"stopReason {seen[-1]}")
        after = peer.recv_until(is_agent_chunk, timeout=2)
        check(agent_chunks(after) == ["LATE2"], f"after the response: {summarize(after)}")
        check(after[-1]["params"]["sessionId"] == sid, "LATE2 for another session")
    finally:
        peer.close()


def sc_ignore_cancel(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/ignore-cancel hi")
        peer.recv_until(is_agent_chunk)
        peer.cancel(sid)
        seen = peer.quiet_for(1.0)
        check(not any(is_response(m, rid) for m in seen), f"answered despite /ignore-cancel: {summarize(seen)}")
        check(peer.proc.poll() is None, f"process exited ({peer.proc.poll()})")
        # The connection itself still serves other requests.
        sid2 = peer.new_session()
        check(sid2 != sid, "same session id twice")
        eof_exit(peer)  # even with a turn that will never be answered
    finally:
        peer.close()


def sc_die(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/die hi")
        seen = peer.recv_until(is_agent_chunk)
        check(agent_chunks(seen) == ["echo: "], f"chunk {agent_chunks(seen)!r}")
        code = peer.wait_exit(5)
        check(code == 3, f"exit code {code}, want 3")
        rest = peer.quiet_for(0.5)
        check(not any(is_response(m, rid) for m in rest), "prompt answered before dying")
        time.sleep(0.1)  # let the stderr reader finish
        check("peer dying on purpose" in peer.stderr_text(), f"stderr: {peer.stderr_text()[-300:]!r}")
    finally:
        peer.close()


def sc_tool(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/tool find it")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        updates = [u for u in (update_of(m) for m in msgs) if u]
        kinds = [u["sessionUpdate"] for u in updates]
        check(kinds[:2] == ["tool_call", "tool_call_update"], f"update kinds {kinds}")
        tc, tu = updates[0], updates[1]
        check(tc.get("toolCallId") == "call-1", f"tool_call id {tc}")
        check(tc.get("title") == "grep", f"tool_call title {tc}")
        check(tc.get("kind") == "search", f"tool_call kind {tc}")
        # The Rust SDK leaves out fields equal to their default: a missing
        # status means "pending" (and a missing kind means "other").
        check(tc.get("status", "pending") == "pending", f"tool_call status {tc}")
        check(tu.get("toolCallId") == "call-1", f"tool_call_update id {tu}")
        check(tu.get("status") == "completed", f"tool_call_update status {tu}")
        content = tu.get("content") or []
        check(
            len(content) == 1
            and content[0].get("type") == "content"
            and content[0].get("content") == {"type": "text", "text": "found 3 matches"},
            f"tool_call_update content {content}",
        )
        check(all(k == "agent_message_chunk" for k in kinds[2:]), f"update kinds {kinds}")
        check("".join(agent_chunks(msgs)) == "echo: find it", f"reply {agent_chunks(msgs)!r}")
        check(stop_reason(msgs[-1]) == "end_turn", f"stopReason {msgs[-1]}")
    finally:
        peer.close()


def permission_turn(peer: Peer, sid: str, answer: Callable[[Peer, dict[str, Any]], None]) -> list[dict[str, Any]]:
    rid = peer.prompt_request(sid, "/permission please")
    before = peer.recv_until(lambda m: m.get("method") == "session/request_permission" and "id" in m)
    updates = [u for u in (update_of(m) for m in before) if u]
    check(
        [u["sessionUpdate"] for u in updates] == ["tool_call"] and updates[0].get("toolCallId") == "call-2",
        f"before the permission request: {summarize(before)}",
    )
    req = before[-1]
    params = req["params"]
    check(params.get("sessionId") == sid, f"permission for another session: {params}")
    check(params.get("toolCall", {}).get("toolCallId") == "call-2", f"permission toolCall {params.get('toolCall')}")
    opts = [(o.get("optionId"), o.get("kind")) for o in params.get("options", [])]
    check(opts == [("allow-once", "allow_once"), ("reject-once", "reject_once")], f"options {opts}")
    answer(peer, req)
    return peer.recv_until(lambda m: is_response(m, rid))


def sc_permission(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()

        msgs = permission_turn(
            peer, sid, lambda p, r: p.respond(r["id"], {"outcome": {"outcome": "selected", "optionId": "allow-once"}})
        )
        check("".join(agent_chunks(msgs)) == "permission granted", f"allow: {agent_chunks(msgs)!r}")
        check(agent_chunks(msgs) == ["permission ", "granted"], f"allow chunks: {agent_chunks(msgs)!r}")
        check(stop_reason(msgs[-1]) == "end_turn", f"allow stopReason {msgs[-1]}")

        msgs = permission_turn(
            peer, sid, lambda p, r: p.respond(r["id"], {"outcome": {"outcome": "selected", "optionId": "reject-once"}})
        )
        check("".join(agent_chunks(msgs)) == "permission denied", f"reject: {agent_chunks(msgs)!r}")
        check(stop_reason(msgs[-1]) == "end_turn", f"reject stopReason {msgs[-1]}")

        def cancel_then_answer(p: Peer, r: dict[str, Any]) -> None:
            p.cancel(sid)
            p.respond(r["id"], {"outcome": {"outcome": "cancelled"}})

        msgs = permission_turn(peer, sid, cancel_then_answer)
        check(not agent_chunks(msgs), f"cancelled permission streamed {agent_chunks(msgs)!r}")
        check(stop_reason(msgs[-1]) == "cancelled", f"cancelled stopReason {msgs[-1]}")
    finally:
        peer.close()


def sc_load(cmd: list[str]) -> None:
    state = tempfile.mkdtemp(prefix="acp-peer-state-")
    try:
        load_scenario(cmd, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def load_scenario(cmd: list[str], state: str) -> None:
    env = {"ACP_PEER_LOAD_SESSION": "1", "ACP_PEER_STATE_DIR": state}
    expected: list[tuple[str, str]] = []

    def turn(peer: Peer, sid: str, text: str, reply: str) -> None:
        rid = peer.prompt_request(sid, text)
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == reply, f"reply to {text!r}: {agent_chunks(msgs)!r}")
        expected.append(("user", text))
        expected.append(("agent", reply))

    def load_and_check(peer: Peer, sid: str) -> None:
        init = peer.initialize()
        check((init.get("agentCapabilities") or {}).get("loadSession") is True, f"loadSession not advertised: {init}")
        before, resp = peer.call("session/load", {"sessionId": sid, "cwd": os.getcwd(), "mcpServers": []})
        check("result" in resp, f"session/load failed: {resp}")
        replay = []
        for m in before:
            upd = update_of(m)
            check(upd is not None, f"unexpected message during load: {m}")
            check(m["params"].get("sessionId") == sid, f"replay for another session: {m}")
            kind = upd.get("sessionUpdate")
            check(kind in ("user_message_chunk", "agent_message_chunk"), f"replay update kind {kind}")
            replay.append(("user" if kind == "user_message_chunk" else "agent", upd["content"]["text"]))
        check(replay == expected, f"replay {replay} != expected {expected}")
        late = peer.quiet_for(0.3)
        check(not late, f"updates after the load response: {summarize(late)}")

    peer = Peer(cmd, env)
    try:
        init = peer.initialize()
        check((init.get("agentCapabilities") or {}).get("loadSession") is True, f"loadSession not advertised: {init}")
        sid = peer.new_session()
        turn(peer, sid, "first one", "echo: first one")
        turn(peer, sid, "/slow 1 second  two", "echo: second  two")
        turn(peer, sid, "/tool third", "echo: third")
        other = peer.new_session()
        rid = peer.prompt_request(other, "other session")
        peer.recv_until(lambda m: is_response(m, rid))
    finally:
        peer.close()

    peer = Peer(cmd, env)  # restarted process, same state dir
    try:
        load_and_check(peer, sid)
        turn(peer, sid, "after restart", "echo: after restart")
        _, resp = peer.call("session/load", {"sessionId": "sess-unknown", "cwd": os.getcwd(), "mcpServers": []})
        check("error" in resp, f"load of an unknown session id did not fail: {resp}")
    finally:
        peer.close()

    peer = Peer(cmd, env)  # second restart: nothing duplicated
    try:
        load_and_check(peer, sid)
    finally:
        peer.close()


def sc_crash_on_start(cmd: list[str]) -> None:
    peer = Peer(cmd, {"ACP_PEER_CRASH_ON_START": "1"})
    try:
        code = peer.wait_exit(10)
        check(code == 4, f"exit code {code}, want 4")
        time.sleep(0.1)
        check("peer refuses to start" in peer.stderr_text(), f"stderr: {peer.stderr_text()[-300:]!r}")
        check(peer.quiet_for(0.1) == [], "wrote to stdout")
    finally:
        peer.close()


def sc_stdin_delay(cmd: list[str]) -> None:
    delay = 1.0
    # Baseline: spawn to the first answer without the delay.
    peer = Peer(cmd)
    try:
        rid = peer.ping()
        peer.recv_until(lambda m: is_response(m, rid))
        baseline = time.monotonic() - peer.started
    finally:
        peer.close()
    peer = Peer(cmd, {"ACP_PEER_STDIN_DELAY_MS": str(int(delay * 1000))})
    try:
        rid = peer.ping()  # written at once, read only after the delay
        iid = peer.request("initialize", {"protocolVersion": 1, "clientCapabilities": {}})
        time.sleep(max(0.0, peer.started + delay / 2 - time.monotonic()))
        unread = peer.unread_stdin()
        check(unread is None or unread > 0, f"stdin read within {delay / 2:.1f}s (nothing left unread)")
        check(peer.inbox.empty(), "stdout written during the stdin delay")
        seen = peer.recv_until(lambda m: is_response(m, rid), timeout=delay + TIMEOUT)
        elapsed = time.monotonic() - peer.started
        check(len(seen) == 1, f"messages before the first answer: {summarize(seen)}")
        check(elapsed >= delay, f"first answer {elapsed * 1000:.0f} ms after spawn, want >= {delay * 1000:.0f}")
        check(
            elapsed - baseline >= delay / 2,
            f"first answer {elapsed * 1000:.0f} ms after spawn, only {(elapsed - baseline) * 1000:.0f} ms over "
            f"the {baseline * 1000:.0f} ms without the delay",
        )
        resp = peer.recv_until(lambda m: is_response(m, iid))[-1]
        check(resp.get("result", {}).get("protocolVersion") == 1, f"initialize after the delay: {resp}")
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "awake")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == "echo: awake", f"reply {agent_chunks(msgs)!r}")
        eof_exit(peer)
    finally:
        peer.close()
    # stdin closed during the delay: clean exit once the peer gets to it.
    peer = Peer(cmd, {"ACP_PEER_STDIN_DELAY_MS": "300"})
    try:
        assert peer.proc.stdin is not None
        peer.proc.stdin.close()
        code = peer.wait_exit(TIMEOUT)
        check(code == 0, f"exit code {code} after stdin EOF during the delay, want 0")
        check(peer.quiet_for(0.1) == [], "wrote to stdout")
    finally:
        peer.close()


def sc_init_delay(cmd: list[str]) -> None:
    delay = 0.8
    peer = Peer(cmd, {"ACP_PEER_INIT_DELAY_MS": str(int(delay * 1000))})
    try:
        rid = peer.ping()
        peer.recv_until(lambda m: is_response(m, rid))  # the peer is up
        start = time.monotonic()
        before, resp = peer.call("initialize", {"protocolVersion": 1, "clientCapabilities": {}}, timeout=delay + TIMEOUT)
        elapsed = time.monotonic() - start
        check(not before, f"messages before the initialize response: {summarize(before)}")
        check(resp.get("result", {}).get("protocolVersion") == 1, f"initialize failed: {resp}")
        check(elapsed >= delay, f"initialize answered after {elapsed * 1000:.0f} ms, want >= {delay * 1000:.0f}")
        sid = peer.new_session()
        start = time.monotonic()
        rid = peer.prompt_request(sid, "ready")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == "echo: ready", f"reply {agent_chunks(msgs)!r}")
        check(time.monotonic() - start < delay, "the prompt was delayed too")
        eof_exit(peer)
    finally:
        peer.close()


def sc_after_done(cmd: list[str]) -> None:
    state = tempfile.mkdtemp(prefix="acp-peer-state-")
    peer = Peer(cmd, {"ACP_PEER_LOAD_SESSION": "1", "ACP_PEER_STATE_DIR": state})
    try:
        peer.initialize()
        sid = peer.new_session()
        text = "/after-done hi there"
        rid = peer.prompt_request(sid, text)
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        answered = time.monotonic()
        check(agent_chunks(msgs) == ["echo: ", "hi ", "there"], f"reply {agent_chunks(msgs)!r}")
        check(len(msgs) == 4, f"before the response: {summarize(msgs)}")
        check(stop_reason(msgs[-1]) == "end_turn", f"stopReason {msgs[-1]}")
        after = peer.recv_until(is_agent_chunk, timeout=2)
        gap = time.monotonic() - answered
        check(len(after) == 1 and agent_chunks(after) == ["LATE-AFTER-DONE"], f"after the response: {summarize(after)}")
        check(after[0]["params"]["sessionId"] == sid, "LATE-AFTER-DONE for another session")
        check(gap >= 0.05, f"LATE-AFTER-DONE only {gap * 1000:.0f} ms after the response, want ~100")
        more = peer.quiet_for(0.3)
        check(not more, f"more after LATE-AFTER-DONE: {summarize(more)}")
        expected = [("user", text), ("agent", "echo: hi there")]
        check(read_history(state, sid) == expected, f"saved history {read_history(state, sid)}")
        replay = peer.load(sid)
        check(replay == expected, f"replay {replay} != expected {expected}")
        rid = peer.prompt_request(sid, "again")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == "echo: again", f"next turn {agent_chunks(msgs)!r}")
        check(not peer.quiet_for(0.3), "updates after a plain turn")
    finally:
        peer.close()
        shutil.rmtree(state, ignore_errors=True)


CHATTY = [
    ("chunk", "Let me look. "),
    ("tool_call", "chat-1", "grep", "search", "pending"),
    ("tool_call_update", "chat-1", "completed", ["found 3 matches"]),
    ("chunk", "Found them. "),
    ("tool_call", "chat-2", "read", "read", "pending"),
    ("tool_call_update", "chat-2", "completed", ["file contents"]),
]


def sc_chatty(cmd: list[str]) -> None:
    state = tempfile.mkdtemp(prefix="acp-peer-state-")
    peer = Peer(cmd, {"ACP_PEER_LOAD_SESSION": "1", "ACP_PEER_STATE_DIR": state})
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/chatty find it")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        got = described(msgs)
        want = CHATTY + [("chunk", "echo: "), ("chunk", "find "), ("chunk", "it")]
        check(got == want, f"updates {got}")
        check(all(m["params"].get("sessionId") == sid for m in msgs[:-1]), "update for another session")
        check(stop_reason(msgs[-1]) == "end_turn", f"stopReason {msgs[-1]}")
        # Every update is paced: 8 updates, 7 gaps.
        start = time.monotonic()
        rid = peer.prompt_request(sid, "/slow 80 /chatty a")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        elapsed = time.monotonic() - start
        check(described(msgs) == CHATTY + [("chunk", "echo: "), ("chunk", "a")], f"/slow updates {described(msgs)}")
        check(elapsed >= 0.5, f"/slow 80 /chatty with 8 updates took only {elapsed * 1000:.0f} ms")
        # Cancel between the tool calls.
        rid = peer.prompt_request(sid, "/slow 300 /chatty a b c")
        seen = peer.recv_until(lambda m: (update_of(m) or {}).get("sessionUpdate") == "tool_call")
        peer.cancel(sid)
        seen += peer.recv_until(lambda m: is_response(m, rid), timeout=3)
        check(stop_reason(seen[-1]) == "cancelled", f"stopReason after cancel: {seen[-1]}")
        check(described(seen) == CHATTY[:2], f"cancel did not stop the turn: {described(seen)}")
        more = peer.quiet_for(0.5)
        check(not more, f"updates after the cancelled response: {summarize(more)}")
        expected = [
            ("user", "/chatty find it"),
            ("agent", "Let me look. Found them. echo: find it"),
            ("user", "/slow 80 /chatty a"),
            ("agent", "Let me look. Found them. echo: a"),
            ("user", "/slow 300 /chatty a b c"),
            ("agent", "Let me look. "),
        ]
        replay = peer.load(sid)
        check(replay == expected, f"replay {replay} != expected {expected}")
    finally:
        peer.close()
        shutil.rmtree(state, ignore_errors=True)


def sc_chatty_hang(cmd: list[str]) -> None:
    peer = Peer(cmd)
    try:
        peer.initialize()
        sid = peer.new_session()
        rid = peer.prompt_request(sid, "/chatty-hang hello")
        seen = peer.recv_until(lambda m: (update_of(m) or {}).get("sessionUpdate") == "tool_call")
        check(described(seen) == CHATTY[:2], f"before the open tool call: {described(seen)}")
        more = peer.quiet_for(0.5)
        check(not more, f"/chatty-hang kept talking before cancel: {summarize(more)}")
        peer.cancel(sid)
        seen = peer.recv_until(lambda m: is_response(m, rid), timeout=3)
        check(len(seen) == 1, f"updates after the cancel: {summarize(seen)}")
        check(stop_reason(seen[-1]) == "cancelled", f"stopReason {seen[-1]}")
        more = peer.quiet_for(0.3)
        check(not more, f"updates after the cancelled response: {summarize(more)}")
        rid = peer.prompt_request(sid, "again")
        msgs = peer.recv_until(lambda m: is_response(m, rid))
        check("".join(agent_chunks(msgs)) == "echo: again", f"next turn {agent_chunks(msgs)!r}")
        check(stop_reason(msgs[-1]) == "end_turn", f"stopReason {msgs[-1]}")
    finally:
        peer.close()


SCENARIOS: list[tuple[str, Callable[[list[str]], None]]] = [
    ("echo", sc_echo),
    ("slow-cancel", sc_slow_and_cancel),
    ("hang", sc_hang),
    ("late", sc_late),
    ("ignore-cancel", sc_ignore_cancel),
    ("die", sc_die),
    ("tool", sc_tool),
    ("permission", sc_permission),
    ("load", sc_load),
    ("crash-on-start", sc_crash_on_start),
    ("stdin-delay", sc_stdin_delay),
    ("init-delay", sc_init_delay),
    ("after-done", sc_after_done),
    ("chatty", sc_chatty),
    ("chatty-hang", sc_chatty_hang),
]


def main() -> int:
    global VERBOSE
    argv = sys.argv[1:]
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description="Drive an ACP test peer.")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the JSON-RPC traffic to stderr")
    args = parser.parse_args(argv[:split])
    cmd = argv[split + 1 :]
    if not cmd:
        parser.error("missing peer command after --")
    VERBOSE = args.verbose
    wanted = set(args.only.split(",")) if args.only else None

    failed = 0
    for name, fn in SCENARIOS:
        if wanted is not None and name not in wanted:
            continue
        start = time.monotonic()
        PEERS.clear()
        try:
            fn(cmd)
            for peer in PEERS:
                check(not peer.violations, f"stdout carried non-protocol output: {peer.violations[:3]}")
        except Fail as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
            if PEERS and PEERS[-1].stderr_lines:
                print("  peer stderr tail:\n    " + "\n    ".join(PEERS[-1].stderr_lines[-15:]))
        except Exception:
            failed += 1
            print(f"FAIL {name}: drive.py error\n{traceback.format_exc()}")
        else:
            print(f"PASS {name} ({(time.monotonic() - start) * 1000:.0f} ms)")
        sys.stdout.flush()
    print(f"{'FAILED' if failed else 'OK'}: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
