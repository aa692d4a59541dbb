// The whiteboard example as a person uses it: examples/whiteboard/run.sh starts the local
// cluster (Redis, three replicas, nginx serving the page and balancing /ws, the backend), and
// headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) opens the page
// through nginx in separate windows and draws with the mouse.
//
// Screenshots go to target/artifacts/whiteboard/ (or $ARTIFACTS). Run with tests/run.sh, or:
//   npm ci --prefix tests/browser && cargo build --bin wsbridge --example backend &&
//   node --test tests/browser/whiteboard.test.mjs
// WHITEBOARD_BACKEND=python|node|rust picks the backend (default rust); CHROMIUM the browser.

import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';

import { chromium } from 'playwright-core';

import { ROOT, freePort } from '../js/harness.mjs';

const PATIENCE = 20_000;
const ARTIFACTS = process.env.ARTIFACTS || path.join(ROOT, 'target', 'artifacts', 'whiteboard');
const VIEWPORT = { width: 900, height: 600 };

/** `count` distinct free loopback ports. */
async function freePorts(count) {
  const ports = new Set();
  while (ports.size < count) ports.add(await freePort());
  return [...ports];
}

/** examples/whiteboard/run.sh in its own process group (so that all it started can be stopped
 * together), on free ports; resolves once it printed "ready:". */
async function startCluster(settings = {}) {
  const [http, apiLb, redis, ...rest] = await freePorts(9);
  const state = mkdtempSync(path.join(tmpdir(), 'wsbridge-whiteboard-'));
  const env = {
    ...process.env,
    HTTP_PORT: String(http),
    API_LB_PORT: String(apiLb),
    REDIS_PORT: String(redis),
    WS_PORTS: rest.slice(0, 3).join(' '),
    API_PORTS: rest.slice(3, 6).join(' '),
    STATE: state,
    PREFIX: `wb-${process.pid}-${Date.now().toString(36)}`,
    PROFILE: 'debug',
    BACKEND: process.env.WHITEBOARD_BACKEND || 'rust',
    ...settings,
  };
  const child = spawn('bash', [path.join(ROOT, 'examples/whiteboard/run.sh')], {
    cwd: ROOT,
    env,
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output = [];
  const exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`run.sh not ready after 180 s:\n${output.join('\n')}`)), 180_000);
    exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`run.sh exited (${code}):\n${output.join('\n')}`));
    });
    for (const stream of [child.stdout, child.stderr]) {
      createInterface({ input: stream }).on('line', (line) => {
        output.push(line);
        if (line.startsWith('ready:')) {
          clearTimeout(timer);
          resolve();
        }
      });
    }
  });
  const cluster = {
    url: `http://127.0.0.1:${http}/`,
    state,
    prefix: env.PREFIX,
    redisPort: redis,
    output,
    pidOf: (replica) => Number(readFileSync(path.join(state, `${replica.replace('wsbridge', 'replica')}.pid`), 'utf8')),
    logs() {
      const read = (f) => {
        try {
          return readFileSync(path.join(state, f), 'utf8');
        } catch {
          return '';
        }
      };
      return ['backend.log', 'replica-1.log', 'replica-2.log', 'replica-3.log', 'nginx-error.log']
        .map((f) => `--- ${f}\n${read(f).split('\n').slice(-40).join('\n')}`)
        .join('\n');
    },
    async stop() {
      try {
        process.kill(-child.pid, 'SIGTERM');
      } catch {}
      const killer = setTimeout(() => {
        try {
          process.kill(-child.pid, 'SIGKILL');
        } catch {}
      }, 5000);
      await exited;
      clearTimeout(killer);
      rmSync(state, { recursive: true, force: true });
    },
  };
  process.on('exit', () => {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {}
  });
  await ready;
  return cluster;
}

/** Waits for `fn` (run in the page) to return a truthy value, for at most `ms`. */
function until(page, fn, arg, what, ms = PATIENCE) {
  return page.waitForFunction(fn, arg, { timeout: Math.max(1, ms), polling: 50 }).catch((err) => {
    throw new Error(`${page.label}: timed out waiting for ${what}: ${err.message}`);
  });
}

/** Opens the board in a new window; in `browser`'s new context (a browser profile of its own),
 * or in an existing context (sharing its localStorage). */
/** Waits until `page` holds every stroke of `ids` as stored by the backend. */
function untilStored(page, ids, what = `strokes ${ids.join(', ')}`) {
  return until(page, (ids) => ids.every((id) => window.whiteboard.ids({ confirmed: true }).includes(id)), ids, what);
}

/** Waits until the page's list of windows ("on the board:") shows exactly `connections`. */
function untilListed(page, connections, what, ms = PATIENCE) {
  return until(
    page,
    (expected) => {
      const shown = [...document.querySelectorAll('#who li')].map((li) => li.dataset.connection);
      return shown.sort().join(' ') === [...expected].sort().join(' ');
    },
    connections,
    `${what} (the list should show ${connections.join(', ')})`,
    ms
  );
}

const connectionOf = (page) => page.evaluate(() => window.whiteboard.client.connectionId);

/** How long after a replica's last heartbeat the others remove its windows at most:
 * replica_ttl_seconds plus one heartbeat_interval_ms, read from the whiteboard's config. */
function presenceBoundMs() {
  const toml = readFileSync(path.join(ROOT, 'examples/whiteboard/wsbridge.toml'), 'utf8');
  const ttl = Number(/^replica_ttl_seconds\s*=\s*(\d+)/m.exec(toml)[1]);
  const heartbeat = Number(/^heartbeat_interval_ms\s*=\s*(\d+)/m.exec(toml)[1]);
  return ttl * 1000 + heartbeat;
}

async function open(where, cluster, board, label) {
  const context = where.newContext ? await where.newContext({ viewport: VIEWPORT }) : where;
  const page = await context.newPage();
  page.label = label;
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e.message));
  await page.goto(`${cluster.url}?board=${board}`);
  await until(page, () => window.whiteboard?.state === 'open' && window.whiteboard.loaded, null, 'the board to load');
  return page;
}

/** Draws a stroke with the mouse from (x0, y0) to (x1, y1) in canvas pixels; returns its id. */
async function draw(page, [x0, y0], [x1, y1]) {
  const box = await page.locator('canvas').boundingBox();
  const before = await page.evaluate(() => window.whiteboard.ids());
  await page.mouse.move(box.x + x0, box.y + y0);
  await page.mouse.down();
  for (let i = 1; i <= 20; i++) {
    await page.mouse.move(box.x + x0 + ((x1 - x0) * i) / 20, box.y + y0 + ((y1 - y0) * i) / 20);
  }
  await page.mouse.up();
  const [ids, pageId] = await page.evaluate(() => [window.whiteboard.ids(), window.whiteboard.pageId]);
  // Only this page's strokes (ids `<page id>-<n>`): another page's stroke may arrive meanwhile.
  const added = ids.filter((id) => !before.includes(id) && id.startsWith(`${pageId}-`));
  assert.equal(added.length, 1, `${page.label}: one new stroke`);
  return added[0];
}

/** The canvas pixel at (x, y), in canvas CSS pixels: [r, g, b, alpha]. */
function pixelAt(page, [x, y]) {
  return page.evaluate(([x, y]) => {
    const canvas = document.querySelector('canvas');
    const scale = canvas.width / canvas.clientWidth;
    return [...canvas.getContext('2d').getImageData(Math.round(x * scale), Math.round(y * scale), 1, 1).data];
  }, [x, y]);
}

/** Whether the canvas shows ink at (x, y). */
async function inkAt(page, point) {
  return (await pixelAt(page, point))[3] > 0;
}

const confirmedIds = (page) => page.evaluate(() => window.whiteboard.ids({ confirmed: true }));
const pixels = (page) => page.evaluate(() => document.querySelector('canvas').toDataURL());

/**
 * Waits until two windows' canvases hold the same pixels, then asserts it: a window paints the
 * strokes it holds a frame or so after it got them, so the picture is polled like any event.
 */
async function samePicture(p, q, what) {
  const until = Date.now() + PATIENCE;
  let [x, y] = [await pixels(p), await pixels(q)];
  while (x !== y && Date.now() < until) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    [x, y] = [await pixels(p), await pixels(q)];
  }
  assert.equal(x, y, what);
}

async function shot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    // No sandbox as root; and none of Chromium's own network traffic (updates, sync, QUIC),
    // which this machine's closed network refuses.
    args: [
      ...(process.getuid?.() === 0 ? ['--no-sandbox'] : []),
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** A test on a local cluster of its own (run.sh with `settings`) and a browser, both stopped
 * at the end; a failure carries the end of the cluster's logs. */
function clusterTest(name, settings, body) {
  test(name, async (t) => {
    const cluster = await startCluster(settings);
    const browser = await launch();
    t.after(async () => {
      await browser.close();
      await cluster.stop();
    });
    try {
      await body({ t, cluster, browser });
    } catch (err) {
      err.message += `\n${cluster.logs()}`;
      throw err;
    }
  });
}

clusterTest('two windows through nginx on different replicas draw together; a replica dies and no stroke is lost', {}, async ({ t, cluster, browser }) => {
  t.diagnostic(`screenshots: ${ARTIFACTS}`);
  const board = `b${Date.now().toString(36)}`;
  const a = await open(browser, cluster, board, 'page A');
  const b = await open(browser, cluster, board, 'page B');
  const ra = await a.evaluate(() => window.whiteboard.replica);
  const rb = await b.evaluate(() => window.whiteboard.replica);
  assert.notEqual(ra, rb, 'least_conn puts the second window on another replica');
  // Each window lists both: itself and the other one.
  const [ca, cb] = [await connectionOf(a), await connectionOf(b)];
  await untilListed(a, [ca, cb], 'A lists both windows');
  await untilListed(b, [ca, cb], 'B lists both windows');
  assert.match(await a.locator('#who li[data-you]').textContent(), new RegExp(`^${ra} #\\d+ \\(this window\\)$`));

  // Live cursors, published by the pages themselves (client publish, no backend): B shows
  // where A's pointer is, on A's replica's other side; A does not show its own.
  const box = await a.locator('canvas').boundingBox();
  await a.mouse.move(box.x + 300, box.y + 200);
  const pageA = await a.evaluate(() => window.whiteboard.pageId);
  const at = [300 / box.width, 200 / box.height];
  await until(
    b,
    ([page, [x, y]]) => window.whiteboard.cursors.some((c) => c.page === page && Math.abs(c.x - x) < 0.01 && Math.abs(c.y - y) < 0.01),
    [pageA, at],
    "B to show A's cursor where A's pointer is"
  );
  const shown = await b.locator(`.cursor[data-page="${pageA}"]`).boundingBox();
  const boxB = await b.locator('canvas').boundingBox();
  assert.ok(Math.abs(shown.x + 5 - (boxB.x + at[0] * boxB.width)) < 3, `A's cursor drawn at x ${shown.x} on B`);
  assert.ok(Math.abs(shown.y + 5 - (boxB.y + at[1] * boxB.height)) < 3, `A's cursor drawn at y ${shown.y} on B`);
  assert.deepEqual(await a.evaluate(() => window.whiteboard.cursors), [], 'A does not show its own cursor');
  await shot(b, '0-b-sees-a-cursor');

  // A draws; B sees the stroke, on its canvas.
  const first = await draw(a, [100, 100], [400, 250]);
  await untilStored(b, [first]);
  await untilStored(a, [first]);
  assert.ok(await inkAt(b, [250, 175]), 'B shows the stroke where A drew it');
  await shot(a, '1-a-drew');
  await shot(b, '1-b-sees');

  // A's replica freezes, then dies. Meanwhile A draws (its send reaches no one) and B draws
  // (A's replica never delivers it).
  const pid = cluster.pidOf(ra);
  // From here A's replica renews no heartbeat: its windows must leave the others' lists within
  // replica_ttl + one heartbeat (plus a margin for the page to hear and show it). Watched from
  // now on, while the test goes on (the freeze can outlast the bound: the backend's POST /send
  // may wait on the frozen replica until nginx gives up on it).
  const bound = presenceBoundMs() + 3000;
  const frozenAt = Date.now();
  process.kill(pid, 'SIGSTOP');
  const aLeftB = until(
    b,
    (old) => ![...document.querySelectorAll('#who li')].some((li) => li.dataset.connection === old),
    ca,
    `A's old entry (${ca}) to leave B's list within ${bound} ms of the freeze`,
    bound
  ).then(() => Date.now() - frozenAt);
  aLeftB.catch(() => {}); // awaited below
  const second = await draw(a, [100, 400], [400, 400]);
  await b.locator('.swatch[title="#e53935"]').click(); // B picks red
  const third = await draw(b, [600, 100], [600, 450]);
  await untilStored(b, [third]);
  assert.ok(!(await confirmedIds(a)).includes(third), 'A missed the stroke while its replica was frozen');
  process.kill(pid, 'SIGKILL');
  const goneAfter = await aLeftB;
  t.diagnostic(`A's old entry left B's list ${goneAfter} ms after its replica froze (bound ${bound} ms)`);
  assert.ok(goneAfter <= bound, `A's old entry left B's list after ${goneAfter} ms, over ${bound} ms`);

  // A reconnects through nginx to another replica, catches up from its last offset, and its
  // own stroke is resent and stored once.
  await until(a, (dead) => window.whiteboard.state === 'open' && window.whiteboard.replica !== dead, ra, 'A on another replica');
  // A is back on the list, as its new connection, in both windows.
  const ca2 = await connectionOf(a);
  await untilListed(b, [ca2, cb], 'A back on B\'s list');
  await untilListed(a, [ca2, cb], 'A\'s list read again after its reconnect');
  const all = [first, second, third];
  for (const page of [a, b]) {
    await untilStored(page, all, 'every stroke');
  }
  assert.equal(
    await a.evaluate((ch) => window.whiteboard.client.recovered(ch), `board:${board}`),
    true,
    'A resumed from its offset (recovered: true), not by reloading the board'
  );
  assert.deepEqual(await confirmedIds(a), await confirmedIds(b), 'same strokes, same order');
  assert.equal((await confirmedIds(a)).length, 3, 'each stroke once');
  const [r, g, bl, alpha] = await pixelAt(a, [600, 300]);
  assert.ok(r > 200 && g < 100 && bl < 100 && alpha > 100, `A shows B's red stroke drawn while A was cut off: ${[r, g, bl, alpha]}`);
  assert.ok(await inkAt(b, [250, 400]), "B shows A's stroke drawn while A was cut off");
  await samePicture(a, b, 'both windows show the same picture');
  await shot(a, '2-a-after-replica-killed');
  await shot(b, '2-b-after-replica-killed');

  // A's window is closed; B draws; A's browser opens the board again. It starts from what it
  // saved and resumes from its offset: it gets only the new stroke, without loading the board.
  await until(
    a,
    (ch) => JSON.parse(localStorage.getItem(`wsbridge-whiteboard:${ch.slice(6)}`) ?? 'null')?.offset === window.whiteboard.client.lastOffset(ch),
    `board:${board}`,
    'A to save its board'
  );
  await a.close();
  const fourth = await draw(b, [100, 470], [800, 470]);
  all.push(fourth);
  await untilStored(b, [fourth]);
  const again = await open(a.context(), cluster, board, 'page A, reopened');
  await untilStored(again, all, 'every stroke');
  assert.equal(await again.evaluate(() => window.whiteboard.loads), 0, 'the reopened window did not load the board');
  assert.equal(await again.evaluate((ch) => window.whiteboard.client.recovered(ch), `board:${board}`), true);
  assert.deepEqual(await confirmedIds(again), await confirmedIds(b));
  await samePicture(again, b, 'the reopened window shows the same picture');
  await shot(again, '3-a-reopened');

  // A window in a new browser profile loads the board: the same picture. Redis holds each
  // stroke once.
  const c = await open(browser, cluster, board, 'page C');
  await untilStored(c, all, 'every stroke');
  assert.equal(await c.evaluate(() => window.whiteboard.loads), 1, 'a new window loads the board');
  assert.deepEqual(await confirmedIds(c), await confirmedIds(b));
  await samePicture(c, b, 'the late window shows the same picture');
  // The closed window left; the open ones are listed.
  await untilListed(c, [cb, await connectionOf(again), await connectionOf(c)], 'C lists the open windows');
  await shot(c, '4-c-opened-late');
  const stored = execFileSync('redis-cli', ['-p', String(cluster.redisPort), 'HLEN', `${cluster.prefix}:whiteboard:${board}`]);
  assert.equal(String(stored).trim(), '4');
  for (const page of [a, b, again, c]) assert.deepEqual(page.errors, [], `${page.label}: no page errors`);
});

// What the nginx config's note says about the seeds' ip_hash: every window from one address
// lands on the same replica (the board still works, but nothing crosses replicas).
clusterTest('with BALANCE=ip_hash, windows from one address all land on one replica', { BALANCE: 'ip_hash' }, async ({ cluster, browser }) => {
  const board = `h${Date.now().toString(36)}`;
  const pages = [];
  for (const label of ['page A', 'page B', 'page C']) pages.push(await open(browser, cluster, board, label));
  const replicas = await Promise.all(pages.map((p) => p.evaluate(() => window.whiteboard.replica)));
  assert.equal(new Set(replicas).size, 1, `one replica for all: ${replicas}`);
  const id = await draw(pages[0], [100, 100], [300, 300]);
  await untilStored(pages[2], [id]);
});

// The harshest failure: Redis comes back with no data at all (its files lost). Every history's
// epoch changes, so the pages are told they cannot be made whole (recovered: false); they load
// the board — now empty — and send again the strokes they hold, so the board is back, and a
// window opened afterwards shows it all.
clusterTest('Redis comes back empty: the open windows put the board back', {}, async ({ t, cluster, browser }) => {
  let redis = null;
  t.after(() => redis?.kill('SIGKILL'));
  const board = `r${Date.now().toString(36)}`;
  const a = await open(browser, cluster, board, 'page A');
  const b = await open(browser, cluster, board, 'page B');
  const ids = [await draw(a, [100, 100], [400, 250]), await draw(b, [500, 100], [800, 250])];
  for (const page of [a, b]) {
    await untilStored(page, ids, 'both strokes');
  }
  const cli = (...args) => String(execFileSync('redis-cli', ['-p', String(cluster.redisPort), ...args])).trim();

  // Redis stops and its files go; a new, empty Redis takes its place.
  cli('SHUTDOWN', 'NOSAVE');
  const dir = path.join(cluster.state, 'redis');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir);
  redis = spawn('redis-server', ['--port', String(cluster.redisPort), '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes'], {
    stdio: 'ignore',
  });
  await Promise.race([
    once(redis, 'spawn'),
    once(redis, 'error').then(([e]) => Promise.reject(e)),
  ]);

  // The windows put the board back: Redis holds both strokes again, and a new window shows
  // what the open ones show.
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    try {
      if (cli('HLEN', `${cluster.prefix}:whiteboard:${board}`) === '2') break;
    } catch {} // not listening yet
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(cli('HLEN', `${cluster.prefix}:whiteboard:${board}`), '2', 'the board is back in Redis');
  const c = await open(browser, cluster, board, 'page C');
  await untilStored(c, ids, 'both strokes');
  await until(a, (n) => window.whiteboard.ids({ confirmed: true }).length === n, 2, 'A holds the two strokes');
  await samePicture(c, a, 'the new window shows the same picture');
  await shot(c, '5-c-after-redis-came-back-empty');
  for (const page of [a, b, c]) assert.deepEqual(page.errors, [], `${page.label}: no page errors`);
});
