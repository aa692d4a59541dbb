// wsbridge-client.mjs — a client for the wsbridge gateway, for browsers and Node.
//
// Plain JavaScript, one ES module, no dependencies and no build step. Its TypeScript types are
// wsbridge-client.d.mts beside it: change one, change the other (tests/ts checks that every
// public member and event here is declared there, and the declarations against typed code).
// It speaks the JSON protocol described in the README ("The client protocol"),
// docs/protocol.md and docs/history-and-resume.md:
//
//   - connects to `ws(s)://HOST/ws` (one URL, a list tried round-robin, or a function), with an
//     optional token sent as `?token=`;
//   - reconnects with exponential backoff and full jitter;
//   - remembers the last offset seen per channel and resubscribes with `since` after a
//     reconnect, telling the app whether it was `recovered`;
//   - keeps every `send` until its `ack` and resends it with the same id after a reconnect (the
//     gateway stores a resent id once, per user, within its dedupe window);
//   - publishes to channels that take client publishes (`publish`), answered with the offset;
//   - asks for a channel's presence (`presence`), reports `join` and `leave`, and keeps a live
//     member list across reconnects (`watchPresence`).
//
// See README.md beside this file for the API.

const OPEN = 1; // WebSocket.OPEN, the same in every implementation

/** Error codes after which resending the same frame (same id) may succeed. */
const RETRYABLE = new Set(['overloaded', 'redis_unavailable', 'rate_limited', 'shutting_down']);

/** An error frame from the gateway, or a refusal by this library (code `queue_full`, `closed`...). */
export class WsBridgeError extends Error {
  constructor(code, message, id = null) {
    super(message || code);
    this.name = 'WsBridgeError';
    /** snake_case code: the gateway's (`channel_not_allowed`, ...) or this library's. */
    this.code = code;
    /** The frame id the error answers, when there is one. */
    this.id = id;
    /** Whether sending the same frame again (with the same id) may succeed. */
    this.retryable = RETRYABLE.has(code);
  }
}

/**
 * Compares two offsets (`<epoch>:<ms>-<seq>`). Returns a negative number, 0 or a positive
 * number, or null when they cannot be compared (different epochs, or not offsets).
 */
export function compareOffsets(a, b) {
  const pa = parseOffset(a);
  const pb = parseOffset(b);
  if (!pa || !pb || pa.epoch !== pb.epoch) return null;
  if (pa.ms !== pb.ms) return pa.ms < pb.ms ? -1 : 1;
  if (pa.seq !== pb.seq) return pa.seq < pb.seq ? -1 : 1;
  return 0;
}

function parseOffset(offset) {
  if (typeof offset !== 'string') return null;
  const colon = offset.lastIndexOf(':');
  const m = /^(\d+)-(\d+)$/.exec(offset.slice(colon + 1));
  if (colon < 0 || !m) return null;
  return { epoch: offset.slice(0, colon), ms: BigInt(m[1]), seq: BigInt(m[2]) };
}

/**
 * The backoff before reconnect attempt `attempt` (1 for the first): full jitter, a delay drawn
 * uniformly from [0, cap] where cap = min(maxDelayMs, baseDelayMs * 2^(attempt-1)).
 */
export function backoff(attempt, baseDelayMs, maxDelayMs, random = Math.random) {
  const capMs = Math.min(maxDelayMs, baseDelayMs * 2 ** Math.max(0, attempt - 1));
  return { capMs, delayMs: Math.round(random() * capMs) };
}

function randomHex(bytes) {
  const buf = new Uint8Array(bytes);
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(buf);
  else for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256);
  return Array.from(buf, (b) => b.toString(16).padStart(2, '0')).join('');
}

function reportListenerError(err) {
  // Like a browser's event dispatch: a throwing listener does not break the client, and the
  // error still surfaces (console in browsers, uncaughtException in Node).
  setTimeout(() => {
    throw err;
  }, 0);
}

function handled(promise) {
  promise.catch(() => {});
  return promise;
}

const DEFAULTS = {
  baseDelayMs: 500,
  maxDelayMs: 30_000,
  connectTimeoutMs: 10_000,
  stableAfterMs: 5_000,
  maxPendingSends: 100,
  reconnectOnBackendClose: false,
};

export class WsBridgeClient {
  // Internals are private fields (#): an app reads the state through the getters below, and
  // cannot reach in and break the bookkeeping that resume and resend depend on.
  #urlFn = null; // options.url when it is a function
  #urls = []; // options.urls (or [options.url])
  #WebSocket;
  #token;
  #random;

  #listeners = new Map(); // event -> Set<fn>
  #channels = new Map(); // channel -> { offset, recovered, subscribed, waiters: [] }
  #sends = new Map(); // id -> { frame, resolve, reject, transmissions }
  #presence = new Map(); // id -> { frame, channel, resolve, reject }, until answered
  #refreshes = new Map(); // id -> { resolve, reject }, until answered
  #publishes = new Map(); // id -> { resolve, reject, channel }, on the current connection
  #requests = new Map(); // frame id -> { type, channel, ... } on the current connection
  #connectWaiters = [];

  #ws = null;
  #state = 'idle'; // idle | connecting | open | reconnecting | closed
  #wanted = false; // connect() called and close() not since
  #gen = 0; // invalidates stale connection attempts
  #attempt = 0; // consecutive reconnect attempts since the last stable connection
  #urlIndex = 0;
  #timer = null;
  #connectTimer = null;
  #welcomed = false;
  #welcomeAt = 0;
  #hadWelcome = false;
  #welcomeInfo = null;
  #idPrefix = randomHex(8);
  #seq = 0;

  /**
   * @param {object} options
   * @param {string} [options.url] the gateway's `ws(s)://HOST/ws` URL, or a function
   *   `({attempt, previous}) => string | Promise<string>` called before every connection
   * @param {string[]} [options.urls] several URLs, tried round-robin (the next one after every
   *   close or failed attempt)
   * @param {string | (() => string | Promise<string>)} [options.token] a JWT, sent as `?token=`;
   *   a function is called before every connection, and when the gateway says the token is about
   *   to expire (`refresh_required`): the fresh token is sent on the open connection, which then
   *   stays open
   * @param {Function} [options.WebSocket] a WebSocket constructor (default globalThis.WebSocket;
   *   pass `WebSocket` from the `ws` package on Node versions without a global one)
   * @param {number} [options.baseDelayMs=500] first reconnect delay cap
   * @param {number} [options.maxDelayMs=30000] largest reconnect delay cap
   * @param {number} [options.connectTimeoutMs=10000] an attempt that got no welcome by then is
   *   abandoned (and retried)
   * @param {number} [options.stableAfterMs=5000] a connection that lived this long resets the
   *   backoff
   * @param {number} [options.maxPendingSends=100] sends waiting for an ack; beyond it `send`
   *   rejects with `queue_full`
   * @param {boolean | ((code: number, reason: string) => boolean)} [options.reconnectOnBackendClose=false]
   *   whether to reconnect after a 4000–4999 close (a disconnect asked by a backend)
   * @param {() => number} [options.random=Math.random] jitter source in [0, 1)
   */
  constructor(options = {}) {
    const o = { ...DEFAULTS, ...options };
    if (typeof o.url === 'function') this.#urlFn = o.url;
    else if (Array.isArray(o.urls) && o.urls.length > 0) this.#urls = [...o.urls];
    else if (typeof o.url === 'string') this.#urls = [o.url];
    else throw new TypeError('wsbridge: options.url (string or function) or options.urls is required');
    this.#WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError(
        'wsbridge: no WebSocket constructor; pass options.WebSocket (e.g. from the `ws` package), ' +
          'or run Node >= 22 (or Node 20/21 with --experimental-websocket)'
      );
    }
    this.#token = o.token;
    this.#random = o.random ?? Math.random;
    this.options = o;

    this.connectionId = null;
    this.user = null;
    this.url = null;
    this.stats = { connects: 0, reconnects: 0, resends: 0, duplicatesDropped: 0 };
  }

  // ---- events ----------------------------------------------------------------------------

  /** Adds a listener. Events: open, welcome, message, subscribed, unsubscribed, join, leave,
   * close, reconnecting, refresh_required, refreshed, error (their arguments:
   * WsBridgeClientEvents in wsbridge-client.d.mts). Returns the client. */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return this;
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
    return this;
  }

  once(event, fn) {
    const wrapper = (...args) => {
      this.off(event, wrapper);
      fn(...args);
    };
    return this.on(event, wrapper);
  }

  #emit(event, ...args) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }

  // ---- state -----------------------------------------------------------------------------

  /** idle | connecting | open | reconnecting | closed */
  get state() {
    return this.#state;
  }

  /** The channels this client is in (or joining), in the order they were subscribed. */
  get channels() {
    return [...this.#channels.keys()];
  }

  /** The last offset seen on `channel`, or null. */
  lastOffset(channel) {
    return this.#channels.get(channel)?.offset ?? null;
  }

  /**
   * From the last `subscribed` for `channel`: true when a resume with `since` replayed
   * everything missed, false when it could not (reload your state), null after a first
   * subscribe (nothing to recover). Undefined when not subscribed.
   */
  recovered(channel) {
    return this.#channels.get(channel)?.recovered;
  }

  /** How many sends wait for their ack. */
  get pendingSends() {
    return this.#sends.size;
  }

  /** Consecutive reconnect attempts since the last stable connection. */
  get attempt() {
    return this.#attempt;
  }

  // ---- connection ------------------------------------------------------------------------

  /**
   * Starts connecting (and reconnecting until close()). Resolves with the next welcome
   * `{connection, user, reconnect, url}` (at once when open); rejects with code `closed` if the client stops before that.
   */
  connect() {
    const p = handled(
      new Promise((resolve, reject) => {
        if (this.#welcomed) resolve(this.#welcomeInfo);
        else this.#connectWaiters.push({ resolve, reject });
      })
    );
    if (!this.#wanted) {
      this.#wanted = true;
      this.#attempt = 0;
      this.#open();
    }
    return p;
  }

  /**
   * Closes for good (no reconnect). Sends still waiting for an ack are rejected with code
   * `closed`; channels and offsets are kept, so a later connect() resumes them.
   * Resolves when the socket has closed.
   */
  close(code = 1000, reason = '') {
    this.#wanted = false;
    this.#gen++;
    clearTimeout(this.#timer);
    this.#timer = null;
    const ws = this.#ws;
    if (!ws) {
      this.#stop(null, 'closed by the client');
      return Promise.resolve();
    }
    this.#handleClose(ws, code, reason, true);
    return this.#closeSocket(ws, code, reason);
  }

  /** Drops the current connection and connects again (e.g. after a network change). */
  reconnect() {
    const ws = this.#ws;
    if (!this.#wanted) return this.connect();
    if (ws) {
      this.#handleClose(ws, 1000, 'reconnect', true);
      this.#closeSocket(ws, 1000, 'reconnect');
    } else if (this.#timer) {
      clearTimeout(this.#timer);
      this.#timer = null;
      this.#open();
    }
    return this.connect();
  }

  // Closes a socket that _handleClose has already let go of; resolves once it is closed.
  #closeSocket(ws, code, reason) {
    this.#detach(ws);
    return new Promise((resolve) => {
      if (ws.readyState === 3) return resolve();
      const connecting = ws.readyState === 0;
      // Do not wait forever on a socket that never reports its close.
      const timer = setTimeout(resolve, 2000);
      ws.onclose = () => {
        clearTimeout(timer);
        resolve();
      };
      ws.onerror = () => {};
      try {
        ws.close(code, reason);
      } catch {
        try {
          ws.close();
        } catch {}
      }
      if (connecting) {
        clearTimeout(timer);
        resolve();
      }
    });
  }

  #detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  async #nextUrl() {
    let url;
    if (this.#urlFn) {
      url = await this.#urlFn({ attempt: this.#attempt, previous: this.url });
    } else {
      url = this.#urls[this.#urlIndex % this.#urls.length];
    }
    let token = this.#token;
    if (typeof token === 'function') token = await token();
    if (token) url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
    return url;
  }

  async #open() {
    const gen = ++this.#gen;
    this.#state = 'connecting';
    let url;
    try {
      url = await this.#nextUrl();
    } catch (err) {
      if (gen !== this.#gen || !this.#wanted) return;
      this.#emit('error', err);
      this.#scheduleReconnect(null);
      return;
    }
    if (gen !== this.#gen || !this.#wanted) return;
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (err) {
      this.#emit('error', err);
      this.#urlIndex++;
      this.#scheduleReconnect(null);
      return;
    }
    this.#ws = ws;
    this.url = url;
    this.#welcomed = false;
    this.#connectTimer = setTimeout(() => {
      if (this.#ws !== ws || this.#welcomed) return;
      this.#emit('error', new WsBridgeError('connect_timeout', `no welcome within ${this.options.connectTimeoutMs} ms`));
      this.#handleClose(ws, 1006, 'connect timeout', false);
      this.#closeSocket(ws, 1000, 'connect timeout');
    }, this.options.connectTimeoutMs);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      if (this.#ws === ws) this.#emit('open', { url });
    };
    ws.onerror = (ev) => {
      if (this.#ws !== ws) return;
      const message = ev?.message || ev?.error?.message || 'WebSocket error';
      this.#emit('error', new WsBridgeError('socket_error', message));
      // A failed connection attempt: browsers follow the error with a close event, but some
      // implementations (Node 20's) never do. Treat it as closed (1006) if no close came.
      if (!opened) {
        setTimeout(() => {
          if (this.#ws !== ws) return;
          this.#handleClose(ws, 1006, 'connection failed', false);
          this.#closeSocket(ws, 1000, 'connection failed');
        }, 0);
      }
    };
    ws.onclose = (ev) => this.#handleClose(ws, ev?.code ?? 1006, ev?.reason ?? '', false);
    ws.onmessage = (ev) => {
      if (this.#ws !== ws) return;
      let frame;
      try {
        if (typeof ev.data !== 'string') throw new Error('binary frame (this client speaks JSON)');
        frame = JSON.parse(ev.data);
      } catch (err) {
        this.#emit('error', new WsBridgeError('bad_frame', `unreadable frame from the gateway: ${err.message}`));
        return;
      }
      this.#onFrame(frame);
    };
  }

  #handleClose(ws, code, reason, byClient) {
    if (this.#ws !== ws) return;
    this.#detach(ws);
    this.#ws = null;
    clearTimeout(this.#connectTimer);
    const wasWelcomed = this.#welcomed;
    this.#welcomed = false;
    this.connectionId = null;
    // Replies for this connection will never come; unsubscribes are done (it is gone).
    for (const req of this.#requests.values()) if (req.type === 'unsubscribe') req.resolve();
    this.#requests.clear();
    // A refresh lost with the connection: the next connection is made with a fresh token.
    for (const r of this.#refreshes.values()) r.reject(new WsBridgeError('closed', 'the connection closed before the refresh was answered'));
    this.#refreshes.clear();
    // A publish lost with the connection may or may not have been published; it is not sent
    // again (the gateway does not deduplicate publishes), the app decides.
    for (const q of this.#publishes.values()) {
      const err = new WsBridgeError('disconnected', 'the connection closed before the publish was answered: it may have been published');
      err.channel = q.channel;
      q.reject(err);
    }
    this.#publishes.clear();
    for (const ch of this.#channels.values()) ch.subscribed = false;
    this.#urlIndex++;

    let willReconnect;
    if (!this.#wanted) willReconnect = false;
    else if (code >= 4000 && code <= 4999 && !byClient) {
      const opt = this.options.reconnectOnBackendClose;
      willReconnect = typeof opt === 'function' ? !!opt(code, reason) : !!opt;
    } else willReconnect = true;

    // Backoff: a connection that lived long enough was healthy, so start over; 1012 means the
    // replica is going away, not that anything failed. 1013 (overloaded) keeps growing it.
    const stable = wasWelcomed && Date.now() - this.#welcomeAt >= this.options.stableAfterMs;
    if ((stable || (wasWelcomed && code === 1012) || byClient) && code !== 1013) this.#attempt = 0;

    this.#emit('close', { code, reason, byClient, willReconnect });
    if (willReconnect && this.#wanted) {
      if (byClient) this.#open();
      else this.#scheduleReconnect(code);
    } else {
      this.#wanted = false;
      const why = byClient ? 'closed by the client' : `closed by the gateway (${code}${reason ? ' ' + reason : ''})`;
      this.#stop(code, why);
    }
  }

  #stop(code, why) {
    this.#state = 'closed';
    const err = new WsBridgeError('closed', why);
    for (const s of this.#sends.values()) s.reject(err);
    this.#sends.clear();
    for (const q of this.#presence.values()) q.reject(err);
    this.#presence.clear();
    for (const ch of this.#channels.values()) {
      for (const w of ch.waiters) w.reject(err);
      ch.waiters = [];
    }
    for (const w of this.#connectWaiters) w.reject(err);
    this.#connectWaiters = [];
  }

  #scheduleReconnect(code) {
    this.#attempt++;
    const { capMs, delayMs } = backoff(this.#attempt, this.options.baseDelayMs, this.options.maxDelayMs, this.#random);
    this.#state = 'reconnecting';
    this.#emit('reconnecting', { attempt: this.#attempt, delayMs, capMs, code });
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (this.#wanted) this.#open();
    }, delayMs);
  }

  #write(text) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN || !this.#welcomed) return false;
    ws.send(text);
    return true;
  }

  #nextId() {
    this.#seq += 1;
    return `${this.#idPrefix}-${this.#seq}`;
  }

  // ---- frames from the gateway -----------------------------------------------------------

  #onFrame(f) {
    switch (f?.type) {
      case 'welcome':
        return this.#onWelcome(f);
      case 'message':
        return this.#onMessage(f);
      case 'ack': {
        const q = this.#publishes.get(f.id);
        if (q) {
          this.#publishes.delete(f.id);
          q.resolve({ channel: q.channel, offset: f.offset ?? null });
          return;
        }
        const s = this.#sends.get(f.id);
        if (!s) return; // not ours, or already resolved
        this.#sends.delete(f.id);
        s.resolve(f.entry);
        return;
      }
      case 'subscribed':
        return this.#onSubscribed(f);
      case 'unsubscribed':
        return this.#onUnsubscribed(f);
      case 'presence': {
        const q = this.#presence.get(f.id);
        if (!q) return; // not ours, or already answered
        this.#presence.delete(f.id);
        const { type, id, ...page } = f;
        q.resolve(page);
        return;
      }
      case 'join':
      case 'leave':
        return this.#emit(f.type, { channel: f.channel, member: f.member });
      case 'refresh_required':
        return this.#onRefreshRequired(f);
      case 'missed':
        // Live messages without history (to this connection, its user, everyone, or channels
        // without history) may have been lost on the gateway's side; history channels catch up
        // by themselves (or say recovered: false).
        return this.#emit('missed');
      case 'refreshed': {
        const r = this.#refreshes.get(f.id);
        if (!r) return;
        this.#refreshes.delete(f.id);
        r.resolve(f.expires_at ?? null);
        return;
      }
      case 'error':
        return this.#onError(f);
      default:
        return; // a newer gateway's frame: ignore
    }
  }

  /**
   * Sends a fresh token for the open connection (same user): the gateway then keeps it open
   * until the new token's `exp`. Resolves with that `exp` (unix seconds, or null); rejects with
   * the gateway's code (`token_invalid`, `token_user_mismatch`), the connection unchanged.
   * Called by itself on `refresh_required` when `options.token` is a function.
   * @param {string} token
   * @returns {Promise<number | null>}
   */
  refresh(token) {
    const id = this.#nextId();
    return new Promise((resolve, reject) => {
      this.#refreshes.set(id, { resolve, reject });
      if (!this.#write(JSON.stringify({ type: 'refresh', token, id }))) {
        this.#refreshes.delete(id);
        reject(new WsBridgeError('closed', 'not connected: the next connection gets a fresh token anyway', id));
      }
    });
  }

  async #onRefreshRequired(f) {
    this.#emit('refresh_required', { expiresAt: f.expires_at });
    if (typeof this.#token !== 'function') return; // the app refreshes, or reconnects at expiry
    try {
      const expiresAt = await this.refresh(await this.#token());
      this.#emit('refreshed', { expiresAt });
    } catch (err) {
      this.#emit('error', err);
    }
  }

  #onWelcome(f) {
    clearTimeout(this.#connectTimer);
    const reconnect = this.#hadWelcome;
    this.#hadWelcome = true;
    this.#welcomed = true;
    this.#welcomeAt = Date.now();
    this.#state = 'open';
    this.connectionId = f.connection;
    this.user = f.user ?? null;
    this.stats.connects++;
    if (reconnect) this.stats.reconnects++;
    // Rejoin every channel (with `since` where an offset was seen), then resend every send
    // still waiting for its ack, in the order they were made, with the same ids.
    for (const [channel, ch] of this.#channels) this.#sendSubscribe(channel, ch);
    for (const s of this.#sends.values()) {
      if (s.transmissions > 0) this.stats.resends++;
      s.transmissions++;
      this.#write(s.frame);
    }
    // Presence questions not answered yet (asked offline, or lost with the last connection):
    // a question, so asking it again is harmless; a cursor is good on any replica.
    for (const q of this.#presence.values()) this.#write(q.frame);
    const info = { connection: this.connectionId, user: this.user, reconnect, url: this.url };
    this.#welcomeInfo = info;
    for (const w of this.#connectWaiters) w.resolve(info);
    this.#connectWaiters = [];
    this.#emit('welcome', info);
  }

  #sendSubscribe(channel, ch) {
    const id = this.#nextId();
    const frame = { type: 'subscribe', channel, id };
    if (ch.offset != null) frame.since = ch.offset;
    // `afterReconnect`: this channel was joined on an earlier connection (so it may have missed
    // something), as opposed to a first subscribe made while offline.
    this.#requests.set(id, { type: 'subscribe', channel, since: ch.offset != null, afterReconnect: ch.joined });
    ch.pendingId = id;
    this.#write(JSON.stringify(frame));
  }

  #onMessage(f) {
    const channel = f.channel ?? null;
    const offset = f.offset ?? null;
    if (channel !== null && offset !== null) {
      const ch = this.#channels.get(channel);
      if (ch) {
        if (ch.offset != null) {
          const cmp = compareOffsets(offset, ch.offset);
          if (cmp !== null && cmp <= 0) {
            this.stats.duplicatesDropped++;
            return;
          }
        }
        ch.offset = offset;
      }
    }
    this.#emit('message', channel, f.data, offset);
  }

  #onSubscribed(f) {
    const req = f.id != null ? this.#requests.get(f.id) : undefined;
    if (req) this.#requests.delete(f.id);
    let ch = this.#channels.get(f.channel);
    if (!ch) {
      if (req) return; // unsubscribed meanwhile; its unsubscribe follows
      ch = { offset: null, recovered: null, subscribed: false, joined: false, waiters: [] }; // a backend subscribed us
      this.#channels.set(f.channel, ch);
    }
    let recovered;
    if (typeof f.recovered === 'boolean') recovered = f.recovered;
    else if (req?.afterReconnect) recovered = false; // no offset to resume from: a gap cannot be ruled out
    else recovered = null;
    ch.recovered = recovered;
    ch.subscribed = true;
    ch.retries = 0;
    ch.joined = true;
    const info = {
      channel: f.channel,
      recovered,
      resumed: !!req?.since,
      reconnect: !!req?.afterReconnect,
      byServer: !req,
    };
    for (const w of ch.waiters) w.resolve(info);
    ch.waiters = [];
    this.#emit('subscribed', info);
  }

  #onUnsubscribed(f) {
    const req = f.id != null ? this.#requests.get(f.id) : undefined;
    if (req) {
      this.#requests.delete(f.id);
      req.resolve();
    } else {
      this.#channels.delete(f.channel); // a backend unsubscribed us
    }
    this.#emit('unsubscribed', { channel: f.channel, byServer: !req });
  }

  #onError(f) {
    const err = new WsBridgeError(f.code ?? 'error', f.message ?? '', f.id ?? null);
    const s = f.id != null ? this.#sends.get(f.id) : undefined;
    if (s && err.code === 'shutting_down') {
      // The replica is draining (a 1012 close follows) and did not store it: keep the send, it
      // is resent with the same id on the next connection, like any send without an ack.
      return;
    }
    if (s) {
      this.#sends.delete(f.id);
      s.reject(err);
      return;
    }
    const pub = f.id != null ? this.#publishes.get(f.id) : undefined;
    if (pub) {
      this.#publishes.delete(f.id);
      err.channel = pub.channel;
      pub.reject(err);
      return;
    }
    const r = f.id != null ? this.#refreshes.get(f.id) : undefined;
    if (r) {
      this.#refreshes.delete(f.id);
      r.reject(err);
      return;
    }
    const q = f.id != null ? this.#presence.get(f.id) : undefined;
    if (q) {
      this.#presence.delete(f.id);
      err.channel = q.channel;
      q.reject(err);
      return;
    }
    const req = f.id != null ? this.#requests.get(f.id) : undefined;
    if (req) {
      this.#requests.delete(f.id);
      err.channel = req.channel;
      if (req.type === 'subscribe') {
        const ch = this.#channels.get(req.channel);
        if (ch && ch.pendingId === f.id && err.code === 'redis_unavailable') {
          // The gateway could not read the channel's history yet (Redis did not answer): the
          // resume is neither made nor refused. Keep the channel and its offset, and ask again
          // on this connection after a growing pause (a reconnect asks anyway).
          const ws = this.#ws;
          ch.retries = (ch.retries ?? 0) + 1;
          const delay = Math.min(250 * 2 ** (ch.retries - 1), 4000);
          setTimeout(() => {
            const current = this.#channels.get(req.channel);
            if (current === ch && this.#ws === ws && this.#welcomed && !ch.subscribed) {
              this.#sendSubscribe(req.channel, ch);
            }
          }, delay);
        } else if (ch && ch.pendingId === f.id) {
          this.#channels.delete(req.channel);
          for (const w of ch.waiters) w.reject(err);
        }
      } else {
        req.resolve();
      }
    }
    this.#emit('error', err);
  }

  // ---- what the app calls ----------------------------------------------------------------

  /**
   * Joins `channel` (now, or on the next connection) and keeps it joined across reconnects.
   * `since`: an offset to resume from (e.g. saved before a page reload). Resolves with
   * `{channel, recovered, ...}` on `subscribed`; rejects on an error frame (e.g.
   * `channel_not_allowed`), which also drops the channel.
   */
  subscribe(channel, { since } = {}) {
    let ch = this.#channels.get(channel);
    if (ch && ch.subscribed) {
      return Promise.resolve({ channel, recovered: ch.recovered, resumed: false, reconnect: false, byServer: false });
    }
    const fresh = !ch;
    if (fresh) {
      ch = { offset: since ?? null, recovered: null, subscribed: false, joined: false, waiters: [] };
      this.#channels.set(channel, ch);
    }
    // While offline (or closed) the subscribe is made on the next connection.
    const p = handled(new Promise((resolve, reject) => ch.waiters.push({ resolve, reject })));
    if (fresh && this.#welcomed) this.#sendSubscribe(channel, ch);
    return p;
  }

  /** Leaves `channel` and forgets its offset. Resolves on `unsubscribed` (or at once offline). */
  unsubscribe(channel) {
    const ch = this.#channels.get(channel);
    if (!ch) return Promise.resolve();
    this.#channels.delete(channel);
    const err = new WsBridgeError('unsubscribed', `unsubscribed from ${channel}`);
    for (const w of ch.waiters) w.reject(err);
    if (!this.#welcomed) return Promise.resolve();
    const id = this.#nextId();
    return new Promise((resolve) => {
      this.#requests.set(id, { type: 'unsubscribe', channel, resolve });
      this.#write(JSON.stringify({ type: 'unsubscribe', channel, id }));
    });
  }

  /**
   * Sends `data` to the backend stream `stream`. Resolves with the stream entry id on `ack`;
   * rejects with a WsBridgeError on an `error` frame (`err.retryable` tells whether sending
   * again with `{id: err.id}` may succeed), with `queue_full` when maxPendingSends sends are
   * already waiting, or with `closed` when the client stops. Until the ack it is resent, with
   * the same id, after every reconnect.
   */
  send(stream, data, { id } = {}) {
    if (this.#state === 'closed') {
      return Promise.reject(new WsBridgeError('closed', 'the client is closed'));
    }
    if (this.#sends.size >= this.options.maxPendingSends) {
      return Promise.reject(
        new WsBridgeError('queue_full', `${this.#sends.size} sends are already waiting for an ack (maxPendingSends)`)
      );
    }
    id = id ?? this.#nextId();
    if (this.#sends.has(id)) {
      return Promise.reject(new WsBridgeError('duplicate_id', `a send with id ${id} is already waiting`, id));
    }
    const frame = JSON.stringify({ type: 'send', stream, data, id });
    return new Promise((resolve, reject) => {
      const s = { frame, resolve, reject, transmissions: 0 };
      this.#sends.set(id, s);
      if (this.#write(frame)) s.transmissions = 1;
    });
  }

  /**
   * Publishes `data` to `channel`'s subscribers (this client included, when it is one), where
   * the gateway's config lets clients publish to it and the token's `publish` claim covers it;
   * the client need not be subscribed. Resolves with `{channel, offset}` on `ack` (`offset`
   * null on a channel without history); rejects with a WsBridgeError on an error frame
   * (`publish_not_allowed`, `publish_forbidden`, `rate_limited`, `redis_unavailable`...;
   * `err.retryable` tells whether publishing again may succeed). Sent now, never queued: offline
   * it rejects at once with `not_connected`, and a publish whose connection closes before the
   * answer rejects with `disconnected` (it may have been published). It is not resent after a
   * reconnect: what is live (a cursor) is stale by then; publish again if it still matters.
   * @param {string} channel
   * @param {*} data any JSON value
   * @param {{id?: string}} [options] the frame id (a fresh one by default)
   * @returns {Promise<{channel: string, offset: string | null}>}
   */
  publish(channel, data, { id } = {}) {
    if (this.#state === 'closed') {
      return Promise.reject(new WsBridgeError('closed', 'the client is closed'));
    }
    id = id ?? this.#nextId();
    if (this.#publishes.has(id)) {
      return Promise.reject(new WsBridgeError('duplicate_id', `a publish with id ${id} is already waiting`, id));
    }
    return new Promise((resolve, reject) => {
      this.#publishes.set(id, { resolve, reject, channel });
      if (!this.#write(JSON.stringify({ type: 'publish', channel, data: data ?? null, id }))) {
        this.#publishes.delete(id);
        const err = new WsBridgeError('not_connected', 'not connected: a publish is sent now or not at all', id);
        err.channel = channel;
        reject(err);
      }
    });
  }

  /**
   * Asks who is in `channel` (a channel with `presence = true`): one page, across every
   * replica. `view`: `connections` (default; members are `{connection, user, info}`) or `users`
   * (`{user, connections}`; an anonymous connection is `{user: null, connection, connections: 1}`).
   * `cursor`: the previous page's, for the next page; `limit`: the most members wanted (the
   * gateway may return more: Redis reads a small channel whole). Resolves with
   * `{channel, connections, users, members, cursor}` (`cursor` null on the last page); rejects
   * with a WsBridgeError on an error frame (`presence_disabled`, `channel_not_allowed`,
   * `bad_request`, `redis_unavailable` — retryable) or with `closed` when the client stops.
   * Asked now, or on the next connection when offline; asked again on the next connection when
   * the answer was lost with a connection. The client need not be in the channel.
   */
  presence(channel, { view, cursor, limit } = {}) {
    if (this.#state === 'closed') {
      return Promise.reject(new WsBridgeError('closed', 'the client is closed'));
    }
    const id = this.#nextId();
    const frame = { type: 'presence', channel, id };
    if (view != null) frame.view = view;
    if (cursor != null) frame.cursor = cursor;
    if (limit != null) frame.limit = limit;
    const text = JSON.stringify(frame);
    return new Promise((resolve, reject) => {
      this.#presence.set(id, { frame: text, channel, resolve, reject });
      this.#write(text);
    });
  }

  /**
   * Keeps a live list of who is in `channel`, one entry per user (an anonymous connection is
   * its own user), for a channel with `presence` and `join_leave`. After every `subscribed` of
   * the channel — the first, and each one after a reconnect, since the join and leave events
   * sent while the client was away are not replayed — it reads the whole list, page by page,
   * then applies on top the join and leave events that arrived meanwhile (so a member who left
   * while the pages were read does not stay). Between reads, join and leave events keep it
   * current. Subscribe to the channel as well; this only watches.
   *
   * `onChange(members, change)` is called after every change, with the list (an array of
   * `{connection, user, info}`: for a user with several connections, one of them) and
   * `{type: 'join' | 'leave', member}` or `{type: 'reset'}` after a full read. A read that
   * fails with a retryable error is tried again after a second; other errors go to the
   * `error` event. Returns `{members, refresh(), stop()}`. It reads every page: meant for
   * channels whose members a page can show, not for one with 100,000.
   */
  watchPresence(channel, onChange, { limit } = {}) {
    const key = (m) => (m.user != null ? `u:${m.user}` : `c:${m.connection}`);
    let list = new Map(); // user key -> member
    let reading = 0; // the current read; a newer one makes older ones stop
    let missed = null; // join and leave events seen during the current read
    let stopped = false;
    let retry = null;
    const notify = (change) => {
      try {
        onChange?.([...list.values()], change);
      } catch (err) {
        reportListenerError(err);
      }
    };
    const apply = (map, type, member) => {
      if (type === 'join') map.set(key(member), member);
      else map.delete(key(member));
    };
    const onEvent = (type) => ({ channel: ch, member }) => {
      if (ch !== channel || stopped) return;
      missed?.push([type, member]);
      apply(list, type, member);
      notify({ type, member });
    };
    const onJoin = onEvent('join');
    const onLeave = onEvent('leave');
    const read = async () => {
      clearTimeout(retry);
      const mine = ++reading;
      missed = [];
      const fresh = new Map();
      let cursor = null;
      try {
        do {
          const page = await this.presence(channel, { cursor, limit });
          if (mine !== reading || stopped) return;
          for (const m of page.members) if (!fresh.has(key(m))) fresh.set(key(m), m);
          cursor = page.cursor;
        } while (cursor != null);
      } catch (err) {
        if (mine !== reading || stopped || err.code === 'closed') return;
        missed = null;
        if (err.retryable) retry = setTimeout(read, 1000);
        else this.#emit('error', err);
        return;
      }
      for (const [type, member] of missed) apply(fresh, type, member);
      missed = null;
      list = fresh;
      notify({ type: 'reset' });
    };
    const onSubscribed = ({ channel: ch }) => {
      if (ch === channel && !stopped) read();
    };
    this.on('join', onJoin).on('leave', onLeave).on('subscribed', onSubscribed);
    if (this.#channels.get(channel)?.subscribed) read();
    return {
      /** The members now, one per user. */
      get members() {
        return [...list.values()];
      },
      /** Reads the whole list again; resolves when it is read (or given up). */
      refresh: read,
      /** Stops watching (no more reads or calls to onChange). */
      stop: () => {
        stopped = true;
        clearTimeout(retry);
        this.off('join', onJoin).off('leave', onLeave).off('subscribed', onSubscribed);
      },
    };
  }
}

export default WsBridgeClient;
