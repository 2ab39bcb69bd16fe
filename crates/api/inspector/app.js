// The inspector's entry point: signs in when the server wants a token, then
// shows the sessions list (/) or one session (/sessions/{id}).

import { ApiError, authRequired, getToken, setToken } from './api.js';
import { h, replace } from './dom.js';
import { listPage } from './list.js';
import { sessionPage } from './session.js';

const root = document.getElementById('app');
const account = document.getElementById('account');

function signIn(message) {
  replace(account);
  const token = h('input', { id: 'token', type: 'password', autocomplete: 'current-password', required: true });
  const form = h('form', { class: 'signin', 'aria-label': 'Sign in' },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'This server has owners. Enter your token: it is kept in this tab only and sent as a Bearer header.'),
    h('div', { class: 'field' }, h('label', { for: 'token' }, 'Token'), token),
    h('button', { type: 'submit' }, 'Sign in'),
    message ? h('p', { class: 'problem', role: 'alert' }, message) : null);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    setToken(token.value.trim());
    show();
  });
  replace(root, form);
  token.focus();
}

function showAccount() {
  if (!authRequired()) {
    replace(account);
    return;
  }
  const out = h('button', { type: 'button', class: 'secondary' }, 'Sign out');
  out.addEventListener('click', () => {
    setToken(null);
    signIn();
  });
  replace(account, h('span', { class: 'muted' }, 'signed in'), out);
}

async function show() {
  if (authRequired() && !getToken()) {
    signIn();
    return;
  }
  showAccount();
  const m = window.location.pathname.match(/^\/sessions\/([^/]+)\/?$/);
  try {
    if (m) await sessionPage(root, decodeURIComponent(m[1]));
    else await listPage(root);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      setToken(null);
      signIn('That token was not accepted.');
      return;
    }
    replace(root, h('p', { class: 'problem', role: 'alert' }, e instanceof ApiError ? e.describe() : String(e)));
  }
}

show();
