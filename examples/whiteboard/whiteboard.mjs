// The whiteboard page: a shared board drawn on by everyone who has it open.
//
// - A finished stroke is sent to the backend on the inbound stream "board" (through the
//   gateway). The backend stores it and publishes it to the channel `board:<name>`, which keeps
//   history; every page, this one included, draws what comes back on that channel.
// - A page that opens asks the backend for the board so far ("load"), after subscribing, so
//   nothing published in between is missed (strokes are merged by id). A page that this
//   browser had open before (same board) starts from what it saved in localStorage instead —
//   the strokes and the channel offset they go up to — and resumes the channel from that
//   offset, so it only gets what was drawn since.
// - A page that reconnects — its replica died, the network blinked — resumes the channel from
//   the last offset it saw (the client does that) and gets exactly the strokes it missed. When
//   the history cannot make it whole (recovered: false), it loads the board again; strokes it
//   holds that the backend no longer has (Redis came back empty) are sent again, so the
//   windows that were open put the board back.
// - A stroke drawn while offline waits in the client and is sent on reconnect, with its id, so
//   the gateway stores it once.
//
// - The header lists the windows on the board: the board's channel keeps presence, so the
//   page reads who is in it after every (re)subscribe and follows join and leave events in
//   between (the client's watchPresence). A window is an anonymous connection, shown as its
//   replica and connection number; the windows of a replica that died leave the list once the
//   other replicas count it dead (presence.replica_ttl_seconds in wsbridge.toml).
//
// - Every page shows where the other pages' pointers are (live cursors): it publishes its own
//   pointer on the channel `cursor:<name>` itself, a client publish that the gateway allows on
//   `cursor:*` (wsbridge.toml), at most every CURSOR_EVERY_MS, and draws what the others
//   publish there. That channel keeps no history and no backend sees it: a lost position is
//   replaced by the next one, and a cursor still for CURSOR_GONE_MS (or whose window left) goes.
//
// Every page draws the strokes in the backend's order (`seq`, the inbound stream entry id), so
// all pages show the same picture. Query parameters: ?board=NAME (default "main"),
// &ws=ws://HOST/ws (default: this page's host, path /ws).
import { WsBridgeClient } from './js/wsbridge-client.mjs';

const params = new URLSearchParams(location.search);
const board = params.get('board') || 'main';
const channel = `board:${board}`;
const cursorChannel = `cursor:${board}`;
const wsUrl = params.get('ws') || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;

const COLORS = ['#222222', '#e53935', '#1e88e5', '#43a047', '#fb8c00', '#8e24aa'];
const MAX_POINTS = 500; // per stroke, as the backends accept; longer strokes are split
const MIN_STEP = 0.002; // points closer than this (fraction of the board) are skipped
const CURSOR_EVERY_MS = 50; // the most often this page publishes its pointer
const CURSOR_GONE_MS = 10_000; // another page's cursor that did not move for this long goes

const canvas = /** @type {HTMLCanvasElement} */ (document.getElementById('board'));
const ctx = canvas.getContext('2d');
const statusEl = document.getElementById('status');
const errorEl = document.getElementById('error');
const widthEl = /** @type {HTMLInputElement} */ (document.getElementById('width'));
const whoEl = document.getElementById('who');
const surfaceEl = document.getElementById('surface');

const pageId = Math.random().toString(16).slice(2, 10);
let counter = 0;
let color = COLORS[0];
const strokes = new Map(); // id -> stroke; the backend's copy carries `seq`
const local = new Map(); // id -> order, for strokes drawn here and not yet confirmed
let drawing = null; // the stroke under the pointer
let loaded = false; // the board so far has arrived
let loads = 0; // how many times the board was asked for
let gap = false; // the history could not replay what this page missed: compare with the store
let snapshotIds = new Set(); // strokes in the snapshot(s) arriving since the last complete one

// ---- the connection ---------------------------------------------------------------------

const client = new WsBridgeClient({ url: wsUrl, baseDelayMs: 250, maxDelayMs: 5000 });

client.on('message', (ch, data) => {
  if (!data || typeof data !== 'object' || data.board !== board) return;
  if (data.type === 'cursor' && ch === cursorChannel) {
    showCursor(data);
    return;
  }
  if (data.type === 'stroke' && ch === channel) {
    merge([data.stroke]);
  } else if (data.type === 'snapshot' && ch === null) {
    merge(data.strokes);
    for (const st of data.strokes) snapshotIds.add(st.id);
    if (data.last) {
      loaded = true;
      if (gap) restoreLost();
      snapshotIds = new Set();
    }
  } else if (data.type === 'error') {
    showError(`the backend refused a message: ${data.error}`);
  }
  showStatus();
});

client.on('subscribed', ({ channel: ch, recovered, resumed, reconnect }) => {
  if (ch !== channel) return;
  // Load the board when it has not arrived yet (first visit, or the answer was lost with a
  // connection), when the history could not replay the gap, or when there was no offset to
  // resume from (nothing had been drawn when this page joined).
  if (recovered === false) gap = true;
  if (!loaded || recovered === false || (reconnect && !resumed)) load();
});

// After a gap, strokes this page holds as stored that the board no longer has were lost with
// Redis' data: send them again (without their old seq). Strokes are never deleted, so whatever
// any open window still holds belongs on the board.
function restoreLost() {
  gap = false;
  for (const s of strokes.values()) {
    if (typeof s.seq !== 'string' || snapshotIds.has(s.id)) continue;
    const stroke = { ...s };
    delete stroke.seq;
    submit(stroke);
  }
}

for (const event of /** @type {const} */ (['welcome', 'close', 'reconnecting'])) client.on(event, showStatus);

// Who has the board open: one entry per window (each is an anonymous connection, a user of
// its own), read again after every subscribe and kept current by join and leave events.
let people = [];
client.watchPresence(channel, (members) => {
  people = members;
  showWho();
});
client.on('welcome', showWho); // this window's own entry changes with its connection
client.on('leave', ({ channel: ch, member }) => {
  if (ch !== channel) return;
  for (const [page, c] of cursors) if (c.connection === member.connection) dropCursor(page);
});
client.on('error', (err) => console.warn('wsbridge:', err));

async function load() {
  loads += 1;
  try {
    await client.send('board', { board, load: true });
  } catch (err) {
    if (err.code !== 'closed') setTimeout(load, 1000); // retried; stroke merging is idempotent
  }
}

// Sends a finished stroke until the gateway has stored it. The client resends it after a
// reconnect by itself; errors it gives back (rate limited, Redis unavailable, too many
// waiting) are retried here with a backoff, with the same id, so it is stored once.
async function submit(stroke, attempt = 0) {
  try {
    await client.send('board', { board, stroke }, { id: stroke.id });
  } catch (err) {
    if (err.code === 'closed') return;
    if (err.retryable || err.code === 'queue_full') {
      setTimeout(() => submit(stroke, attempt + 1), Math.min(5000, 250 * 2 ** attempt));
    } else {
      showError(`a stroke was not saved: ${err.message}`);
      forget(stroke.id);
    }
  }
}

function merge(list) {
  for (const s of list) put(s);
  save();
}

// Every change to the strokes goes through put and forget, so that the painting order and the
// painted board are worked out again only when they changed (not on every pointer move).
// `localOrder`: for a stroke drawn here and not yet stored, its place among those.
function put(s, localOrder) {
  strokes.set(s.id, s);
  if (localOrder === undefined) local.delete(s.id);
  else local.set(s.id, localOrder);
  changed();
}

function forget(id) {
  strokes.delete(id);
  local.delete(id);
  changed();
}

// ---- what this browser keeps between visits ----------------------------------------------

const storageKey = `wsbridge-whiteboard:${board}`;

// Saved once things settle: the strokes, the channel offset they are complete up to, and the
// strokes drawn here that were not stored yet (sent again on the next visit, with their ids).
// Only once the board has loaded: before that, the strokes are not complete up to the offset.
let saveTimer = 0;
function save() {
  if (!saveTimer) saveTimer = setTimeout(saveNow, 200);
}

function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = 0;
  const offset = client.lastOffset(channel);
  if (!loaded || !offset) return;
  try {
    localStorage.setItem(storageKey, JSON.stringify({ offset, strokes: sorted() }));
  } catch {
    localStorage.removeItem(storageKey); // too large for this browser: load next time
  }
}
addEventListener('pagehide', saveNow);

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(storageKey));
    if (typeof saved?.offset !== 'string' || !Array.isArray(saved.strokes)) return null;
    return saved;
  } catch {
    return null;
  }
}

// ---- drawing ----------------------------------------------------------------------------

// Confirmed strokes in `seq` order ("<ms>-<n>"), then this page's unconfirmed ones.
function order(s) {
  if (typeof s.seq !== 'string') return [1, local.get(s.id) ?? 0, 0];
  const [ms, n] = s.seq.split('-').map(Number);
  return [0, ms, n];
}

function byOrder(a, b) {
  const x = order(a);
  const y = order(b);
  return x[0] - y[0] || x[1] - y[1] || x[2] - y[2] || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

let painted = null; // the strokes in painting order, once worked out
function sorted() {
  painted ??= [...strokes.values()].sort(byOrder);
  return painted;
}

function paintStroke(ctx, s) {
  const w = canvas.width;
  const h = canvas.height;
  const dpr = window.devicePixelRatio || 1;
  ctx.strokeStyle = s.color;
  ctx.fillStyle = s.color;
  ctx.lineWidth = s.width * dpr;
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  const [x0, y0] = s.points[0];
  if (s.points.length === 1) {
    ctx.beginPath();
    ctx.arc(x0 * w, y0 * h, (s.width * dpr) / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(x0 * w, y0 * h);
  for (const [x, y] of s.points.slice(1)) ctx.lineTo(x * w, y * h);
  ctx.stroke();
}

// The board without the stroke being drawn, painted off screen when the strokes change.
const layer = document.createElement('canvas');
const layerCtx = layer.getContext('2d');
let layerStale = true;

function changed() {
  painted = null;
  layerStale = true;
  repaint();
}

let frame = 0;
function repaint() {
  if (!frame) frame = requestAnimationFrame(paint);
}

// The whole board, in order: every page paints the same picture, whatever order strokes
// arrived in. Then the stroke under the pointer, on top.
function paint() {
  frame = 0;
  if (layerStale) {
    layerCtx.clearRect(0, 0, layer.width, layer.height);
    for (const s of sorted()) paintStroke(layerCtx, s);
    layerStale = false;
  }
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(layer, 0, 0);
  if (drawing) paintStroke(ctx, drawing);
}

function resize() {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = layer.width = Math.round(canvas.clientWidth * dpr);
  canvas.height = layer.height = Math.round(canvas.clientHeight * dpr);
  layerStale = true;
  paint();
}
new ResizeObserver(resize).observe(canvas);

function pointAt(event) {
  const r = canvas.getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, Math.round(v * 10000) / 10000));
  return [clamp((event.clientX - r.left) / r.width), clamp((event.clientY - r.top) / r.height)];
}

function begin(point) {
  counter += 1;
  drawing = { id: `${pageId}-${counter}`, color, width: Number(widthEl.value), points: [point] };
}

function finish() {
  const s = drawing;
  drawing = null;
  put(s, counter);
  submit(s);
  save();
  showStatus();
}

canvas.addEventListener('pointerdown', (e) => {
  if (e.button !== 0) return;
  canvas.setPointerCapture(e.pointerId);
  begin(pointAt(e));
  repaint();
});

canvas.addEventListener('pointermove', (e) => {
  if (!drawing) return;
  const p = pointAt(e);
  const last = drawing.points[drawing.points.length - 1];
  if (Math.hypot(p[0] - last[0], p[1] - last[1]) < MIN_STEP) return;
  drawing.points.push(p);
  if (drawing.points.length === MAX_POINTS) {
    finish(); // a long stroke goes out in pieces that join up
    begin(p);
  }
  repaint();
});

for (const event of ['pointerup', 'pointercancel']) {
  canvas.addEventListener(event, () => {
    if (drawing) finish();
  });
}

// ---- live cursors -----------------------------------------------------------------------

const cursors = new Map(); // page id -> { x, y, connection, at, el }, other pages' pointers
let cursorPoint = null; // this page's pointer, to publish
let cursorSentAt = 0;
let cursorTimer = 0;

// Publishes the pointer at most every CURSOR_EVERY_MS: the latest position wins.
function moveCursor(point) {
  cursorPoint = point;
  if (!cursorTimer) cursorTimer = setTimeout(publishCursor, Math.max(0, cursorSentAt + CURSOR_EVERY_MS - Date.now()));
}

function publishCursor() {
  cursorTimer = 0;
  cursorSentAt = Date.now();
  if (client.state !== 'open' || !cursorPoint) return;
  const [x, y] = cursorPoint;
  const data = { type: 'cursor', board, page: pageId, connection: client.connectionId, x, y, color };
  // Refused or lost (offline, rate limited, Redis down): the next move publishes again.
  client.publish(cursorChannel, data).catch(() => {});
}

canvas.addEventListener('pointermove', (e) => moveCursor(pointAt(e)));

// Another page's pointer; this page's own comes back too (it is a subscriber) and is skipped.
function showCursor(d) {
  if (d.page === pageId || typeof d.x !== 'number' || typeof d.y !== 'number') return;
  let c = cursors.get(d.page);
  if (!c) {
    const el = document.createElement('div');
    el.className = 'cursor';
    el.dataset.page = d.page;
    surfaceEl.append(el);
    c = { el };
    cursors.set(d.page, c);
  }
  Object.assign(c, { x: d.x, y: d.y, connection: d.connection, at: Date.now() });
  c.el.style.left = `${d.x * 100}%`;
  c.el.style.top = `${d.y * 100}%`;
  c.el.style.color = COLORS.includes(d.color) ? d.color : COLORS[0];
  c.el.textContent = typeof d.connection === 'string' ? nameOf({ connection: d.connection }) : '';
}

function dropCursor(page) {
  cursors.get(page)?.el.remove();
  cursors.delete(page);
}

setInterval(() => {
  for (const [page, c] of cursors) if (Date.now() - c.at > CURSOR_GONE_MS) dropCursor(page);
}, 1000);

// ---- toolbar and status -----------------------------------------------------------------

const palette = document.getElementById('palette');
for (const c of COLORS) {
  const b = document.createElement('button');
  b.className = 'swatch';
  b.style.background = c;
  b.title = c;
  b.setAttribute('aria-pressed', String(c === color));
  b.addEventListener('click', () => {
    color = c;
    for (const other of palette.children) other.setAttribute('aria-pressed', String(other === b));
  });
  palette.append(b);
}

// The replica is the first part of the connection id (`<replica>.<incarnation>.<n>`).
function replica() {
  return client.connectionId ? client.connectionId.split('.')[0] : null;
}

function showStatus() {
  statusEl.dataset.state = client.state;
  const where = client.state === 'open' ? `on ${replica()}` : client.state;
  const waiting = local.size ? `, ${local.size} not saved yet` : '';
  statusEl.textContent = `board "${board}" · ${where} · ${strokes.size} strokes${waiting}`;
}

// A member's name: from the token's `info` claim when the page has tokens, else the replica
// and the number of its connection (`<replica>.<incarnation>.<n>`).
function nameOf(member) {
  if (typeof member.info?.name === 'string') return member.info.name;
  const parts = member.connection.split('.');
  return `${parts[0]} #${parts.at(-1)}`;
}

function showWho() {
  const entries = [...people]
    .sort((a, b) => (a.connection < b.connection ? -1 : a.connection > b.connection ? 1 : 0))
    .map((m) => {
      const li = document.createElement('li');
      const you = m.connection === client.connectionId;
      li.dataset.connection = m.connection;
      if (you) li.dataset.you = '';
      li.textContent = you ? `${nameOf(m)} (this window)` : nameOf(m);
      li.title = m.connection;
      return li;
    });
  whoEl.replaceChildren(...entries);
}

function showError(text) {
  errorEl.textContent = text;
  setTimeout(() => {
    if (errorEl.textContent === text) errorEl.textContent = '';
  }, 5000);
}

// For tests and the curious (browser console): what this page holds.
/** @type {any} */ (window).whiteboard = {
  board,
  client,
  get state() {
    return client.state;
  },
  get replica() {
    return replica();
  },
  get loaded() {
    return loaded;
  },
  /** How many times this page asked the backend for the board. */
  get loads() {
    return loads;
  },
  /** This page's id, which its cursor carries. */
  pageId,
  /** The other pages' cursors shown: `{page, x, y}`, x and y as fractions of the board. */
  get cursors() {
    return [...cursors].map(([page, c]) => ({ page, x: c.x, y: c.y }));
  },
  /** The connection ids of the windows on the board, as the list shows them. */
  get people() {
    return people.map((m) => m.connection).sort();
  },
  /** Stroke ids in painting order; `confirmed` only those the backend has stored. */
  ids({ confirmed = false } = {}) {
    return sorted()
      .filter((s) => !confirmed || typeof s.seq === 'string')
      .map((s) => s.id);
  },
};

const saved = restore();
if (saved) {
  loaded = true;
  for (const s of saved.strokes) {
    if (typeof s.seq === 'string') {
      put(s);
    } else {
      put(s, (counter += 1)); // drawn here last time and not stored yet
      submit(s);
    }
  }
}
client
  .subscribe(channel, { since: saved?.offset })
  .catch((err) => showError(`cannot join ${channel}: ${err.message}`));
client.subscribe(cursorChannel).catch((err) => showError(`cannot join ${cursorChannel}: ${err.message}`));
client.connect().catch((err) => showError(`cannot connect: ${err.message}`));
showStatus();
