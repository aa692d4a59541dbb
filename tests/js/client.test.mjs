// The JavaScript client (examples/js/wsbridge-client.mjs) against a real redis-server and real
// gateway replicas. Run: node --experimental-websocket --test tests/js/ (after `cargo build`).

import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { WsBridgeClient, WsBridgeError, backoff, compareOffsets } from '../../examples/js/wsbridge-client.mjs';
import { PRESENCE, deadline, eventually, freePort, killAll, record, startGateway, startRedis, token, uniquePrefix } from './harness.mjs';

if (typeof globalThis.WebSocket !== 'function') {
  throw new Error('no global WebSocket: run with `node --experimental-websocket --test` on Node 20/21');
}

let redis;
const clients = [];
const gateways = [];

/** A client closed (no reconnect timers left behind) at the end of the test. */
function client(options) {
  const c = new WsBridgeClient({ baseDelayMs: 20, maxDelayMs: 200, ...options });
  clients.push(c);
  return c;
}

async function gateway(options) {
  const gw = await startGateway({ redisUrl: redis.url, ...options });
  gateways.push(gw);
  return gw;
}

before(async () => {
  redis = await startRedis();
});

afterEach(async () => {
  try {
    await deadline(Promise.all(clients.splice(0).map((c) => c.close())), 'the clients to close');
  } finally {
    await Promise.all(gateways.splice(0).map((g) => g.kill()));
  }
});

after(() => killAll());

describe('against real replicas', () => {
  test('subscribe, receive POST /send messages with their offsets, send and get the ack', async () => {
    const prefix = uniquePrefix('basic');
    const a = await gateway({ prefix });
    const b = await gateway({ prefix });
    const c = client({ url: a.wsUrl });
    const rec = record(c);
    const welcome = await deadline(c.connect(), 'welcome');
    assert.equal(welcome.user, null);
    assert.equal(welcome.reconnect, false);
    assert.equal(c.state, 'open');
    const joined = await deadline(c.subscribe('room:1'), 'subscribed room:1');
    assert.deepEqual(joined, { channel: 'room:1', recovered: null, resumed: false, reconnect: false, byServer: false });
    assert.equal(c.recovered('room:1'), null);

    // Sent through the other replica's API: it reaches the client through Redis.
    const answer = await b.send([
      { to: { channel: 'room:1' }, data: { text: 'hello' } },
      { to: { channel: 'room:1' }, data: 2 },
      { to: { connection: welcome.connection }, data: 'direct' },
    ]);
    assert.equal(answer.accepted, 3);
    await rec.until(() => rec.messages.length === 3, 'three messages');
    assert.deepEqual(rec.messages, [
      { channel: 'room:1', data: { text: 'hello' }, offset: answer.offsets[0] },
      { channel: 'room:1', data: 2, offset: answer.offsets[1] },
      { channel: null, data: 'direct', offset: null },
    ]);
    assert.ok(compareOffsets(answer.offsets[1], answer.offsets[0]) > 0);
    assert.equal(c.lastOffset('room:1'), answer.offsets[1]);

    // send → ack with the stream entry id; an error frame rejects with its code.
    const entry = await deadline(c.send('chat', { hi: 1 }), 'ack');
    assert.match(entry, /^\d+-\d+$/);
    const stored = await redis.xrange(`${prefix}:in:chat`);
    assert.equal(stored.length, 1);
    assert.equal(stored[0].id, entry);
    assert.equal(stored[0].fields.data, '{"hi":1}');
    await assert.rejects(c.send('nope', 1), (err) => {
      assert.ok(err instanceof WsBridgeError);
      assert.equal(err.code, 'stream_not_allowed');
      assert.ok(err.message.length > 0);
      assert.equal(err.retryable, false);
      return true;
    });
    assert.equal(c.pendingSends, 0);

    // unsubscribe: no more messages from the channel.
    await deadline(c.unsubscribe('room:1'), 'unsubscribed');
    assert.deepEqual(c.channels, []);
    await b.send([{ to: { channel: 'room:1' }, data: 'gone' }, { to: { connection: welcome.connection }, data: 'marker' }]);
    await rec.until(() => rec.messages.length === 4, 'the marker');
    assert.equal(rec.messages[3].data, 'marker');
  });

  test('a killed replica: fail over to the other, resume with since, missed messages exactly once, recovered', async () => {
    const prefix = uniquePrefix('failover');
    const a = await gateway({ prefix });
    const b = await gateway({ prefix });
    const c = client({ urls: [a.wsUrl, b.wsUrl] });
    const rec = record(c);
    const first = await deadline(c.connect(), 'welcome');
    await deadline(c.subscribe('room:f'), 'subscribed');
    const [o0] = (await b.send({ to: { channel: 'room:f' }, data: 0 })).offsets;
    await rec.until(() => rec.messages.length === 1, 'message 0');
    assert.equal(c.lastOffset('room:f'), o0);

    // Replica A hangs (SIGSTOP): what is published now cannot reach the client through it.
    await a.freeze();
    const missed = [];
    for (let i = 1; i <= 5; i++) missed.push(...(await b.send({ to: { channel: 'room:f' }, data: i })).offsets);
    // Then it dies: the client sees the connection drop and reconnects to the next URL (B).
    await a.kill('SIGKILL');
    await rec.until(() => rec.subscribed.length === 2, 'the resubscribe');
    const close = rec.closes[0];
    assert.equal(close.willReconnect, true);
    assert.equal(close.byClient, false);
    const welcome = rec.welcomes[1];
    assert.equal(welcome.reconnect, true);
    assert.equal(welcome.url, b.wsUrl);
    assert.notEqual(welcome.connection, first.connection);
    assert.deepEqual(rec.subscribed[1], { channel: 'room:f', recovered: true, resumed: true, reconnect: true, byServer: false });
    assert.equal(c.recovered('room:f'), true);

    // The missed messages were replayed before `subscribed`, in order, once.
    const names = rec.events.map(([name]) => name);
    const resubscribedAt = names.lastIndexOf('subscribed');
    const replayed = rec.events
      .slice(names.indexOf('close'), resubscribedAt)
      .filter(([name]) => name === 'message')
      .map(([, m]) => m);
    assert.deepEqual(
      replayed.map((m) => [m.data, m.offset]),
      missed.map((o, i) => [i + 1, o])
    );

    // Live again, through either replica's API.
    await b.send({ to: { channel: 'room:f' }, data: 6 });
    await rec.until(() => rec.messages.length === 7, 'message 6');
    assert.deepEqual(
      rec.messages.map((m) => m.data),
      [0, 1, 2, 3, 4, 5, 6]
    );
    assert.equal(new Set(rec.messages.map((m) => m.offset)).size, 7);
    assert.equal(c.stats.reconnects, 1);
    assert.equal(c.stats.duplicatesDropped, 0);
  });

  test('a token about to expire is refreshed on the open connection, which stays open', async () => {
    const prefix = uniquePrefix('refresh');
    const secret = 'js-refresh-secret';
    const gw = await gateway({ prefix, jwtSecret: secret, env: { WSBRIDGE__AUTH__REFRESH_NOTICE_SECONDS: '2' } });
    // The first token lives 4 s; every later one 10 minutes.
    let calls = 0;
    const now = () => Math.floor(Date.now() / 1000);
    const c = client({
      url: gw.wsUrl,
      token: () => token(secret, { sub: 'ann', exp: now() + (calls++ === 0 ? 4 : 600) }),
    });
    const refreshed = new Promise((resolve) => c.on('refreshed', resolve));
    const required = new Promise((resolve) => c.on('refresh_required', resolve));
    await deadline(c.connect(), 'welcome');
    const { expiresAt: old } = await deadline(required, 'refresh_required');
    const { expiresAt } = await deadline(refreshed, 'refreshed');
    assert.ok(expiresAt >= old + 590, `${expiresAt} after ${old}`);
    // Past the first token's exp the same connection still answers: only the clock can show
    // that nothing closed it, so wait it out.
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, (old - Date.now() / 1000 + 1.5) * 1000)));
    await deadline(c.send('chat', { after: 'the first exp' }), 'ack');
    assert.equal(c.stats.connects, 1, 'no reconnect');
    // Another user's token is refused, the connection unchanged.
    await assert.rejects(c.refresh(token(secret, { sub: 'bob', exp: now() + 600 })), (err) => err.code === 'token_user_mismatch');
    await deadline(c.send('chat', { still: 'open' }), 'ack');
  });

  test('publish: acked with the offset, delivered to every subscriber and the publisher; refusals reject with their code', async () => {
    const prefix = uniquePrefix('publish');
    const secret = 'js-publish-secret';
    const a = await gateway({ prefix, jwtSecret: secret, clientPublish: true });
    const b = await gateway({ prefix, jwtSecret: secret, clientPublish: true });
    const publisher = client({ url: a.wsUrl, token: token(secret, { sub: 'ann', publish: ['room:*'] }) });
    const reader = client({ url: b.wsUrl, token: token(secret, { sub: 'bob' }) });
    const mine = record(publisher);
    const theirs = record(reader);
    await deadline(publisher.connect(), 'welcome');
    await deadline(reader.connect(), 'welcome');
    await deadline(publisher.subscribe('room:p'), 'subscribed');
    await deadline(reader.subscribe('room:p'), 'subscribed');

    const acked = await deadline(publisher.publish('room:p', { x: 1, y: 2 }), 'ack');
    assert.equal(acked.channel, 'room:p');
    assert.match(acked.offset, /^[0-9a-f]+:\d+-\d+$/);
    const want = { channel: 'room:p', data: { x: 1, y: 2 }, offset: acked.offset };
    await theirs.until(() => theirs.messages.length === 1, 'the message on the other replica');
    await mine.until(() => mine.messages.length === 1, 'its own message');
    assert.deepEqual(theirs.messages, [want]);
    assert.deepEqual(mine.messages, [want]);
    assert.equal(reader.lastOffset('room:p'), acked.offset);

    // Bob's token has no publish claim; `other:*` takes no client publishes at all.
    await assert.rejects(reader.publish('room:p', 'no'), (err) => err.code === 'publish_forbidden' && err.channel === 'room:p' && !err.retryable);
    await assert.rejects(publisher.publish('other:1', 'no'), (err) => err.code === 'publish_not_allowed' && err.channel === 'other:1');
    // Offline, a publish is refused at once, never queued.
    await publisher.close();
    await assert.rejects(publisher.publish('room:p', 'late'), (err) => err.code === 'closed');
    const idle = client({ url: a.wsUrl, token: token(secret, { sub: 'ann', publish: ['room:*'] }) });
    await assert.rejects(idle.publish('room:p', 'offline'), (err) => err.code === 'not_connected');
    // The refused publishes reached nobody: the next message Bob gets is a backend's.
    await b.send({ to: { channel: 'room:p' }, data: 'end' });
    await theirs.until(() => theirs.messages.length === 2, 'the backend message');
    assert.equal(theirs.messages[1].data, 'end');
  });

  test('unacked sends are resent with the same ids after a reconnect and stored once, in order', async () => {
    const prefix = uniquePrefix('resend');
    const secret = 'js-test-secret';
    const gw = await gateway({ prefix, jwtSecret: secret });
    // A WebSocket whose first connection loses the acks of the first three sends, then drops:
    // the client never learns that they were stored.
    const wire = [];
    const lostAcks = [];
    let lostAll;
    const allLost = new Promise((resolve) => (lostAll = resolve));
    class LossyWebSocket extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols);
        this.conn = wire.push([]) - 1;
      }
      send(text) {
        wire[this.conn].push(JSON.parse(text));
        super.send(text);
      }
      get onmessage() {
        return super.onmessage;
      }
      set onmessage(fn) {
        super.onmessage = fn
          ? (ev) => {
              const frame = JSON.parse(ev.data);
              if (this.conn === 0 && frame.type === 'ack' && lostAcks.length < 3) {
                lostAcks.push(frame);
                if (lostAcks.length === 3) {
                  this.close(3000, 'test: connection lost');
                  lostAll();
                }
                return;
              }
              fn(ev);
            }
          : null;
      }
    }
    const c = client({
      url: gw.wsUrl,
      token: () => token(secret, { sub: 'alice' }),
      WebSocket: LossyWebSocket,
    });
    const rec = record(c);
    const welcome = await deadline(c.connect(), 'welcome');
    assert.equal(welcome.user, 'alice');
    const sends = [c.send('chat', { n: 1 }), c.send('chat', { n: 2 }), c.send('chat', { n: 3 })];
    let settled = 0;
    sends.forEach((p) => p.then(() => settled++, () => settled++));
    await deadline(allLost, 'three lost acks');
    assert.equal(settled, 0, 'nothing resolved on the first connection');

    const entries = await deadline(Promise.all(sends), 'the acks after the reconnect');
    assert.equal(rec.welcomes.length, 2);
    assert.equal(rec.closes[0].willReconnect, true);
    // The same frames (same ids, same order) went out on both connections.
    const sentOn = (i) => wire[i].filter((f) => f.type === 'send');
    assert.equal(sentOn(0).length, 3);
    assert.deepEqual(sentOn(1), sentOn(0));
    const ids = sentOn(0).map((f) => f.id);
    assert.equal(new Set(ids).size, 3);
    // The gateway recognised the resends: the acks name the entries stored the first time.
    assert.deepEqual(entries, lostAcks.map((a) => a.entry));
    assert.deepEqual(lostAcks.map((a) => a.id), ids);
    assert.equal(c.stats.resends, 3);
    assert.equal(c.pendingSends, 0);

    // Stored once each, in order (XRANGE on <prefix>:in:chat).
    const stored = await redis.xrange(`${prefix}:in:chat`);
    assert.deepEqual(
      stored.map((e) => [e.id, e.fields.id, e.fields.user, e.fields.data]),
      ids.map((id, i) => [entries[i], id, 'alice', JSON.stringify({ n: i + 1 })])
    );
    // A promise settles once: a late duplicate ack changes nothing.
    assert.equal(settled, 3);
  });

  test('recovered is false when the history no longer holds the offset', async () => {
    const prefix = uniquePrefix('trimmed');
    const gw = await gateway({ prefix, historySize: 3 });
    // A URL provider that the test can hold, to keep the client offline for a while.
    let hold = null;
    const c = client({
      url: async () => {
        await hold?.promise;
        return gw.wsUrl;
      },
    });
    const rec = record(c);
    await deadline(c.connect(), 'welcome');
    await deadline(c.subscribe('room:t'), 'subscribed');
    await gw.send({ to: { channel: 'room:t' }, data: 0 });
    await rec.until(() => rec.messages.length === 1, 'message 0');

    let release;
    hold = { promise: new Promise((r) => (release = r)) };
    const reconnected = c.reconnect();
    for (let i = 1; i <= 10; i++) await gw.send({ to: { channel: 'room:t' }, data: i });
    hold = null;
    release();
    await deadline(reconnected, 'the reconnect');
    await rec.until(() => rec.subscribed.length === 2, 'the resubscribe');
    assert.deepEqual(rec.subscribed[1], { channel: 'room:t', recovered: false, resumed: true, reconnect: true, byServer: false });
    assert.equal(c.recovered('room:t'), false);
    assert.equal(rec.messages.length, 1, 'nothing replayed when not recovered');

    // Live messages flow, and become the new resume point.
    const [live] = (await gw.send({ to: { channel: 'room:t' }, data: 'live' })).offsets;
    await rec.until(() => rec.messages.length === 2, 'the live message');
    assert.equal(rec.messages[1].data, 'live');
    assert.equal(c.lastOffset('room:t'), live);
  });

  test('a resume the gateway cannot read yet (Redis down) is asked again, then recovered', async () => {
    // Its own Redis, which keeps its data across a SIGKILL (append-only file, fsync always).
    const own = await startRedis({ aof: true });
    const prefix = uniquePrefix('unavailable');
    const gw = await gateway({ prefix, redisUrl: own.url });
    let hold = null;
    const c = client({
      url: async () => {
        await hold?.promise;
        return gw.wsUrl;
      },
    });
    const rec = record(c);
    await deadline(c.connect(), 'welcome');
    await deadline(c.subscribe('room:u'), 'subscribed');
    await gw.send({ to: { channel: 'room:u' }, data: 0 });
    await rec.until(() => rec.messages.length === 1, 'message 0');

    // Offline, the client misses message 1; then Redis dies and the client comes back.
    let release;
    hold = { promise: new Promise((r) => (release = r)) };
    const reconnected = c.reconnect();
    const [missed] = (await gw.send({ to: { channel: 'room:u' }, data: 1 })).offsets;
    await own.kill();
    hold = null;
    release();
    await deadline(reconnected, 'the reconnect');

    // The gateway cannot read the history: it says so (not `recovered: false`), and the
    // client keeps the channel and asks again until Redis is back.
    await rec.until(() => rec.errors.some((e) => e.code === 'redis_unavailable'), 'redis_unavailable', 30_000);
    assert.equal(rec.subscribed.length, 1, 'no subscribed while Redis cannot be read');
    assert.deepEqual(c.channels, ['room:u'], 'the channel is kept');
    await own.restart();
    await rec.until(() => rec.subscribed.length === 2, 'the resubscribe once Redis is back', 30_000);
    assert.deepEqual(rec.subscribed[1], { channel: 'room:u', recovered: true, resumed: true, reconnect: true, byServer: false });
    assert.deepEqual(
      rec.messages.map((m) => [m.data, m.offset ?? null]).slice(1),
      [[1, missed]],
      'the missed message replayed once'
    );
  });

  test('reconnect attempts back off exponentially (full jitter), sends wait in a bounded queue', async () => {
    const port = await freePort(); // nothing listens there yet
    const c = client({ url: `ws://127.0.0.1:${port}/ws`, baseDelayMs: 10, maxDelayMs: 80, maxPendingSends: 2 });
    const rec = record(c);
    const connected = c.connect();
    const queued = [c.send('chat', 'q1'), c.send('chat', 'q2')];
    await assert.rejects(c.send('chat', 'q3'), { code: 'queue_full' });
    await rec.until(() => rec.reconnecting.length >= 6, 'six reconnect attempts');
    const attempts = rec.reconnecting.slice(0, 6);
    assert.deepEqual(
      attempts.map((r) => r.attempt),
      [1, 2, 3, 4, 5, 6]
    );
    assert.deepEqual(
      attempts.map((r) => r.capMs),
      [10, 20, 40, 80, 80, 80]
    );
    for (const r of attempts) assert.ok(r.delayMs >= 0 && r.delayMs <= r.capMs, JSON.stringify(r));
    assert.ok(rec.errors.length > 0, 'failed attempts are reported as errors');
    assert.equal(rec.welcomes.length, 0);

    // The gateway comes up on that port: the client gets in, and the queued sends go out.
    const prefix = uniquePrefix('backoff');
    await gateway({ prefix, listen: `127.0.0.1:${port}` });
    await deadline(connected, 'the first welcome');
    const entries = await deadline(Promise.all(queued), 'the queued sends');
    const stored = await redis.xrange(`${prefix}:in:chat`);
    assert.deepEqual(
      stored.map((e) => [e.id, e.fields.data]),
      [
        [entries[0], '"q1"'],
        [entries[1], '"q2"'],
      ]
    );
    assert.equal(c.stats.resends, 0);
  });

  test('close codes: 1012 fails over at once, 4000-4999 stops unless asked to reconnect', async () => {
    const prefix = uniquePrefix('codes');
    const a = await gateway({ prefix });
    const b = await gateway({ prefix });

    // 1012: the replica shuts down (SIGTERM); the client moves to the other one.
    const c = client({ urls: [a.wsUrl, b.wsUrl] });
    const rec = record(c);
    await deadline(c.connect(), 'welcome');
    await a.kill('SIGTERM');
    await rec.until(() => rec.welcomes.length === 2, 'the reconnect after 1012');
    assert.equal(rec.closes[0].code, 1012);
    assert.equal(rec.closes[0].willReconnect, true);
    assert.equal(rec.reconnecting[0].attempt, 1);
    assert.equal(rec.welcomes[1].url, b.wsUrl);

    // 4001 from a backend: no reconnect; what waited is rejected.
    const id = rec.welcomes[1].connection;
    const { status } = await b.post('/disconnect', { connection: id, code: 4001, reason: 'banned' });
    assert.equal(status, 202);
    await rec.until(() => rec.closes.length === 2, 'the 4001 close');
    assert.deepEqual(rec.closes[1], { code: 4001, reason: 'banned', byClient: false, willReconnect: false });
    assert.equal(c.state, 'closed');
    assert.equal(rec.reconnecting.length, 1);
    await assert.rejects(c.send('chat', 1), { code: 'closed' });

    // ... unless reconnectOnBackendClose says so.
    const d = client({ url: b.wsUrl, reconnectOnBackendClose: (code) => code === 4002 });
    const drec = record(d);
    const dw = await deadline(d.connect(), 'welcome');
    await b.post('/disconnect', { connection: dw.connection, code: 4002 });
    await drec.until(() => drec.welcomes.length === 2, 'the reconnect after 4002');
    assert.equal(drec.closes[0].code, 4002);
    assert.equal(drec.closes[0].willReconnect, true);
  });
});

describe('presence, against real replicas', () => {
  const secret = 'js-presence-secret';

  /** Waits until the replica's backend API counts `connections` in `channel`. */
  function counted(gw, channel, connections) {
    return eventually(async () => {
      const { status, body } = await gw.post('/presence', { channel });
      return status === 200 && body.connections === connections;
    }, `${connections} connections in ${channel}`);
  }

  const byUser = (a, b) => String(a.user ?? a.connection).localeCompare(String(b.user ?? b.connection));

  test('a page lists the members of every replica, in both views, with info from the token', async () => {
    const prefix = uniquePrefix('presence-page');
    const a = await gateway({ prefix, jwtSecret: secret, presence: true });
    const b = await gateway({ prefix, jwtSecret: secret, presence: true });
    const ann = client({ url: a.wsUrl, token: () => token(secret, { sub: 'ann', info: { name: 'Ann' } }) });
    const bob = client({ url: b.wsUrl, token: () => token(secret, { sub: 'bob' }) });
    const annWelcome = await deadline(ann.connect(), 'ann welcome');
    const bobWelcome = await deadline(bob.connect(), 'bob welcome');
    await deadline(Promise.all([ann.subscribe('room:p'), bob.subscribe('room:p')]), 'subscribed');
    // Each replica writes its own members, just after `subscribed`.
    await counted(a, 'room:p', 2);

    const page = await deadline(bob.presence('room:p'), 'the presence page');
    assert.deepEqual(Object.keys(page).sort(), ['channel', 'connections', 'cursor', 'members', 'users']);
    assert.equal(page.channel, 'room:p');
    assert.equal(page.connections, 2);
    assert.equal(page.users, 2);
    assert.equal(page.cursor, null);
    assert.deepEqual(page.members.sort(byUser), [
      { connection: annWelcome.connection, user: 'ann', info: { name: 'Ann' } },
      { connection: bobWelcome.connection, user: 'bob', info: null },
    ]);
    const users = await deadline(ann.presence('room:p', { view: 'users' }), 'the users view');
    assert.deepEqual(users.members.sort(byUser), [
      { user: 'ann', connections: 1 },
      { user: 'bob', connections: 1 },
    ]);
    // The backend API answers the same page.
    const { status, body } = await b.post('/presence', { channel: 'room:p' });
    assert.equal(status, 200);
    assert.deepEqual(body.members.sort(byUser), page.members);
  });

  test('a user joins once with two tabs and leaves with the last; a watched list follows', async () => {
    const prefix = uniquePrefix('presence-events');
    const a = await gateway({ prefix, jwtSecret: secret, presence: true });
    const b = await gateway({ prefix, jwtSecret: secret, presence: true });
    const watcher = client({ url: a.wsUrl, token: () => token(secret, { sub: 'watcher' }) });
    const wrec = record(watcher);
    await deadline(watcher.connect(), 'welcome');
    const watch = watcher.watchPresence('room:j');
    const watched = () => watch.members.map((m) => m.user).sort().join(',');
    await deadline(watcher.subscribe('room:j'), 'subscribed');
    // A subscriber hears of its own arrival too.
    await wrec.until(() => wrec.presence.length === 1, 'its own join');
    assert.equal(wrec.presence[0].type, 'join');
    assert.equal(wrec.presence[0].channel, 'room:j');
    assert.equal(wrec.presence[0].member.user, 'watcher');
    await eventually(() => watched() === 'watcher', 'the watched list to hold the watcher');

    const annToken = () => token(secret, { sub: 'ann', info: { name: 'Ann' } });
    const tab1 = client({ url: b.wsUrl, token: annToken });
    const tab2 = client({ url: a.wsUrl, token: annToken });
    await deadline(tab1.connect(), 'tab 1 welcome');
    await deadline(tab1.subscribe('room:j'), 'tab 1 subscribed');
    await wrec.until(() => wrec.presence.length === 2, "ann's join");
    assert.deepEqual(wrec.presence[1], {
      type: 'join',
      channel: 'room:j',
      member: { connection: tab1.connectionId, user: 'ann', info: { name: 'Ann' } },
    });
    await eventually(() => watched() === 'ann,watcher', 'ann in the watched list');

    // Ann's second tab: no join. Events come in order with messages, so a message published
    // once the tab is counted arrives with no join before it.
    await deadline(tab2.connect(), 'tab 2 welcome');
    await deadline(tab2.subscribe('room:j'), 'tab 2 subscribed');
    await counted(a, 'room:j', 3);
    await b.send({ to: { channel: 'room:j' }, data: 'after the second tab' });
    await wrec.until(() => wrec.messages.length === 1, 'the first marker');
    assert.equal(wrec.presence.length, 2, 'no second join for a second tab');

    // The first tab goes: ann is still there. The last one goes: ann leaves.
    await tab1.close();
    await counted(a, 'room:j', 2);
    await b.send({ to: { channel: 'room:j' }, data: 'after the first tab left' });
    await wrec.until(() => wrec.messages.length === 2, 'the second marker');
    assert.equal(wrec.presence.length, 2, 'no leave while a tab is left');
    assert.equal(watched(), 'ann,watcher');
    await tab2.close();
    await wrec.until(() => wrec.presence.length === 3, "ann's leave");
    assert.equal(wrec.presence[2].type, 'leave');
    assert.equal(wrec.presence[2].member.user, 'ann');
    await eventually(() => watched() === 'watcher', 'ann gone from the watched list');
    watch.stop();
  });

  test('errors name what was wrong: presence_disabled, channel_not_allowed, bad_request', async () => {
    const prefix = uniquePrefix('presence-errors');
    const gw = await gateway({ prefix, jwtSecret: secret, presence: true });
    const c = client({ url: gw.wsUrl, token: () => token(secret, { sub: 'ann', channels: ['room:*', 'other:*'] }) });
    const rec = record(c);
    await deadline(c.connect(), 'welcome');
    await assert.rejects(c.presence('other:1'), (err) => {
      assert.ok(err instanceof WsBridgeError);
      assert.equal(err.code, 'presence_disabled');
      assert.equal(err.channel, 'other:1');
      assert.ok(err.message.length > 0);
      assert.equal(err.retryable, false);
      return true;
    });
    await assert.rejects(c.presence('secret:1'), { code: 'channel_not_allowed' });
    await assert.rejects(c.presence('room:1', { view: 'everyone' }), { code: 'bad_request' });
    assert.equal(rec.errors.length, 0, 'an answered question is no error event');
    // The connection is fine: a good question gets its page.
    const page = await deadline(c.presence('room:1'), 'a page');
    assert.deepEqual(page, { channel: 'room:1', connections: 0, users: 0, members: [], cursor: null });
  });

  test('pages: a cursor walks every member once; a watched list reads every page', async (t) => {
    // A small hash is scanned whole whatever the limit; make hashes use the encoding whose
    // HSCAN honours COUNT, so that five members take several pages.
    await redis.cli('CONFIG', 'SET', 'hash-max-listpack-entries', '0');
    t.after(() => redis.cli('CONFIG', 'SET', 'hash-max-listpack-entries', '128'));
    const prefix = uniquePrefix('presence-pages');
    const gw = await gateway({ prefix, presence: true });
    const members = [];
    for (let i = 0; i < 5; i++) {
      const c = client({ url: gw.wsUrl });
      await deadline(c.connect(), 'welcome');
      await deadline(c.subscribe('room:pages'), 'subscribed');
      members.push(c);
    }
    await counted(gw, 'room:pages', 5);
    const expected = members.map((c) => c.connectionId).sort();

    for (const view of ['connections', 'users']) {
      const seen = [];
      let cursor = null;
      let pages = 0;
      do {
        const page = await deadline(members[0].presence('room:pages', { view, cursor, limit: 1 }), `a page of ${view}`);
        assert.equal(page.connections, 5);
        assert.equal(page.users, 5, 'an anonymous connection is a user of its own');
        seen.push(...page.members);
        cursor = page.cursor;
        pages += 1;
        assert.ok(pages < 50, 'the walk ends');
      } while (cursor != null);
      // With COUNT 1, Redis stops scanning at the first bucket that holds a member: all five in
      // one page would take all five in one bucket.
      assert.ok(pages >= 2, `a limit of 1 takes more than one page (${view})`);
      assert.deepEqual(seen.map((m) => m.connection).sort(), expected, `every member once (${view})`);
      if (view === 'users') for (const m of seen) assert.deepEqual(m, { user: null, connection: m.connection, connections: 1 });
    }

    const watch = members[1].watchPresence('room:pages', null, { limit: 2 });
    await eventually(() => watch.members.length === 5, 'the watched list to read every page');
    assert.deepEqual(watch.members.map((m) => m.connection).sort(), expected);
    watch.stop();
  });

  test("a killed replica: its member leaves the others' lists in time; the client's list is read again", async () => {
    const prefix = uniquePrefix('presence-failover');
    const a = await gateway({ prefix, presence: true });
    const b = await gateway({ prefix, presence: true });
    const w = client({ url: b.wsUrl });
    await deadline(w.connect(), 'welcome');
    const watch = w.watchPresence('room:r');
    await deadline(w.subscribe('room:r'), 'subscribed');
    const c = client({ urls: [a.wsUrl, b.wsUrl] });
    const crec = record(c);
    await deadline(c.connect(), 'welcome');
    const own = c.watchPresence('room:r');
    await deadline(c.subscribe('room:r'), 'subscribed');
    const first = c.connectionId;
    const list = (x) => x.members.map((m) => m.connection).sort().join(' ');
    await eventually(() => list(watch) === [w.connectionId, first].sort().join(' '), "both in w's list");
    await eventually(() => list(own) === [w.connectionId, first].sort().join(' '), "both in c's list");

    // A dies without a word. c moves to B; B counts A dead after its last heartbeat, plus at
    // most one of its own heartbeats, and sends the leave of A's member.
    const killedAt = Date.now();
    await a.kill('SIGKILL');
    await crec.until(() => crec.subscribed.length === 2, 'the resubscribe on B');
    const second = c.connectionId;
    assert.notEqual(second, first);
    const bound = PRESENCE.replicaTtlSeconds * 1000 + PRESENCE.heartbeatIntervalMs + 2500;
    const expected = [w.connectionId, second].sort().join(' ');
    await eventually(() => list(watch) === expected, `A's member to leave w's list within ${bound} ms`, bound);
    assert.ok(Date.now() - killedAt <= bound, `gone after ${Date.now() - killedAt} ms`);
    // c's list, read again after the resubscribe (the events sent while it was away are
    // lost): w and its new connection, and its old one gone with the leave.
    await eventually(() => list(own) === expected, "c's list read again");
    watch.stop();
    own.stop();
  });
});

describe('without a gateway', () => {
  // A stand-in WebSocket that the test drives frame by frame.
  class FakeWebSocket {
    static last = null;
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      FakeWebSocket.last = this;
      queueMicrotask(() => {
        this.readyState = 1;
        this.onopen?.({});
      });
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code = 1000, reason = '') {
      this.readyState = 3;
      queueMicrotask(() => this.onclose?.({ code, reason, wasClean: true }));
    }
    deliver(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
  }

  test('a replayed message whose offset is not newer than the last seen is dropped', async () => {
    const c = client({ url: 'ws://fake/ws', WebSocket: FakeWebSocket });
    const rec = record(c);
    const connected = c.connect();
    await eventually(() => FakeWebSocket.last?.onmessage, 'the fake socket');
    const ws = FakeWebSocket.last;
    ws.deliver({ type: 'welcome', connection: 'r.1.1', user: null });
    await connected;
    c.subscribe('room:d');
    assert.deepEqual(ws.sent.at(-1), { type: 'subscribe', channel: 'room:d', id: ws.sent.at(-1).id });
    ws.deliver({ type: 'subscribed', channel: 'room:d', id: ws.sent.at(-1).id });
    ws.deliver({ type: 'message', channel: 'room:d', offset: 'e1:100-0', data: 1 });
    ws.deliver({ type: 'message', channel: 'room:d', offset: 'e1:100-1', data: 2 });
    ws.deliver({ type: 'message', channel: 'room:d', offset: 'e1:100-1', data: 'dup' });
    ws.deliver({ type: 'message', channel: 'room:d', offset: 'e1:99-5', data: 'older' });
    ws.deliver({ type: 'message', channel: 'room:d', offset: 'e2:1-0', data: 'new epoch' });
    assert.deepEqual(
      rec.messages.map((m) => m.data),
      [1, 2, 'new epoch']
    );
    assert.equal(c.stats.duplicatesDropped, 2);
    assert.equal(c.lastOffset('room:d'), 'e2:1-0');
    // The next subscribe after a reconnect resumes from there.
    c.reconnect();
    await eventually(() => FakeWebSocket.last !== ws && FakeWebSocket.last.onmessage, 'the new socket');
    FakeWebSocket.last.deliver({ type: 'welcome', connection: 'r.1.2', user: null });
    const resub = FakeWebSocket.last.sent[0];
    assert.deepEqual(resub, { type: 'subscribe', channel: 'room:d', id: resub.id, since: 'e2:1-0' });
  });

  test('a send refused with shutting_down (a draining replica) is kept and resent on the next connection', async () => {
    const c = client({ url: 'ws://fake/ws', WebSocket: FakeWebSocket });
    const rec = record(c);
    const connected = c.connect();
    await eventually(() => FakeWebSocket.last?.onmessage, 'the fake socket');
    const ws = FakeWebSocket.last;
    ws.deliver({ type: 'welcome', connection: 'r.1.1', user: null });
    await connected;
    const sent = c.send('chat', 'hi');
    const frame = ws.sent.at(-1);
    ws.deliver({ type: 'error', id: frame.id, code: 'shutting_down', message: 'not stored' });
    assert.equal(c.pendingSends, 1);
    assert.equal(rec.errors.length, 0);
    ws.close(1012, 'replica shutting down');
    await eventually(() => FakeWebSocket.last !== ws && FakeWebSocket.last.onmessage, 'the new socket');
    const next = FakeWebSocket.last;
    next.deliver({ type: 'welcome', connection: 'r.2.1', user: null });
    assert.deepEqual(next.sent.at(-1), frame);
    next.deliver({ type: 'ack', id: frame.id, entry: '1-0' });
    assert.equal(await sent, '1-0');
  });

  test('a watched list applies the events that came while its pages were read; presence questions wait for a connection', async () => {
    const c = client({ url: 'ws://fake/ws', WebSocket: FakeWebSocket });
    const connected = c.connect();
    await eventually(() => FakeWebSocket.last?.onmessage, 'the fake socket');
    const ws = FakeWebSocket.last;
    ws.deliver({ type: 'welcome', connection: 'r.1.1', user: null });
    await connected;
    const changes = [];
    const watch = c.watchPresence('room:w', (members, change) => changes.push([change.type, members.map((m) => m.user)]));
    c.subscribe('room:w');
    ws.deliver({ type: 'subscribed', channel: 'room:w', id: ws.sent.at(-1).id });
    const q1 = ws.sent.at(-1);
    assert.deepEqual(q1, { type: 'presence', channel: 'room:w', id: q1.id });
    // While the pages are read, x joins and y leaves; the first page still has y.
    const member = (user) => ({ connection: `r.1.${user}`, user, info: null });
    ws.deliver({ type: 'join', channel: 'room:w', member: member('x') });
    ws.deliver({ type: 'leave', channel: 'room:w', member: member('y') });
    ws.deliver({ type: 'presence', channel: 'room:w', id: q1.id, connections: 3, users: 3, members: [member('y'), member('z')], cursor: '7' });
    await eventually(() => ws.sent.length === 3, 'the next page asked');
    const q2 = ws.sent.at(-1);
    assert.deepEqual(q2, { type: 'presence', channel: 'room:w', id: q2.id, cursor: '7' });
    ws.deliver({ type: 'presence', channel: 'room:w', id: q2.id, connections: 3, users: 3, members: [member('w')], cursor: null });
    await eventually(() => changes.some(([type]) => type === 'reset'), 'the list read');
    assert.deepEqual(watch.members.map((m) => m.user).sort(), ['w', 'x', 'z']);
    assert.deepEqual(changes, [
      ['join', ['x']],
      ['leave', ['x']],
      ['reset', ['z', 'w', 'x']],
    ]);
    watch.stop();

    // Asked while offline: sent with the next welcome, after the resubscribe.
    c.reconnect();
    await eventually(() => FakeWebSocket.last !== ws && FakeWebSocket.last.onmessage, 'the new socket');
    const next = FakeWebSocket.last;
    const asked = c.presence('room:w', { view: 'users', limit: 5 });
    next.deliver({ type: 'welcome', connection: 'r.1.2', user: null });
    assert.deepEqual(
      next.sent.map((f) => f.type),
      ['subscribe', 'presence']
    );
    const q3 = next.sent[1];
    assert.deepEqual(q3, { type: 'presence', channel: 'room:w', id: q3.id, view: 'users', limit: 5 });
    next.deliver({ type: 'presence', channel: 'room:w', id: q3.id, connections: 1, users: 1, members: [{ user: 'u', connections: 1 }], cursor: null });
    assert.deepEqual(await asked, { channel: 'room:w', connections: 1, users: 1, members: [{ user: 'u', connections: 1 }], cursor: null });

    // Lost with a connection: asked again on the next one, with the same id.
    const lost = c.presence('room:w');
    const q4 = next.sent.at(-1);
    c.reconnect();
    await eventually(() => FakeWebSocket.last !== next && FakeWebSocket.last.onmessage, 'the third socket');
    const third = FakeWebSocket.last;
    third.deliver({ type: 'welcome', connection: 'r.1.3', user: null });
    assert.deepEqual(third.sent.at(-1), q4);
    third.deliver({ type: 'error', id: q4.id, code: 'redis_unavailable', message: 'presence could not be read' });
    await assert.rejects(lost, (err) => err.code === 'redis_unavailable' && err.retryable && err.channel === 'room:w');
  });

  test('offsets compare within an epoch; backoff caps double up to the maximum', () => {
    assert.equal(compareOffsets('a:1-0', 'a:1-0'), 0);
    assert.ok(compareOffsets('a:2-0', 'a:1-9') > 0);
    assert.ok(compareOffsets('a:10-0', 'a:9-0') > 0, 'numeric, not textual');
    assert.ok(compareOffsets('a:1-1', 'a:1-0') > 0);
    assert.equal(compareOffsets('a:1-0', 'b:2-0'), null);
    assert.equal(compareOffsets('garbage', 'a:1-0'), null);
    const caps = [1, 2, 3, 4, 5, 6, 7].map((n) => backoff(n, 100, 1000, () => 0.999).capMs);
    assert.deepEqual(caps, [100, 200, 400, 800, 1000, 1000, 1000]);
    assert.equal(backoff(3, 100, 1000, () => 0.5).delayMs, 200);
    assert.equal(backoff(3, 100, 1000, () => 0).delayMs, 0);
  });
});
