// The /v1 API as the page uses it. The owner's token lives in
// sessionStorage (gone when the tab closes) and travels only in the
// Authorization header, never in a URL.

const TOKEN_KEY = 'baton.token';

/** Whether the server wants a token (it says so in the page it served). */
export function authRequired() {
  const meta = document.querySelector('meta[name="baton-auth"]');
  return meta !== null && meta.getAttribute('content') === 'token';
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Request headers with the token, if there is one. */
export function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const token = getToken();
  if (token) headers.set('Authorization', `Bearer ${token}`);
  return headers;
}

/** An error answer of the API: its status and `{error: {code, message}}`. */
export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }

  /** "409 session_busy: turn … is running" */
  describe() {
    return `${this.status} ${this.code}: ${this.message}`;
  }
}

/** Calls the API; resolves to `{status, data}` or rejects with ApiError. */
export async function api(method, path, { body, headers, signal } = {}) {
  const h = authHeaders(headers);
  if (body !== undefined) h.set('Content-Type', 'application/json');
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', `the server did not answer (${e.message})`, null);
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!resp.ok) {
    const err = data && data.error ? data.error : {};
    throw new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || text, data);
  }
  return { status: resp.status, data };
}

/** A fresh Idempotency-Key, so a retried send never stores twice. */
export function idempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/** The busy policies the server knows, from its API document. */
export async function policies() {
  const fallback = ['queue', 'merge', 'interrupt', 'reject'];
  try {
    const { data } = await api('GET', '/openapi.json');
    const schema = data && data.components && data.components.schemas && data.components.schemas.Policy;
    const names = schema && Array.isArray(schema.enum) ? schema.enum.filter((p) => typeof p === 'string') : [];
    return names.length ? names : fallback;
  } catch {
    return fallback;
  }
}
