import { useEffect, useMemo, useRef, useState } from "react";
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";

// Baton's routes for the AI SDK; the app is served on the same origin (the
// Vite dev and preview servers forward /v1 to Baton).
const API = "/v1/ai-sdk/chat";
const POLICIES = ["queue", "merge", "interrupt", "reject", "steer"];

function authHeaders(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function chatPath(id, rest) {
  return `${API}/${encodeURIComponent(id)}/${rest}`;
}

/** The chat named in the URL's fragment (`#my-chat`), or a new one. */
function initialChatId() {
  const named = decodeURIComponent(window.location.hash.slice(1));
  if (named) return named;
  const id = `chat-${crypto.randomUUID().slice(0, 8)}`;
  window.history.replaceState(null, "", `#${id}`);
  return id;
}

export function App() {
  const [chatId] = useState(initialChatId);
  const [token, setToken] = useState(() => localStorage.getItem("baton-token") ?? "");
  const [loaded, setLoaded] = useState(null);

  // The transcript first (the log is the truth), then the chat resumes
  // whatever turn is running.
  useEffect(() => {
    let live = true;
    setLoaded(null);
    fetch(chatPath(chatId, "messages"), { headers: authHeaders(token) })
      .then(async (r) => {
        const body = await r.json();
        if (!live) return;
        if (r.status === 404) setLoaded({ notFound: true });
        else if (!r.ok) setLoaded({ error: body.error?.message ?? r.statusText });
        else setLoaded(body);
      })
      .catch((e) => live && setLoaded({ error: String(e) }));
    return () => {
      live = false;
    };
  }, [chatId, token]);

  return (
    <main>
      <header>
        <h1>Baton chat</h1>
        <span data-testid="chat-id">{chatId}</span>
        <TokenField token={token} onChange={setToken} />
      </header>
      {loaded == null && <p>Loading…</p>}
      {loaded?.notFound && <p data-testid="not-found">This chat was not found.</p>}
      {loaded?.error && <p className="error">{loaded.error}</p>}
      {loaded?.messages && (
        <Chat key={`${chatId}/${token}`} chatId={chatId} token={token} initial={loaded.messages} />
      )}
    </main>
  );
}

function TokenField({ token, onChange }) {
  const [draft, setDraft] = useState(token);
  return (
    <form
      onSubmit={(e) => {
        e.preventDefault();
        localStorage.setItem("baton-token", draft);
        onChange(draft);
      }}
    >
      <input
        aria-label="token"
        type="password"
        placeholder="token (if the server has any)"
        value={draft}
        onChange={(e) => setDraft(e.target.value)}
      />
      <button type="submit">Use token</button>
    </form>
  );
}

function describe(d) {
  switch (d.type) {
    case "queued":
      return `queued: position ${d.position}`;
    case "merged":
      return "merged into the next turn";
    case "interrupting":
      return "interrupting the running turn";
    case "steered":
      return "handed to the running turn";
    case "pending":
      return "waiting for more messages";
    default:
      return "";
  }
}

function Chat({ chatId, token, initial }) {
  const [policy, setPolicy] = useState("queue");
  const policyRef = useRef(policy);
  policyRef.current = policy;
  const [notice, setNotice] = useState("");
  const [input, setInput] = useState("");
  const [refused, setRefused] = useState("");

  const transport = useMemo(
    () =>
      new DefaultChatTransport({
        api: API,
        headers: () => authHeaders(token),
        // Read when each message is sent: the policy picked now applies.
        body: () => ({ policy: policyRef.current }),
      }),
    [token],
  );

  const { messages, sendMessage, status, error } = useChat({
    id: chatId,
    messages: initial,
    transport,
    resume: true,
    onData: (part) => {
      if (part.type === "data-baton-disposition") setNotice(describe(part.data.disposition));
    },
  });

  async function send(e) {
    e.preventDefault();
    const text = input.trim();
    if (!text) return;
    setInput("");
    setRefused("");
    try {
      await sendMessage({ text });
    } catch (err) {
      setRefused(String(err.message ?? err));
    }
  }

  // useChat's own stop() only closes the connection; Baton keeps the turn
  // running until asked. The stream then ends with `abort`.
  async function stopTurn() {
    await fetch(chatPath(chatId, "stop"), { method: "POST", headers: authHeaders(token) });
  }

  return (
    <>
      <div className="messages" data-testid="messages">
        {messages.map((m) => (
          <Message key={m.id} message={m} />
        ))}
      </div>
      <p className="meta">
        status: <span data-testid="status">{status}</span>
        {notice && (
          <>
            {" · "}
            <span className="notice" data-testid="notice">
              {notice}
            </span>
          </>
        )}
      </p>
      {error && (
        <p className="error" data-testid="error">
          {error.message}
        </p>
      )}
      {refused && (
        <p className="error" data-testid="refused">
          {refused}
        </p>
      )}
      <form onSubmit={send}>
        <input
          aria-label="message"
          placeholder="Say something (try /tool, /sleep 3000 …, /hang)"
          value={input}
          onChange={(e) => setInput(e.target.value)}
        />
        <select aria-label="policy" value={policy} onChange={(e) => setPolicy(e.target.value)}>
          {POLICIES.map((p) => (
            <option key={p}>{p}</option>
          ))}
        </select>
        <button type="submit">Send</button>
        <button type="button" onClick={stopTurn}>
          Stop
        </button>
      </form>
    </>
  );
}

function Message({ message }) {
  const baton = message.metadata?.baton ?? {};
  return (
    <div
      className={`message ${message.role}`}
      data-testid="message"
      data-role={message.role}
      data-id={message.id}
      data-status={baton.status ?? ""}
    >
      {message.parts.map((part, i) => (
        <Part key={i} part={part} />
      ))}
      {message.role === "assistant" && baton.status && (
        <div className="meta">
          turn {baton.status}
          {baton.reason ? `: ${baton.reason}` : ""}
        </div>
      )}
    </div>
  );
}

function Part({ part }) {
  switch (part.type) {
    case "text":
      return (
        <div className="text" data-testid="text">
          {part.text}
        </div>
      );
    case "reasoning":
      return <div className="reasoning">{part.text}</div>;
    case "dynamic-tool":
      return (
        <div className="tool" data-testid="tool" data-state={part.state}>
          {part.toolName}({JSON.stringify(part.input)}) →{" "}
          {part.state === "output-available"
            ? String(part.output)
            : part.state === "output-error"
              ? part.errorText
              : "…"}
        </div>
      );
    case "data-baton-note":
      return <div className="meta">{part.data.text}</div>;
    default:
      return null;
  }
}
