// The JavaScript client (examples/js/wsbridge-client.mjs) against a real redis-server and real
// gateway replicas. Run: node --experimental-websocket --test tests/js/ (after `cargo build`).

import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { WsBridgeClient, WsBridgeError, backoff, compareOffsets } from '../../examples/js/wsbridge-client.mjs';
import { deadline, eventually, freePort, killAll, record, startGateway, startRedis, token, uniquePrefix } from './harness.mjs';

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
