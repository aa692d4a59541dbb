// Test harness for the JavaScript client: a real redis-server and real gateway replicas (the
// `wsbridge` binary built by `cargo build`) as child processes, plus small helpers to await
// events with a deadline. Every child is killed at the end, also on failure.

import { spawn, execFile } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.WSBRIDGE_BIN || path.join(ROOT, 'target', 'debug', 'wsbridge');
/** How long any single awaited event may take before the test fails. */
export const PATIENCE = 10_000;

const children = new Set();
const dirs = new Set();

/** Kills every child process this harness started (redis-server, gateways). */
export function killAll() {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {}
  }
  children.clear();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  dirs.clear();
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });
}

function track(child) {
  children.add(child);
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  child.exited.then(() => children.delete(child));
  return child;
}

function scratchDir() {
  const dir = mkdtempSync(path.join(tmpdir(), 'wsbridge-js-'));
  dirs.add(dir);
  return dir;
}

// Ports for the servers tests start, below the kernel's ephemeral range (32768 and up on
// Linux) so that no outgoing connection takes one before its server binds it (as in the Rust
// harness's free_port); a sequence from a point given by the process id, so no port twice.
let nextPort = (process.pid * 7919) % 22_000;

function portIsFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** A loopback port nobody listens on, from 10000 to 31999. */
export async function freePort() {
  for (;;) {
    const port = 10_000 + (nextPort++ % 22_000);
    if (await portIsFree(port)) return port;
  }
}

/** Resolves `promise`, or rejects with "timed out: what" after `ms`. */
export function deadline(promise, what, ms = PATIENCE) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `check` (sync or async) until it returns a truthy value; for state outside the client. */
export async function eventually(check, what, ms = PATIENCE) {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function run(cmd, args) {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: PATIENCE }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${err.message} ${stderr}`));
      else resolve(stdout);
    });
  });
}

/**
 * A real redis-server on a free port: without persistence, or with `{ aof: true }` an append-only
 * file fsynced on every write, so that `restart()` after `kill()` comes back with its data.
 */
export async function startRedis({ aof = false } = {}) {
  const port = await freePort();
  const dir = scratchDir();
  const persistence = aof ? ['--appendonly', 'yes', '--appendfsync', 'always'] : ['--appendonly', 'no'];
  let child;
  const cli = (...args) => run('redis-cli', ['-p', String(port), ...args]);
  const spawnServer = async () => {
    child = track(
      spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', ...persistence, '--dir', dir], {
        stdio: 'ignore',
      })
    );
    await eventually(async () => (await cli('PING').catch(() => '')).trim() === 'PONG', `redis-server on ${port}`);
  };
  await spawnServer();
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    cli,
    /** A command's reply as JSON (redis-cli --json). */
    json: async (...args) => JSON.parse(await cli('--json', ...args)),
    /** XRANGE key - + as [{id, fields: {k: v}}]. */
    xrange: async (key) => {
      const reply = JSON.parse(await cli('--json', 'XRANGE', key, '-', '+'));
      return reply.map(([id, flat]) => {
        const fields = {};
        for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
        return { id, fields };
      });
    },
    /** SIGKILL; resolves once the process is gone. */
    kill: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGKILL');
      }),
    /** Starts it again on the same port (with its data when started with `aof`). */
    restart: spawnServer,
  };
}

let prefixes = 0;
/** A Redis key prefix unique to one test. */
export function uniquePrefix(name) {
  return `js${process.pid}-${++prefixes}-${name}`;
}

/** How fast the replicas of `presence: true` tests count a silent replica as dead. */
export const PRESENCE = { replicaTtlSeconds: 2, heartbeatIntervalMs: 300 };

/**
 * The config file the replicas of these tests use. With `presence`, `room:*` channels keep
 * presence and send join and leave events, and a replica counts as dead PRESENCE.replicaTtlSeconds
 * after its last heartbeat; `other:*` channels keep none. With `clientPublish`, clients may publish
 * to `room:*` channels.
 */
export function gatewayConfig({ redisUrl, prefix, listen = '127.0.0.1:0', historySize = 1000, jwtSecret = '', presence = false, clientPublish = false }) {
  const presenceConfig = presence
    ? `presence = true
join_leave = true

[[channels]]
pattern = "other:*"

[presence]
replica_ttl_seconds = ${PRESENCE.replicaTtlSeconds}
heartbeat_interval_ms = ${PRESENCE.heartbeatIntervalMs}
`
    : '';
  return `
[server]
listen = "${listen}"
api_listen = "127.0.0.1:0"
shutdown_drain_seconds = 5

[redis]
url = "${redisUrl}"
prefix = "${prefix}"
connect_timeout_ms = 500
command_timeout_ms = 1000
health_interval_ms = 200
unhealthy_after_ms = 1000
reconnect_max_backoff_ms = 500

[inbound]
streams = ["chat"]
groups = ["backend"]

[auth]
jwt_secret = "${jwtSecret}"

[[channels]]
pattern = "room:*"
history_size = ${historySize}
history_ttl_seconds = 600
client_publish = ${clientPublish}
${presenceConfig}`;
}

/**
 * Starts a real gateway replica (`target/debug/wsbridge --config <file>`) and waits until its
 * /readyz answers 200. Options as gatewayConfig, plus `env` (WSBRIDGE__SECTION__KEY overrides).
 */
export async function startGateway(options) {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run \`cargo build\` first (tests/run.sh does)`);
  const dir = scratchDir();
  const configPath = path.join(dir, 'wsbridge.toml');
  writeFileSync(configPath, gatewayConfig(options));
  const child = track(
    spawn(BIN, ['--config', configPath], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1', ...(options.env ?? {}) },
    })
  );
  const logs = [];
  const listening = new Promise((resolve, reject) => {
    createInterface({ input: child.stderr }).on('line', (raw) => {
      const line = raw.replace(/\x1b\[[0-9;]*m/g, '');
      logs.push(line);
      const m = /listening public=(\S+) api=(\S+)/.exec(line);
      if (m) resolve({ publicAddr: m[1], apiAddr: m[2] });
    });
    child.exited.then(({ code, signal }) =>
      reject(new Error(`gateway exited (${code ?? signal}) before listening:\n${logs.join('\n')}`))
    );
  });
  const { publicAddr, apiAddr } = await deadline(listening, 'the gateway to listen').catch((err) => {
    child.kill('SIGKILL');
    throw new Error(`${err.message}\n${logs.join('\n')}`);
  });
  const gw = {
    child,
    pid: child.pid,
    logs,
    wsUrl: `ws://${publicAddr}/ws`,
    apiUrl: `http://${apiAddr}`,
    /** POST to the backend API: {status, body}. */
    async post(pathname, body) {
      const res = await fetch(gw.apiUrl + pathname, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const text = await res.text();
      let parsed;
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = text;
      }
      return { status: res.status, body: parsed };
    },
    /** POST /send, which must answer 202; returns the answer ({accepted, offsets}). */
    async send(body) {
      const { status, body: answer } = await gw.post('/send', body);
      if (status !== 202) throw new Error(`POST /send answered ${status}: ${JSON.stringify(answer)}`);
      return answer;
    },
    signal(sig) {
      child.kill(sig);
    },
    /** SIGSTOP, and wait until every thread of the process is stopped: the replica hangs. */
    async freeze() {
      child.kill('SIGSTOP');
      await eventually(() => {
        const tasks = readdirSync(`/proc/${child.pid}/task`);
        return tasks.every((t) => /^\d+ \(.*\) [Tt] /.test(readFileSync(`/proc/${child.pid}/task/${t}/stat`, 'utf8')));
      }, `gateway ${child.pid} to stop`);
    },
    /** Sends `sig` (default SIGKILL) and waits for the process to end. */
    async kill(sig = 'SIGKILL') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(sig);
      await deadline(child.exited, `gateway ${child.pid} to exit`);
    },
  };
  await eventually(async () => {
    try {
      return (await fetch(gw.apiUrl + '/readyz')).status === 200;
    } catch {
      return false;
    }
  }, `gateway ${publicAddr} to be ready`);
  return gw;
}

/** An HS256 JWT. */
export function token(secret, claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

/**
 * Records a client's events, and lets a test await a condition over them: `until` re-checks
 * its predicate after every event (no polling, no sleeps) and fails after a deadline.
 */
export function record(client) {
  const rec = {
    events: [], // [name, payload] in arrival order
    messages: [],
    subscribed: [],
    closes: [],
    reconnecting: [],
    welcomes: [],
    errors: [],
    presence: [], // join and leave events: {type, channel, member}
    waiters: new Set(),
    until(predicate, what, ms = PATIENCE) {
      if (predicate()) return Promise.resolve();
      let waiter;
      const p = new Promise((resolve) => {
        waiter = () => {
          if (predicate()) {
            rec.waiters.delete(waiter);
            resolve();
          }
        };
        rec.waiters.add(waiter);
      });
      return deadline(p, what, ms).finally(() => rec.waiters.delete(waiter));
    },
  };
  const push = (name, list, payload) => {
    list?.push(payload);
    rec.events.push([name, payload]);
    for (const w of [...rec.waiters]) w();
  };
  client.on('message', (channel, data, offset) => push('message', rec.messages, { channel, data, offset }));
  client.on('subscribed', (info) => push('subscribed', rec.subscribed, info));
  client.on('close', (info) => push('close', rec.closes, info));
  client.on('reconnecting', (info) => push('reconnecting', rec.reconnecting, info));
  client.on('welcome', (info) => push('welcome', rec.welcomes, info));
  client.on('error', (err) => push('error', rec.errors, err));
  client.on('open', (info) => push('open', null, info));
  client.on('unsubscribed', (info) => push('unsubscribed', null, info));
  client.on('join', (info) => push('join', rec.presence, { type: 'join', ...info }));
  client.on('leave', (info) => push('leave', rec.presence, { type: 'leave', ...info }));
  return rec;
}

/**
 * Starts a child process (killed at the end like the others) whose stdout is read line by line:
 * `lines` holds them, `until(predicate, what)` waits for the lines to satisfy `predicate`
 * (re-checked on every new line), `write(line)` types a line on its stdin. stderr is kept in
 * `stderr` for failure messages.
 */
export function startProcess(cmd, args, { env = {}, cwd = ROOT } = {}) {
  const child = track(spawn(cmd, args, { cwd, stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...env } }));
  const proc = {
    child,
    lines: [],
    stderr: [],
    waiters: new Set(),
    write(line) {
      child.stdin.write(`${line}\n`);
    },
    until(predicate, what, ms = PATIENCE) {
      if (predicate(proc.lines)) return Promise.resolve();
      let waiter;
      const p = new Promise((resolve) => {
        waiter = () => {
          if (predicate(proc.lines)) resolve();
        };
        proc.waiters.add(waiter);
      });
      return deadline(p, what, ms)
        .catch((err) => {
          throw new Error(`${err.message}\n${cmd} stdout:\n${proc.lines.join('\n')}\nstderr:\n${proc.stderr.join('\n')}`);
        })
        .finally(() => proc.waiters.delete(waiter));
    },
  };
  createInterface({ input: child.stdout }).on('line', (line) => {
    proc.lines.push(line);
    for (const w of [...proc.waiters]) w();
  });
  createInterface({ input: child.stderr }).on('line', (line) => proc.stderr.push(line));
  return proc;
}
