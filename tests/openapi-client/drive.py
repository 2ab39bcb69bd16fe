"""Drives a Baton server through a client that openapi-python-client
generated from the server's own /openapi.json (the package `baton_client`,
on PYTHONPATH). The client is built with raise_on_unexpected_status, so any
answer the document does not declare raises; each call also checks the
status and the type the document promised.

Usage: drive.py BASE_URL TOKEN (the server runs with --token
alice:TOKEN, --queue-capacity 1).
"""

import sys
import time

import httpx

from baton_client import AuthenticatedClient, Client
from baton_client.api.default import get_health, get_open_api, list_agents
from baton_client.api.export import export_session
from baton_client.api.metrics import get_metrics
from baton_client.api.sessions import (
    answer_permission,
    cancel_turn,
    create_session,
    delete_session,
    get_session,
    list_entries,
    list_permissions,
    list_sessions,
    list_turns,
    post_message,
)
from baton_client.api.stream import stream_session
from baton_client.models import (
    AgentList,
    AnswerBody,
    CancelBody,
    Cancelled,
    CreateSessionBody,
    EntryPage,
    ErrorBody,
    Export,
    Health,
    MessageEntry,
    PermissionList,
    Policy,
    PostMessageBody,
    Posted,
    Session,
    SessionList,
    TurnEndedEntry,
    TurnList,
    TurnStartedEntry,
)

base, token = sys.argv[1], sys.argv[2]
timeout = httpx.Timeout(30.0)
c = AuthenticatedClient(base_url=base, token=token, raise_on_unexpected_status=True, timeout=timeout)
anon = Client(base_url=base, raise_on_unexpected_status=True, timeout=timeout)
MISSING = "00000000-0000-4000-8000-000000000000"
checked = 0


def check(what, resp, status, kind):
    global checked
    assert resp.status_code == status, f"{what}: {resp.status_code} {resp.content!r}"
    assert isinstance(resp.parsed, kind), f"{what}: parsed as {type(resp.parsed)}: {resp.content!r}"
    checked += 1
    return resp.parsed


def error(what, resp, status, code):
    body = check(what, resp, status, ErrorBody)
    assert body.error.code == code, f"{what}: code {body.error.code}"


def wait_session(sid, pred):
    deadline = time.monotonic() + 30
    while True:
        s = check("get", get_session.sync_detailed(sid, client=c), 200, Session)
        if pred(s):
            return s
        assert time.monotonic() < deadline, f"session never reached the state: {s.to_dict()}"
        time.sleep(0.02)


# Operational routes.
check("health", get_health.sync_detailed(client=anon), 200, Health)
check("agents", list_agents.sync_detailed(client=c), 200, AgentList)
error("agents without a token", list_agents.sync_detailed(client=anon), 401, "unauthorized")
doc = get_open_api.sync_detailed(client=anon)
assert doc.status_code == 200
metrics = get_metrics.sync_detailed(client=anon)
assert metrics.status_code == 200 and "baton_" in metrics.parsed, metrics.content[:200]

# A session's life: create, post, read its log and turns, cancel, delete.
s = check("create", create_session.sync_detailed(client=c, body=CreateSessionBody(message="hello")), 201, Session)
sid = s.id
wait_session(sid, lambda s: s.status.value == "idle" and s.queued == 0)
posted = check("post", post_message.sync_detailed(sid, client=c, body=PostMessageBody(content="again")), 201, Posted)
assert isinstance(posted.entry, MessageEntry), type(posted.entry)
wait_session(sid, lambda s: s.status.value == "idle" and s.queued == 0)
page = check("entries", list_entries.sync_detailed(sid, client=c, limit=1000), 200, EntryPage)
kinds = [type(e) for e in page.entries]
assert kinds.count(TurnStartedEntry) == 2 and kinds.count(TurnEndedEntry) == 2, kinds
assert all(isinstance(e, (MessageEntry, TurnStartedEntry, TurnEndedEntry)) for e in page.entries), kinds
turns = check("turns", list_turns.sync_detailed(sid, client=c), 200, TurnList)
assert len(turns.turns) == 2
idle = check("cancel while idle", cancel_turn.sync_detailed(sid, client=c), 200, Cancelled)
assert idle.cancelled is False
check("export", export_session.sync_detailed(sid, client=c), 200, Export)
check("permissions", list_permissions.sync_detailed(sid, client=c), 200, PermissionList)
error("answer to no request", answer_permission.sync_detailed(sid, "nope", client=c, body=AnswerBody(option_id="x")), 404, "not_found")

# Paging through the list by cursor.
second = check("create another", create_session.sync_detailed(client=c, body=CreateSessionBody()), 201, Session)
first_page = check("list", list_sessions.sync_detailed(client=c, limit=1), 200, SessionList)
assert len(first_page.sessions) == 1 and isinstance(first_page.next_cursor, str), first_page.to_dict()
rest = check("list, page 2", list_sessions.sync_detailed(client=c, limit=1, cursor=first_page.next_cursor), 200, SessionList)
assert [x.id for x in first_page.sessions + rest.sessions] == [second.id, sid]
error("list: limit 0", list_sessions.sync_detailed(client=c, limit=0), 400, "invalid_request")
error("list: limit 1001", list_sessions.sync_detailed(client=c, limit=1001), 400, "invalid_request")
error("list: a forged cursor", list_sessions.sync_detailed(client=c, cursor="x"), 400, "invalid_request")

# A busy session: reject (409), a full queue (429), a cancel (202).
busy = check("create busy", create_session.sync_detailed(client=c, body=CreateSessionBody(message="/hang on", policy=Policy.REJECT)), 201, Session)
wait_session(busy.id, lambda s: s.status.value == "running")
error("post while busy", post_message.sync_detailed(busy.id, client=c, body=PostMessageBody(content="x")), 409, "session_busy")
check("queue one", post_message.sync_detailed(busy.id, client=c, body=PostMessageBody(content="first", policy=Policy.QUEUE)), 201, Posted)
error("queue full", post_message.sync_detailed(busy.id, client=c, body=PostMessageBody(content="second", policy=Policy.QUEUE)), 429, "queue_full")
cancelled = check("cancel", cancel_turn.sync_detailed(busy.id, client=c, body=CancelBody()), 202, Cancelled)
assert cancelled.cancelled is True

# Idempotency: the same key with another body.
check("create with a key", create_session.sync_detailed(client=c, idempotency_key="k1", body=CreateSessionBody()), 201, Session)
check("retry", create_session.sync_detailed(client=c, idempotency_key="k1", body=CreateSessionBody()), 200, Session)
error("key reused", create_session.sync_detailed(client=c, idempotency_key="k1", body=CreateSessionBody(message="other")), 409, "idempotency_conflict")

# Too large.
huge = "x" * (300 * 1024)
error("post too large", post_message.sync_detailed(sid, client=c, body=PostMessageBody(content=huge)), 413, "payload_too_large")
error("create too large", create_session.sync_detailed(client=c, body=CreateSessionBody(message=huge)), 413, "payload_too_large")

# Malformed ids, missing sessions, no token.
for name, call in [
    ("get", lambda i, cl: get_session.sync_detailed(i, client=cl)),
    ("turns", lambda i, cl: list_turns.sync_detailed(i, client=cl)),
    ("entries", lambda i, cl: list_entries.sync_detailed(i, client=cl)),
    ("cancel", lambda i, cl: cancel_turn.sync_detailed(i, client=cl)),
    ("delete", lambda i, cl: delete_session.sync_detailed(i, client=cl)),
    ("post", lambda i, cl: post_message.sync_detailed(i, client=cl, body=PostMessageBody(content="x"))),
    ("stream", lambda i, cl: stream_session.sync_detailed(i, client=cl)),
    ("export", lambda i, cl: export_session.sync_detailed(i, client=cl)),
    ("permissions", lambda i, cl: list_permissions.sync_detailed(i, client=cl)),
]:
    error(f"{name}: malformed id", call("not-a-session", c), 400, "invalid_request")
    error(f"{name}: missing session", call(MISSING, c), 404, "not_found")
    error(f"{name}: no token", call(sid, anon), 401, "unauthorized")

# Delete, then it is gone.
resp = delete_session.sync_detailed(sid, client=c)
assert resp.status_code == 204, resp.content
error("get deleted", get_session.sync_detailed(sid, client=c), 404, "not_found")
print(f"{checked} answers checked")
