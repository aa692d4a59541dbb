#!/usr/bin/env node
// A small chat and whiteboard backend for wsbridge, in Node (node-redis). It behaves as
// examples/backends/python/backend.py does, with the same flags, environment and log lines;
// examples/backends/README.md specifies the behaviour. In short:
//
// - It reads `<prefix>:in:<stream>` (`chat` by default) as one consumer of a consumer group
//   (XREADGROUP; a group it creates starts at 0) and answers through the gateway's backend API
//   (POST /send): a whiteboard stroke is stored in `<prefix>:whiteboard:<board>` and sent to
//   `board:<board>`, "load" sends the board so far to the asking connection; a chat message goes
//   to its channel; anything else is echoed to its sender.
// - An entry is acknowledged (XACK) only after its work and a 202. 5xx/408/429 or no answer:
//   left pending and retried after a backoff (0.5 s doubling to 30 s), and these retries are not
//   deliveries. 400/413/422: logged and acknowledged. 401/403/anything else: exit 1.
// - Every --reclaim-every-ms it takes over (XAUTOCLAIM) entries other consumers left pending
//   longer than --claim-idle-ms, and refreshes its own (XCLAIM), so nobody takes those over.
// - An entry still pending after --max-deliveries deliveries goes to the stream
//   `{<prefix>:in:<stream>}:dead` (XADD there and XACK in one Lua script; the braces put it in the
//   inbound stream's hash slot, so the move is atomic on a Redis Cluster too).
// - SIGTERM / SIGINT stop it between entries; a consumer that holds nothing leaves the group.
//
// Run it:
//
//     npm ci --prefix examples/backends/node
//     node examples/backends/node/backend.mjs                  # the chat
//     node examples/backends/node/backend.mjs --stream board   # the whiteboard
//
// Settings come from flags, or from the environment: REDIS_URL (redis://127.0.0.1:6379),
// WSBRIDGE_API (http://127.0.0.1:8081), WSBRIDGE_API_KEY (none), PREFIX (wsbridge), STREAM
// (chat), GROUP (backend), CONSUMER (<hostname>-<pid>). `--max N` exits after handling N entries.
// `--redis-cluster` (or REDIS_CLUSTER=1): REDIS_URL is a comma-separated list of Redis Cluster
// nodes to start from, and the backend uses node-redis's cluster client; every command names one
// key (or two in one slot), and the blocking XREADGROUP has a cluster client of its own.
// `--redis-sentinel MASTER` (or REDIS_SENTINEL=MASTER): REDIS_URL is a comma-separated list of
// Redis Sentinels; on every (re)connect the backend asks them for MASTER's address (SENTINEL
// GET-MASTER-ADDR-BY-NAME), checks with ROLE that it is a master, and connects there, so it follows
// a failover. (node-redis's own createSentinel client is not used: the blocking XREADGROUP would
// need a leased client of its pool, and it reconnects by itself, where this backend reconnects in
// run().) The Sentinels' credentials come from their URLs, the data nodes' from REDIS_USERNAME /
// REDIS_PASSWORD.
// Two test hooks: `--fail-on TEXT` makes the handler fail on every chat message whose text is
// TEXT, and `--work-ms MS` spends MS milliseconds on each entry before replying.
//
// One difference: JSON numbers become JavaScript numbers, so an echoed integer beyond 2^53 loses
// precision and 1.0 comes back as 1 (MessagePack integers keep every digit).

import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';

import { Decoder, ExtData, ExtensionCodec } from '@msgpack/msgpack';
import {
  ClientClosedError,
  ClientOfflineError,
  ConnectionTimeoutError,
  createClient,
  createCluster,
  defineScript,
  DisconnectsClientError,
  ErrorReply,
  RESP_TYPES,
  RootNodesUnavailableError,
  SocketClosedUnexpectedlyError,
  SocketTimeoutError,
  TimeoutError,
} from 'redis';

function log(message) {
  const time = new Date().toISOString().slice(11, 19); // HH:MM:SS, UTC
  process.stdout.write(`${time} backend: ${message}\n`);
}

/** Breaks out of a blocking XREADGROUP when a signal arrives. */
class Shutdown extends Error {}

/** The backend must stop; the message says why, `code` is the exit status. */
class Stop extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

/** The reply was not taken this time (gateway down, 5xx): leave the entry pending. */
class Transient extends Error {}

// ---------------------------------------------------------------------------------------------
// Settings

const USAGE = `usage: backend.mjs [-h] [--redis-url URL] [--redis-cluster] [--api URL]
                  [--api-key KEY] [--prefix P] [--stream S] [--group G]
                  [--consumer C] [--block-ms MS] [--claim-idle-ms MS]
                  [--reclaim-every-ms MS] [--max-deliveries N] [--max N]
                  [--fail-on TEXT] [--work-ms MS]`;

const HELP = `${USAGE}

wsbridge chat and whiteboard backend (Node)

options:
  -h, --help              show this help message and exit
  --redis-url URL         (REDIS_URL, default redis://127.0.0.1:6379; with
                          --redis-cluster, several, comma-separated)
  --redis-cluster         REDIS_URL is a Redis Cluster (REDIS_CLUSTER=1)
  --redis-sentinel MASTER REDIS_URL lists Redis Sentinels; use MASTER's primary
                          (REDIS_SENTINEL)
  --api URL               the gateway's backend API, any replica (WSBRIDGE_API,
                          default http://127.0.0.1:8081)
  --api-key KEY           (WSBRIDGE_API_KEY, default none)
  --prefix P              (PREFIX, default wsbridge)
  --stream S              (STREAM, default chat)
  --group G               (GROUP, default backend)
  --consumer C            (CONSUMER, default <hostname>-<pid>)
  --block-ms MS           XREADGROUP BLOCK (default 5000)
  --claim-idle-ms MS      take over entries other consumers left pending longer
                          than this (default 60000)
  --reclaim-every-ms MS   how often to look for such entries (default: half of
                          --claim-idle-ms)
  --max-deliveries N      dead-letter an entry still pending after N deliveries
                          (default 5)
  --max N                 exit after handling N entries
  --fail-on TEXT          test hook: the handler fails on chat messages with this text
  --work-ms MS            test hook: simulated work per entry, before replying`;

function usageError(message) {
  process.stderr.write(`${USAGE}\nbackend.mjs: error: ${message}\n`);
  process.exit(2);
}

function settings() {
  const env = process.env;
  const flags = [
    'redis-url', 'redis-sentinel', 'api', 'api-key', 'prefix', 'stream', 'group', 'consumer', 'block-ms',
    'claim-idle-ms', 'reclaim-every-ms', 'max-deliveries', 'max', 'fail-on', 'work-ms',
  ];
  const options = Object.fromEntries(flags.map((name) => [name, { type: 'string' }]));
  options['redis-cluster'] = { type: 'boolean' };
  options.help = { type: 'boolean', short: 'h' };
  let values;
  try {
    ({ values } = parseArgs({ options, strict: true, allowPositionals: false }));
  } catch (e) {
    usageError(e.message);
  }
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    process.exit(0);
  }
  const int = (name, fallback) => {
    const text = values[name];
    if (text === undefined) return fallback;
    if (!/^\s*[+-]?\d+\s*$/.test(text)) usageError(`argument --${name}: invalid int value: '${text}'`);
    return Number(text);
  };
  const cfg = {
    redisUrl: values['redis-url'] ?? env.REDIS_URL ?? 'redis://127.0.0.1:6379',
    cluster: values['redis-cluster'] ?? /^(1|true|yes)$/i.test(env.REDIS_CLUSTER ?? ''),
    sentinel: values['redis-sentinel'] ?? (env.REDIS_SENTINEL || null),
    api: (values.api ?? env.WSBRIDGE_API ?? 'http://127.0.0.1:8081').replace(/\/+$/, ''),
    apiKey: values['api-key'] ?? (env.WSBRIDGE_API_KEY || null),
    prefix: values.prefix ?? env.PREFIX ?? 'wsbridge',
    stream: values.stream ?? env.STREAM ?? 'chat',
    group: values.group ?? env.GROUP ?? 'backend',
    consumer: values.consumer ?? (env.CONSUMER || `${hostname()}-${process.pid}`),
    blockMs: int('block-ms', 5000),
    claimIdleMs: int('claim-idle-ms', 60000),
    reclaimEveryMs: int('reclaim-every-ms', null),
    maxDeliveries: int('max-deliveries', 5),
    max: int('max', null),
    failOn: values['fail-on'] ?? null,
    workMs: int('work-ms', 0),
  };
  if (cfg.maxDeliveries < 1) usageError('--max-deliveries must be at least 1');
  cfg.reclaimEveryMs ??= Math.floor(cfg.claimIdleMs / 2);
  cfg.reclaimEveryMs = Math.max(cfg.reclaimEveryMs, 100);
  cfg.key = `${cfg.prefix}:in:${cfg.stream}`;
  // The braces make the hash slot that of the inbound stream: the move there is one script.
  cfg.deadKey = `{${cfg.key}}:dead`;
  if (cfg.cluster && cfg.sentinel) usageError('--redis-cluster and --redis-sentinel exclude each other');
  if (cfg.sentinel) {
    cfg.sentinelUrls = cfg.redisUrl.split(',').map((url) => url.trim()).filter(Boolean);
    if (!cfg.sentinelUrls.length) usageError('--redis-sentinel needs at least one Sentinel URL');
    cfg.sentinelUrls.forEach(urlOptions); // every URL checked now
  }
  if (cfg.cluster) {
    cfg.clusterUrls = cfg.redisUrl.split(',').map((url) => url.trim()).filter(Boolean);
    if (!cfg.clusterUrls.length) usageError('--redis-cluster needs at least one node URL');
  }
  return cfg;
}

// ---------------------------------------------------------------------------------------------
// JSON and MessagePack

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

const base64 = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString('base64');

/** A JSON string with non-ASCII escaped, as Python's json.dumps writes it. */
const quote = (s) =>
  JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);

/** Compact JSON, as the Python backend writes it; a BigInt (a MessagePack integer beyond 2^53)
 * keeps all its digits. */
function toJson(v) {
  if (typeof v === 'bigint') return v.toString();
  if (typeof v === 'string') return quote(v);
  if (Array.isArray(v)) return `[${v.map(toJson).join(',')}]`;
  if (isObject(v)) return `{${Object.entries(v).map(([k, x]) => `${quote(k)}:${toJson(x)}`).join(',')}}`;
  return JSON.stringify(v);
}

/** Makes a decoded MessagePack value JSON-serialisable, as the Python backend does: binary
 * becomes base64 text, extension data {"ext": type, "data": base64}, NaN and infinities null. */
function toJsonValue(v) {
  if (v instanceof Uint8Array) return base64(v);
  if (v instanceof ExtData) return { ext: v.type, data: base64(v.data) };
  if (Array.isArray(v)) return v.map(toJsonValue);
  if (isObject(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toJsonValue(x)]));
  if (typeof v === 'bigint') return Number.isSafeInteger(Number(v)) ? Number(v) : v;
  if (typeof v === 'number' && !Number.isFinite(v)) return null; // no JSON form
  return v;
}

/** A map key as text: a string as it is, anything else its JSON text (as Python's json.dumps
 * writes it). An array or a map cannot be a key (Python cannot hash them): the entry's data is
 * then echoed as bytes. */
function keyText(key) {
  if (typeof key === 'string') return key;
  if (key instanceof ExtData) return `{"ext": ${key.type}, "data": ${quote(base64(key.data))}}`;
  if (key !== null && typeof key === 'object' && !(key instanceof Uint8Array)) {
    throw new TypeError('a map key cannot be an array or a map');
  }
  return toJson(toJsonValue(key));
}

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/** Refuses strings that are not UTF-8, as msgpack-python does (the data is then echoed as bytes). */
class StrictDecoder extends Decoder {
  decodeUtf8String(byteLength, headerOffset) {
    const start = this.pos + headerOffset;
    UTF8.decode(this.bytes.subarray(start, start + byteLength)); // throws when not UTF-8
    return super.decodeUtf8String(byteLength, headerOffset);
  }
}

// Every extension (the timestamp, -1, included) stays extension data; integers keep every digit.
const extensionCodec = new ExtensionCodec();
extensionCodec.register({ type: -1, decode: (data, type) => new ExtData(type, data) });
const msgpack = new StrictDecoder({ extensionCodec, useBigInt64: true, mapKeyConverter: keyText });

/** The entry's `data` as a JavaScript value. */
function decodeData(fields) {
  const raw = fields.get('data') ?? Buffer.from('null');
  if (fields.get('encoding')?.toString() === 'msgpack') {
    try {
      return toJsonValue(msgpack.decode(raw));
    } catch {
      // Not valid MessagePack, or non-UTF-8 strings: echo the bytes.
      return { msgpack_base64: raw.toString('base64') };
    }
  }
  try {
    return JSON.parse(UTF8.decode(raw));
  } catch {
    return raw.toString(); // the gateway only stores valid JSON; be lenient anyway
  }
}

// ---------------------------------------------------------------------------------------------
// The application: whiteboard, chat, echo

const BOARD_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const COLOR = /^#[0-9a-fA-F]{6}$/;
const MAX_POINTS = 500;
const SNAPSHOT_STROKES = 100;

const isNumber = (v, low, high) => typeof v === 'number' && low <= v && v <= high;

/** What is wrong with a whiteboard stroke, or null when it is well formed. */
function strokeError(stroke) {
  if (!isObject(stroke)) return 'stroke must be an object';
  const { id, color, width, points } = stroke;
  if (typeof id !== 'string' || [...id].length < 1 || [...id].length > 64) {
    return 'stroke.id must be a string of 1 to 64 characters';
  }
  if (typeof color !== 'string' || !COLOR.test(color)) return 'stroke.color must be "#rrggbb"';
  if (!isNumber(width, 1, 50)) return 'stroke.width must be a number from 1 to 50';
  if (!Array.isArray(points) || points.length < 1 || points.length > MAX_POINTS) {
    return `stroke.points must be a list of 1 to ${MAX_POINTS} points`;
  }
  for (const point of points) {
    if (!(Array.isArray(point) && point.length === 2 && point.every((c) => isNumber(c, 0, 1)))) {
      return 'every point must be [x, y] with numbers from 0 to 1';
    }
  }
  return null;
}

/** `seq`, a stream entry id "<ms>-<n>", as the pair of numbers strokes are ordered by. */
function seqKey(stroke) {
  const [ms, n] = (stroke.seq ?? '0-0').split('-');
  return [BigInt(ms), BigInt(n || 0)];
}

function bySeq(a, b) {
  const [x, y] = [seqKey(a), seqKey(b)];
  return x[0] !== y[0] ? (x[0] < y[0] ? -1 : 1) : x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
}

/** The whiteboard: stores a stroke and publishes it to the board's channel, or sends the board
 * so far to the asking connection. Returns the /send bodies and a log description. */
async function boardWork(r, cfg, entryId, who, connection, data) {
  const board = data.board;
  const hash = `${cfg.prefix}:whiteboard:${board}`;
  const name = typeof board === 'string' ? board : toJson(board);
  let error;
  if (typeof board !== 'string' || !BOARD_NAME.test(board)) {
    error = 'board must be 1 to 64 characters of A-Z a-z 0-9 _ -';
  } else if (Object.hasOwn(data, 'stroke')) {
    error = strokeError(data.stroke);
    if (error === null) {
      const stroke = { ...data.stroke, seq: entryId };
      // Idempotent: storing the same stroke again (a redelivery) changes nothing.
      await r.hSet(hash, stroke.id, toJson(stroke));
      const body = { to: { channel: `board:${board}` }, data: { type: 'stroke', board, stroke } };
      return { bodies: [body], what: `board ${name} stroke ${stroke.id} from ${who}` };
    }
  } else if (data.load === true) {
    const strokes = (await r.hVals(hash)).map((s) => JSON.parse(s)).sort(bySeq);
    const chunks = [];
    for (let i = 0; i < strokes.length; i += SNAPSHOT_STROKES) {
      chunks.push(strokes.slice(i, i + SNAPSHOT_STROKES));
    }
    if (chunks.length === 0) chunks.push([]);
    const bodies = chunks.map((chunk, i) => ({
      to: { connection },
      data: { type: 'snapshot', board, strokes: chunk, last: i === chunks.length - 1 },
    }));
    return { bodies, what: `board ${name} load for ${connection}` };
  } else {
    error = 'a board message needs "stroke" or "load": true';
  }
  const body = { to: { connection }, data: { type: 'error', board, error } };
  return { bodies: [body], what: `board ${name} error to ${connection}` };
}

/** Does the entry's work (the whiteboard stores strokes) and returns the /send bodies to post,
 * in order, and a short description for the log. */
async function workFor(r, cfg, entryId, fields) {
  const connection = fields.get('connection')?.toString() ?? '';
  const user = fields.get('user')?.toString() ?? '';
  const who = user || connection;
  const data = decodeData(fields);
  if (isObject(data) && Object.hasOwn(data, 'board')) {
    return boardWork(r, cfg, entryId, who, connection, data);
  }
  const channel = isObject(data) ? data.channel : undefined;
  if (typeof channel === 'string' && channel && Object.hasOwn(data, 'text')) {
    const body = { to: { channel }, data: { from: who, text: data.text } };
    return { bodies: [body], what: `chat ${channel} from ${who}` };
  }
  return { bodies: [{ to: { connection }, data: { echo: data } }], what: `echo to ${connection}` };
}

/** POST /send: returns 202, or the 4xx status of a reply the gateway will never take. Throws
 * Transient (retry later) or Stop (misconfigured: retrying cannot help). */
async function postSend(cfg, body) {
  const url = new URL(`${cfg.api}/send`);
  // A fresh connection per call, as the Python and Rust backends do: no stale keep-alive socket.
  const headers = { 'Content-Type': 'application/json', Connection: 'close' };
  if (cfg.apiKey) headers.Authorization = `Bearer ${cfg.apiKey}`;
  let status, detail;
  try {
    const response = await fetch(url, {
      method: 'POST',
      headers,
      body: toJson(body),
      redirect: 'manual',
      signal: AbortSignal.timeout(10_000),
    });
    status = response.status;
    detail = (await response.text()).trim();
  } catch (e) {
    throw new Transient(`gateway unreachable: ${e.cause?.message ?? e.message}`);
  }
  if (status >= 200 && status < 300) return status;
  if ([400, 413, 422].includes(status)) return status; // this reply is bad: drop it
  if (status === 408 || status === 429 || status >= 500) throw new Transient(`${status} ${detail}`);
  if (status === 401 || status === 403) {
    throw new Stop(`the gateway refused the API key (${status}): ${detail}`, 1);
  }
  throw new Stop(`unexpected answer from ${cfg.api}/send (${status}): ${detail}`, 1);
}

/** An exception as the log shows it, e.g. Error("boom"). */
const describe = (e) => `${e?.name ?? 'Error'}(${JSON.stringify(e?.message ?? String(e))})`;

// ---------------------------------------------------------------------------------------------
// Redis

/** No Sentinel named a primary that answers as one (a failover under way, or none reachable). */
class NoPrimaryError extends Error {}

const LINK_ERRORS = [
  NoPrimaryError, ClientClosedError, ClientOfflineError, ConnectionTimeoutError, DisconnectsClientError,
  RootNodesUnavailableError, SocketClosedUnexpectedlyError, SocketTimeoutError, TimeoutError,
];

// Replies that are not about the command: Redis loading, refusing our password or full, a
// cluster failing over, or a primary demoted under us (READONLY).
const LINK_REPLIES =
  /^(LOADING|NOAUTH|WRONGPASS|ERR max number of clients|CLUSTERDOWN|TRYAGAIN|MASTERDOWN|READONLY)/;

/** Whether a Redis command failed because of the link (retry after reconnecting), not because
 * Redis refused it. Like redis-py, a server still loading or refusing our password counts. */
function isLinkError(e) {
  if (e instanceof ErrorReply) return LINK_REPLIES.test(e.message);
  return LINK_ERRORS.some((type) => e instanceof type) || e?.syscall !== undefined;
}

// Stream replies with their values as bytes (`data` may be MessagePack).
const BUFFERS = { typeMapping: { [RESP_TYPES.BLOB_STRING]: Buffer } };

/** [[id, [name, value, ...] | null], ...] as [{id, fields}], fields a Map of name -> Buffer, or
 * null for an entry deleted from the stream while it was pending. */
function entriesOf(raw) {
  return raw.map(([id, flat]) => {
    if (!flat) return { id: id.toString(), fields: null };
    const fields = new Map();
    for (let i = 0; i < flat.length; i += 2) fields.set(flat[i].toString(), flat[i + 1]);
    return { id: id.toString(), fields };
  });
}

/** Moves an entry to the dead-letter stream: XADD there with the given fields, then XACK, in one
 * script so that the entry is never in both places or in neither. KEYS: the inbound stream, the
 * dead-letter stream (in one hash slot); ARGV: the group, the entry id, the fields and values.
 * node-redis sends EVALSHA, and EVAL when Redis does not know the script yet. */
const DEAD_LETTER = defineScript({
  NUMBER_OF_KEYS: 2,
  SCRIPT: `
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
    return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])`,
  parseCommand(parser, key, deadKey, group, id, fields) {
    parser.pushKeys([key, deadKey]);
    parser.push(group, id, ...fields);
  },
  transformReply: (reply) => reply,
});

/** The username, password and TLS setting of a Redis URL (throws on a bad one). */
function urlOptions(url) {
  const { username, password, socket } = createClient({ url }).options;
  return { username, password, socket: { tls: socket.tls } };
}

/** The primary of `cfg.sentinel` as the first answering Sentinel of `cfg.sentinelUrls` names it,
 * once ROLE on it says `master`: {host, port}. Throws NoPrimaryError when there is none. */
async function findPrimary(cfg) {
  const socket = { connectTimeout: 1000, reconnectStrategy: false };
  const quiet = (client) => client.on('error', () => {}); // errors surface as rejections
  const reasons = [];
  for (const url of cfg.sentinelUrls) {
    const sentinel = quiet(createClient({ url, socket }));
    let node = null;
    try {
      await sentinel.connect();
      const addr = await sentinel.sendCommand(['SENTINEL', 'GET-MASTER-ADDR-BY-NAME', cfg.sentinel]);
      if (!addr) throw new Error(`no master named ${cfg.sentinel}`);
      const [host, port] = addr.map(String);
      node = quiet(createClient({ ...dataAuth(), socket: { ...socket, host, port: Number(port) } }));
      await node.connect();
      const [role] = await node.sendCommand(['ROLE']);
      if (String(role) !== 'master') throw new Error(`${host}:${port} is a ${role}, not a master`);
      return { host, port: Number(port) };
    } catch (e) {
      reasons.push(`${url}: ${e.message}`);
    } finally {
      for (const client of [sentinel, node]) if (client?.isOpen) client.destroy();
    }
  }
  throw new NoPrimaryError(`no primary through the Sentinels (${reasons.join('; ')})`);
}

/** The data nodes' credentials under Sentinel (REDIS_USERNAME, REDIS_PASSWORD). */
function dataAuth() {
  const { REDIS_USERNAME: username, REDIS_PASSWORD: password } = process.env;
  return { ...(username && { username }), ...(password && { password }) };
}

/** Closes every connection of a cluster client now, then the client. Node by node first: the
 * client's own destroy() throws at the first node whose connection is already closed (a node
 * that went away), leaving the others open. */
function destroyCluster(cluster) {
  for (const node of [...cluster.masters, ...cluster.replicas]) {
    if (node.client?.isOpen) node.client.destroy();
  }
  try {
    cluster.destroy(); // marks it closed
  } catch (e) {
    if (!(e instanceof ClientClosedError)) throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// The consumer

class Backend {
  constructor(cfg) {
    this.cfg = cfg;
    this.r = this.client(); // parses REDIS_URL now: a bad one fails at start
    this.reader = this.r; // for the blocking XREADGROUP: on a cluster, a client of its own
    this.linkError = null; // the last error the Redis link reported
    this.handled = 0;
    this.stopping = false;
    this.interrupt = null; // set while a signal may interrupt what we wait for
    // Whether our own pending list may hold entries to (re)process: at start, after taking over
    // entries, and after a failed delivery.
    this.pending = true;
    this.retryAt = 0;
    this.backoff = 0.5; // seconds before retrying a failed delivery, doubled up to 30
    this.nextTick = 0; // when to refresh our entries and look for abandoned ones
    // The entry whose reply the gateway could not take for now: it is retried without being
    // delivered again, so that the retries do not count towards --max-deliveries.
    this.transientId = null;
    this.errors = new Map(); // entry id -> the last handler error, for the dead-letter `reason`
  }

  /** A client for REDIS_URL, or for the cluster it lists (not connected yet). */
  client() {
    const options = {
      socket: {
        connectTimeout: 5000,
        // No automatic reconnection: run() reconnects, as the Python backend does.
        reconnectStrategy: false,
        // A link silent for longer than the blocking read is dead: drop it (the PINGs keep a
        // healthy link from being silent while we are not reading).
        socketTimeout: this.cfg.blockMs + 10_000,
      },
      pingInterval: 5000,
    };
    const scripts = { deadLetter: DEAD_LETTER };
    if (this.cfg.sentinel) {
      // Before the first connect() found the primary: a client that is never connected.
      const { host, port } = this.primary ?? {};
      const socket = { ...options.socket, host, port };
      return this.watch(createClient({ ...options, ...dataAuth(), socket, scripts }));
    }
    if (!this.cfg.cluster) {
      return this.watch(createClient({ url: this.cfg.redisUrl, ...options, scripts }));
    }
    // The cluster connects to the nodes it finds (CLUSTER SLOTS) with `defaults`, not with the
    // URLs: they get the first URL's credentials and TLS setting.
    const [first] = this.cfg.clusterUrls.map(urlOptions); // every URL checked now
    const defaults = { ...options, ...first, socket: { ...options.socket, ...first.socket } };
    const rootNodes = this.cfg.clusterUrls.map((url) => ({ url }));
    return this.watch(createCluster({ rootNodes, defaults, scripts }));
  }

  /** Keeps the last error `client` (or any node of a cluster) reports, for the log. */
  watch(client) {
    const keep = (e) => {
      this.linkError = e;
    };
    client.on('error', keep);
    if (this.cfg.cluster) client.on('node-error', keep);
    return client;
  }

  /** Whether the connection can be kept (a cluster client has no readiness of its own: open). */
  alive() {
    return this.cfg.cluster ? this.r?.isOpen : this.r?.isReady;
  }

  async connect() {
    if (this.alive()) return;
    this.disconnect();
    this.linkError = null;
    if (this.cfg.sentinel) this.primary = await findPrimary(this.cfg);
    this.r = this.client();
    this.reader = this.r;
    await this.r.connect();
    if (this.cfg.cluster) {
      // node-redis talks to each node over one connection: a blocking read on the stream's node
      // would hold up every other command there. The reader connects only to the nodes it uses.
      this.reader = this.watch(this.r.duplicate({ minimizeConnections: true }));
      await this.reader.connect();
    }
  }

  disconnect() {
    for (const client of new Set([this.r, this.reader])) {
      if (this.cfg.cluster) {
        destroyCluster(client);
      } else if (client.isOpen) {
        client.destroy();
      }
    }
  }

  /** A command as an array, `key` the key it is about (on a cluster, the node it goes to: always
   * a master, never a replica that may lag behind). */
  send(client, key, args, options) {
    return this.cfg.cluster
      ? client.sendCommand(key, false, args, options)
      : client.sendCommand(args, options);
  }

  onSignal(name) {
    log(`${name}: stopping`);
    this.stopping = true;
    this.interrupt?.(); // only a read or a pause is interrupted; an entry in progress completes
  }

  /** Waits for `promise`, unless a signal comes first: then throws Shutdown. */
  interruptible(promise) {
    return new Promise((resolve, reject) => {
      promise.then(resolve, reject);
      this.interrupt = () => reject(new Shutdown());
      if (this.stopping) this.interrupt();
    }).finally(() => {
      this.interrupt = null;
    });
  }

  /** Waits `ms` milliseconds, or until a signal arrives. */
  pause(ms) {
    return this.interruptible(sleep(ms)).catch(() => {});
  }

  async ensureGroup() {
    const { key, group } = this.cfg;
    try {
      await this.r.xGroupCreate(key, group, '0', { MKSTREAM: true });
      log(`created group ${group} on ${key}`);
    } catch (e) {
      if (!(e instanceof ErrorReply && e.message.includes('BUSYGROUP'))) throw e;
    }
  }

  /** Takes over entries that other (dead) consumers left pending too long. JUSTID: taking an
   * entry over is not a delivery; reading it from our pending list is. */
  async reclaim() {
    const { key, group, consumer, claimIdleMs } = this.cfg;
    let start = '0-0';
    let total = 0;
    let deleted = 0;
    do {
      const reply = await this.r.xAutoClaimJustId(key, group, consumer, claimIdleMs, start, {
        COUNT: 100,
      });
      start = reply.nextId;
      total += reply.messages.length;
      deleted += reply.deletedMessages?.length ?? 0;
    } while (start !== '0-0');
    if (total) {
      log(`reclaimed ${total} entries idle for more than ${claimIdleMs} ms`);
      this.pending = true;
    }
    if (deleted) log(`${deleted} abandoned entries were deleted from the stream; dropped`);
  }

  /** Resets the idle time of the entries we hold, so no other consumer takes them over while we
   * work on them. The min-idle guard leaves alone an entry another consumer has just taken (its
   * idle time is near 0). */
  async keepFresh() {
    const { key, group, consumer } = this.cfg;
    const guard = Math.floor(this.cfg.reclaimEveryMs / 2);
    const mine = await this.r.xPendingRange(key, group, '-', '+', 100, { consumer, IDLE: guard });
    if (mine.length) {
      await this.r.xClaimJustId(key, group, consumer, guard, mine.map((p) => p.id));
    }
  }

  /** Every --reclaim-every-ms: keep our entries fresh, then take over abandoned ones. */
  async tick() {
    const now = performance.now();
    if (now < this.nextTick) return;
    this.nextTick = now + this.cfg.reclaimEveryMs;
    await this.keepFresh();
    await this.reclaim();
  }

  remaining() {
    return this.cfg.max === null ? null : this.cfg.max - this.handled;
  }

  /** XREADGROUP from `start` (">" new entries, "0" our pending ones), blocking `block` ms. */
  async read(start, block, count) {
    const { key, group, consumer } = this.cfg;
    count ??= Math.min(100, this.remaining() || 100);
    if (this.stopping) throw new Shutdown();
    const args = ['XREADGROUP', 'GROUP', group, consumer, 'COUNT', String(count)];
    if (block !== null) args.push('BLOCK', String(block));
    args.push('STREAMS', key, start);
    // Interrupted, the link is left mid-reply: run() disconnects it on the way out.
    const reply = await this.interruptible(this.send(this.reader, key, args, BUFFERS));
    return reply ? reply.flatMap(([, entries]) => entriesOf(entries)) : [];
  }

  /** The entry `id` of the stream, or null when it is gone. */
  async entry(id) {
    const found = await this.send(this.r, this.cfg.key, ['XRANGE', this.cfg.key, id, id], BUFFERS);
    return found.length ? entriesOf(found)[0] : null;
  }

  checkFailOn(bodies) {
    const { failOn } = this.cfg;
    if (failOn === null) return;
    for (const { data } of bodies) {
      if (isObject(data) && data.text === failOn) {
        throw new Error(`--fail-on '${failOn}': this handler cannot take it`);
      }
    }
  }

  /** Returns true when the entry is done (acknowledged), false to keep it pending. */
  async handle(id, fields) {
    const { key, group } = this.cfg;
    if (fields === null) {
      // Trimmed away while it was pending: nothing left to do.
      await this.r.xAck(key, group, id);
      log(`${id} was deleted from the stream; acknowledged`);
      this.done(id);
      return true;
    }
    let what = 'entry';
    let status = 202;
    try {
      const work = await workFor(this.r, this.cfg, id, fields);
      what = work.what;
      this.checkFailOn(work.bodies);
      if (this.cfg.workMs) await sleep(this.cfg.workMs);
      // All of them again after a failure: a reply sent twice is harmless (the page merges
      // strokes by id), a reply never sent is not.
      for (const body of work.bodies) {
        const answer = await postSend(this.cfg, body);
        if (answer !== 202) status = answer;
      }
    } catch (e) {
      const retry = `left pending, retry in ${this.backoff.toFixed(1)} s`;
      if (e instanceof Transient) {
        log(`${id} ${what}: not delivered (${e.message}); ${retry}`);
        this.transientId = id;
        return false;
      }
      if (e instanceof Stop || isLinkError(e)) throw e; // Redis failing is not the entry's fault
      // A bug, or an entry this handler cannot take: retry, then give up.
      log(`${id} ${what}: handler failed (${describe(e)}); ${retry}`);
      this.errors.set(id, `handler failed: ${describe(e)}`);
      if (this.transientId === id) this.transientId = null;
      return false;
    }
    await this.r.xAck(key, group, id);
    this.done(id);
    if (status === 202) {
      log(`${id} ${what}: sent, acknowledged`);
    } else {
      log(`${id} ${what}: the gateway refused the reply (${status}); dropped, acknowledged`);
    }
    return true;
  }

  done(id) {
    this.handled += 1;
    this.errors.delete(id);
    if (this.transientId === id) this.transientId = null;
  }

  /** Moves a pending entry to the dead-letter stream, atomically with its XACK (one script). */
  async deadLetter(id, deliveries) {
    const { key, group, deadKey } = this.cfg;
    const found = await this.entry(id);
    if (!found) {
      await this.r.xAck(key, group, id);
      log(`${id} was deleted from the stream; acknowledged`);
      this.done(id);
      return;
    }
    const reason =
      this.errors.get(id) ||
      `still pending after ${deliveries} deliveries (its consumers crashed or gave up)`;
    const fields = new Map(found.fields)
      .set('original_id', id)
      .set('deliveries', String(deliveries))
      .set('reason', reason);
    await this.r.deadLetter(key, deadKey, group, id, [...fields].flat());
    this.done(id);
    this.backoff = 0.5; // the entry that kept failing is gone
    log(`${id} moved to ${deadKey} after ${deliveries} deliveries: ${reason}`);
  }

  failed() {
    this.pending = true;
    this.retryAt = performance.now() + this.backoff * 1000;
    this.backoff = Math.min(this.backoff * 2, 30);
  }

  /** Handles new entries in order; stops at the first that must be retried. */
  async process(entries) {
    for (const { id, fields } of entries) {
      if (!(await this.handle(id, fields))) {
        this.failed();
        return;
      }
      this.backoff = 0.5;
      if (this.remaining() === 0) return;
      await this.tick();
    }
  }

  /** Handles our own pending entries, oldest first, one at a time so that each delivery Redis
   * counts is one attempt; stops at the first that must be retried. */
  async processPending() {
    const { key, group, consumer, maxDeliveries } = this.cfg;
    while (!this.stopping && this.remaining() !== 0) {
      await this.tick();
      const [head] = await this.r.xPendingRange(key, group, '-', '+', 1, { consumer });
      if (!head) {
        this.pending = false;
        return;
      }
      let { id } = head;
      let fields;
      if (id === this.transientId) {
        // The gateway failed: not another delivery.
        fields = (await this.entry(id))?.fields ?? null;
      } else if (head.deliveriesCounter >= maxDeliveries) {
        await this.deadLetter(id, head.deliveriesCounter);
        continue;
      } else {
        const entries = await this.read('0', null, 1);
        if (!entries.length) continue;
        ({ id, fields } = entries[0]);
      }
      if (!(await this.handle(id, fields))) {
        this.failed();
        return;
      }
      this.backoff = 0.5;
    }
  }

  async step() {
    await this.tick();
    if (this.pending) {
      const wait = this.retryAt - performance.now();
      if (wait > 0) {
        await this.pause(Math.min(wait, 500));
        return;
      }
      await this.processPending();
    } else {
      // Wake up for the next tick even when nothing arrives.
      const untilTick = Math.trunc(this.nextTick - performance.now());
      await this.process(await this.read('>', Math.max(1, Math.min(this.cfg.blockMs, untilTick))));
    }
  }

  /** Removes this consumer from the group when it holds nothing, so names do not pile up. */
  async cleanup() {
    const { key, group, consumer } = this.cfg;
    try {
      await this.connect();
      const held = await this.r.xPendingRange(key, group, '-', '+', 1, { consumer });
      if (!held.length) await this.r.xGroupDelConsumer(key, group, consumer);
    } catch (e) {
      log(`could not remove consumer ${consumer}: ${e.message}`);
    }
    this.disconnect();
  }

  async run() {
    const { key, group, consumer, api } = this.cfg;
    log(`reading ${key} as ${group}/${consumer}, replying via ${api}`);
    let ready = false;
    while (!this.stopping && this.remaining() !== 0) {
      try {
        if (!ready) {
          await this.connect();
          await this.ensureGroup();
          this.nextTick = 0; // take over abandoned entries now
          await this.tick();
          ready = true;
          this.pending = true; // (re)read our own pending list
          this.retryAt = 0;
        }
        await this.step();
      } catch (e) {
        if (e instanceof Shutdown) break;
        if (e instanceof ErrorReply && /NOGROUP|UNBLOCKED/.test(e.message)) {
          // Stream or group deleted under us (UNBLOCKED: while we were blocked reading it,
          // Redis 7+): create it again.
          log(`${e.message}; creating the group again`);
          ready = false;
          continue;
        }
        if (!isLinkError(e)) throw e;
        // What went wrong on the link says more than "The client is closed" or "All the root
        // nodes are unavailable".
        const vague = e instanceof ClientClosedError || e instanceof RootNodesUnavailableError;
        const cause = vague && this.linkError ? this.linkError : e;
        log(`Redis: ${cause.message}; retrying in 1 s`);
        ready = false;
        this.disconnect();
        await this.pause(1000);
      }
    }
    // A fresh connection: a read interrupted by a signal leaves the old one mid-reply.
    this.disconnect();
    await this.cleanup();
    log(`stopped after handling ${this.handled} entries`);
  }
}

async function main() {
  const backend = new Backend(settings());
  process.on('SIGTERM', () => backend.onSignal('SIGTERM'));
  process.on('SIGINT', () => backend.onSignal('SIGINT'));
  try {
    await backend.run();
  } catch (e) {
    if (!(e instanceof Stop)) throw e;
    log(e.message);
    process.exit(e.code);
  }
  process.exit(0);
}

await main();
