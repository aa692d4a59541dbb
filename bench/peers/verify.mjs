// Checks the benchmark peers end to end, speaking exactly what the load generator speaks.
// Run through verify.sh (which starts Redis and two instances of each peer); or by hand with
// the env vars below pointing at running instances (Node 20: node --experimental-websocket).
//
//   SIO_A_WS, SIO_A_API, SIO_B_WS, SIO_B_API   ports of two socket.io instances (same Redis)
//   REDIS_PORT                                 that Redis (for the stored-send checks; redis-cli)
//   NCHAN_A, NCHAN_B                           ports of two nchan instances (same Redis)
// A peer whose ports are not set is skipped. Prints one line per check and, last,
// `N passed, N failed`; exits 1 if anything failed.

import { execFileSync } from "node:child_process";

const env = process.env;
let passed = 0;
let failed = 0;

function check(name, ok, detail = "") {
  if (ok) {
    passed++;
    console.log(`ok    ${name}`);
  } else {
    failed++;
    console.log(`FAIL  ${name}${detail ? `: ${detail}` : ""}`);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A WebSocket whose text frames queue up; `next` takes the next one (or null on timeout).
class Client {
  constructor(url, { socketio = false } = {}) {
    this.url = url;
    this.socketio = socketio;
    this.queue = [];
    this.waiters = [];
    this.binary = 0;
    this.closed = false;
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => {
      this.ws.onopen = resolve;
      this.ws.onerror = (e) => reject(new Error(`${url}: ${e.message ?? "websocket error"}`));
    });
    this.ws.onmessage = (e) => {
      if (typeof e.data !== "string") {
        this.binary++;
        return;
      }
      // Engine.IO ping: answer and hide it from the checks.
      if (this.socketio && e.data === "2") {
        this.ws.send("3");
        return;
      }
      const w = this.waiters.shift();
      if (w) w(e.data);
      else this.queue.push(e.data);
    };
    this.ws.onclose = () => {
      this.closed = true;
    };
  }
  send(text) {
    this.ws.send(text);
  }
  next(timeoutMs = 3000) {
    if (this.queue.length) return Promise.resolve(this.queue.shift());
    return new Promise((resolve) => {
      const w = (v) => {
        clearTimeout(t);
        resolve(v);
      };
      const t = setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        resolve(null);
      }, timeoutMs);
      this.waiters.push(w);
    });
  }
  // Frames that arrive within ms (none expected, usually).
  async drain(ms) {
    await sleep(ms);
    const got = this.queue;
    this.queue = [];
    return got;
  }
  close() {
    try {
      this.ws.close();
    } catch {}
  }
}

async function post(port, path, body, contentType = "application/json") {
  const r = await fetch(`http://127.0.0.1:${port}${path}`, {
    method: "POST",
    headers: { "content-type": contentType },
    body,
  });
  return { status: r.status, text: await r.text() };
}

async function get(port, path) {
  const r = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: r.status, text: await r.text() };
}

// ---------------------------------------------------------------- socket.io

async function sioConnect(wsPort, room) {
  const c = new Client(`ws://127.0.0.1:${wsPort}/socket.io/?EIO=4&transport=websocket`, {
    socketio: true,
  });
  await c.opened;
  const open = await c.next();
  c.openPacket = open;
  c.send("40");
  const connected = await c.next();
  c.connectedPacket = connected;
  try {
    c.sid = JSON.parse(connected.slice(2)).sid;
  } catch {
    c.sid = null;
  }
  if (room !== undefined) {
    c.send("42" + JSON.stringify(["subscribe", room]));
    c.subscribedPacket = await c.next();
  }
  return c;
}

async function socketio() {
  const aWs = env.SIO_A_WS, aApi = env.SIO_A_API, bWs = env.SIO_B_WS, bApi = env.SIO_B_API;
  if (!aWs || !aApi || !bWs || !bApi) {
    console.log("skip  socket.io (SIO_A_WS/SIO_A_API/SIO_B_WS/SIO_B_API not set)");
    return;
  }
  console.log("# socket.io");
  for (const port of [aApi, bApi]) {
    const h = await get(port, "/healthz");
    check(`sio GET /healthz on api port ${port} -> 200`, h.status === 200, `${h.status}`);
  }

  const a1 = await sioConnect(aWs, "room-1");
  check(
    "sio open packet 0{...} with sid, upgrades [] (websocket only), pingInterval 25000",
    (() => {
      if (!a1.openPacket?.startsWith("0{")) return false;
      const o = JSON.parse(a1.openPacket.slice(1));
      return typeof o.sid === "string" && Array.isArray(o.upgrades) && o.upgrades.length === 0 &&
        o.pingInterval === 25000;
    })(),
    a1.openPacket,
  );
  check(
    'sio "40" answered with 40{"sid":"..."}',
    /^40\{"sid":"[^"]+"\}$/.test(a1.connectedPacket ?? ""),
    a1.connectedPacket,
  );
  check(
    'sio 42["subscribe","room-1"] -> exactly 42["subscribed","room-1"]',
    a1.subscribedPacket === '42["subscribed","room-1"]',
    a1.subscribedPacket,
  );
  const a2 = await sioConnect(aWs, "room-2"); // other room, same instance
  const b1 = await sioConnect(bWs, "room-1"); // same room, other instance
  const a3 = await sioConnect(aWs); // connected, in no room

  // Channel, published on B, received on A (and B), not by the others.
  let r = await post(bApi, "/send", JSON.stringify({ to: { channel: "room-1" }, data: { n: 1, s: "x" } }));
  check('sio POST B /send {"to":{"channel"}} -> 202 {"accepted":1}', r.status === 202 && r.text === '{"accepted":1}', `${r.status} ${r.text}`);
  let m = await a1.next();
  check('sio client on A gets exactly 42["message",{"n":1,"s":"x"}] (cross-instance)', m === '42["message",{"n":1,"s":"x"}]', m);
  m = await b1.next();
  check("sio client on B in the same room gets it too", m === '42["message",{"n":1,"s":"x"}]', m);
  let stray = [...(await a2.drain(300)), ...(await a3.drain(0))];
  check("sio clients not in the room get nothing", stray.length === 0, JSON.stringify(stray));

  // Connection (sid), published on B to a socket on A.
  r = await post(bApi, "/send", JSON.stringify({ to: { connection: a3.sid }, data: "direct" }));
  check('sio POST B /send {"to":{"connection":sid}} -> 202', r.status === 202 && r.text === '{"accepted":1}', `${r.status} ${r.text}`);
  m = await a3.next();
  check('sio socket on A addressed by sid gets 42["message","direct"]', m === '42["message","direct"]', m);
  stray = [...(await a1.drain(300)), ...(await a2.drain(0)), ...(await b1.drain(0))];
  check("sio other sockets get nothing from a direct send", stray.length === 0, JSON.stringify(stray));

  // Array body with all + channel; data of several JSON kinds.
  r = await post(
    aApi,
    "/send",
    JSON.stringify([
      { to: { all: true }, data: [1, "two", null, { three: 3 }] },
      { to: { channel: "room-2" }, data: null },
      { to: { channel: "room-2" }, data: 12.5 },
    ]),
  );
  check("sio POST A /send [all, channel, channel] -> 202 {\"accepted\":3}", r.status === 202 && r.text === '{"accepted":3}', `${r.status} ${r.text}`);
  const allMsg = '42["message",[1,"two",null,{"three":3}]]';
  const gotAll = await Promise.all([a1, a2, b1, a3].map((c) => c.next()));
  check("sio {\"all\":true} reaches every socket on both instances", gotAll.every((g) => g === allMsg), JSON.stringify(gotAll));
  const r2 = [await a2.next(), await a2.next()];
  check("sio null and number data arrive as 42[\"message\",null], 42[\"message\",12.5]", r2[0] === '42["message",null]' && r2[1] === '42["message",12.5]', JSON.stringify(r2));

  // Client send -> ack.
  a1.send('42["send",{"id":7,"data":{"x":1}}]');
  m = await a1.next();
  check('sio 42["send",{"id":7,...}] -> 42["ack",7]', m === '42["ack",7]', m);
  a1.send('42["send","no id"]');
  m = await a1.next();
  check('sio 42["send","no id"] -> 42["ack",null]', m === '42["ack",null]', m);

  // Client send with an ack callback (the seeds' inbound path): stored in the stream, then acked.
  if (env.REDIS_PORT) {
    a1.send('4211["send",{"stream":"chat","id":8,"data":{"x":2}}]');
    m = await a1.next();
    const entry = /^4311\[\{"entry":"(\d+-\d+)"\}\]$/.exec(m ?? "")?.[1];
    check('sio 4211["send",{"stream":"chat","id":8,...}] -> 4311[{"entry":...}]', entry !== undefined, m);
    const stored = execFileSync("redis-cli", ["-p", env.REDIS_PORT, "xrange", "wsbridge:in:chat", entry ?? "0", entry ?? "0"])
      .toString().trim().split("\n");
    const fields = Object.fromEntries(stored.slice(1).reduce((acc, v, i) => (i % 2 ? acc[acc.length - 1].push(v) : acc.push([v]), acc), []));
    check(
      "sio the acked entry is in wsbridge:in:chat with wsbridge's fields",
      fields.data === '{"x":2}' && fields.id === "8" && fields.encoding === "json" && fields.user === "" &&
        fields.connection !== undefined && fields.replica !== undefined && /^\d+$/.test(fields.ts ?? ""),
      JSON.stringify(stored),
    );
    a1.send('4212["send",{"stream":"other","id":9,"data":1}]');
    m = await a1.next();
    check('sio a send to a stream not in --streams -> 4312[{"error":"stream_not_allowed",...}]', m?.startsWith('4312[{"error":"stream_not_allowed"'), m);
    a1.send('4213["send",{"id":10}]');
    m = await a1.next();
    check('sio a send without data -> 4313[{"error":"bad_frame",...}]', m?.startsWith('4313[{"error":"bad_frame"'), m);
  }

  // Bad requests.
  r = await post(aApi, "/send", "{not json");
  check("sio POST /send bad JSON -> 400", r.status === 400, `${r.status} ${r.text}`);
  r = await post(aApi, "/send", JSON.stringify([{ to: { channel: "room-1" }, data: 1 }, { to: { user: "u" }, data: 1 }]));
  check('sio POST /send with {"to":{"user"}} -> 400, nothing sent', r.status === 400, `${r.status} ${r.text}`);
  r = await post(aApi, "/send", JSON.stringify({ to: { channel: "room-1" } }));
  check("sio POST /send without data -> 400", r.status === 400, `${r.status} ${r.text}`);
  stray = await a1.drain(300);
  check("sio nothing delivered from rejected bodies", stray.length === 0, JSON.stringify(stray));

  // Burst: many messages across instances, none lost, in order.
  const N = 2000;
  const batches = 20;
  const per = N / batches;
  const results = [];
  for (let b = 0; b < batches; b++) {
    const items = [];
    for (let i = 0; i < per; i++) items.push({ to: { channel: "room-1" }, data: { seq: b * per + i } });
    results.push(await post(bApi, "/send", JSON.stringify(items))); // one after another: ordered
  }
  check(`sio burst: ${batches} POSTs of ${per} on B accepted`, results.every((x) => x.status === 202 && x.text === `{"accepted":${per}}`));
  for (const [name, c] of [["A", a1], ["B", b1]]) {
    const seqs = [];
    for (let i = 0; i < N; i++) {
      const f = await c.next(5000);
      if (f === null) break;
      const mm = /^42\["message",\{"seq":(\d+)\}\]$/.exec(f);
      seqs.push(mm ? Number(mm[1]) : f);
    }
    const inOrder = seqs.length === N && seqs.every((s, i) => s === i);
    check(`sio burst: client on ${name} got all ${N} messages in order`, inOrder, `got ${seqs.length}`);
  }

  for (const c of [a1, a2, a3, b1]) c.close();
}

// ---------------------------------------------------------------- nchan

async function nchanSub(port, channel) {
  const c = new Client(`ws://127.0.0.1:${port}/sub/${channel}`);
  await c.opened;
  // The WebSocket is open before nchan has the Redis subscription: give it a moment.
  await sleep(200);
  return c;
}

async function nchan() {
  const A = env.NCHAN_A, B = env.NCHAN_B;
  if (!A || !B) {
    console.log("skip  nchan (NCHAN_A/NCHAN_B not set)");
    return;
  }
  console.log("# nchan");
  for (const port of [A, B]) {
    const h = await get(port, "/healthz");
    check(`nchan GET /healthz on ${port} -> 200`, h.status === 200, `${h.status}`);
  }
  const tag = Date.now().toString(36);
  const ch = `v-${tag}`;
  const other = `w-${tag}`;
  const a1 = await nchanSub(A, ch);
  const b1 = await nchanSub(B, ch);
  const a2 = await nchanSub(A, other);

  let r = await post(B, `/pub/${ch}`, '{"n":1}');
  check("nchan POST B /pub/<ch> -> 201/202", r.status === 201 || r.status === 202, `${r.status} ${r.text}`);
  let m = await a1.next();
  check('nchan subscriber on A gets exactly {"n":1} (cross-instance)', m === '{"n":1}', m);
  m = await b1.next();
  check("nchan subscriber on B gets it too", m === '{"n":1}', m);
  let stray = await a2.drain(300);
  check("nchan subscriber of another channel gets nothing", stray.length === 0, JSON.stringify(stray));
  check("nchan frames are text frames", a1.binary === 0 && b1.binary === 0);

  // Late subscriber: older messages are not replayed.
  const late = `late-${tag}`;
  for (const body of ['{"old":1}', '{"old":2}']) {
    r = await post(B, `/pub/${late}`, body);
    if (r.status !== 201 && r.status !== 202) check("nchan publish old messages", false, `${r.status}`);
  }
  const lateA = await nchanSub(A, late);
  const lateB = await nchanSub(B, late);
  const old = [...(await lateA.drain(700)), ...(await lateB.drain(0))];
  check("nchan late subscribers (A and B) get none of the 2 older messages", old.length === 0, JSON.stringify(old));
  r = await post(A, `/pub/${late}`, '{"new":1}');
  const lm = [await lateA.next(), await lateB.next()];
  check('nchan late subscribers then get the new message {"new":1} first', lm.every((x) => x === '{"new":1}'), JSON.stringify(lm));

  // Burst: sequential publishes on B, all received on A in order.
  const N = 500;
  let bad = 0;
  for (let i = 0; i < N; i++) {
    const x = await post(B, `/pub/${ch}`, `{"seq":${i}}`);
    if (x.status !== 201 && x.status !== 202) bad++;
  }
  check(`nchan burst: ${N} publishes on B accepted`, bad === 0, `${bad} refused`);
  for (const [name, c] of [["A", a1], ["B", b1]]) {
    const seqs = [];
    for (let i = 0; i < N; i++) {
      const f = await c.next(5000);
      if (f === null) break;
      const mm = /^\{"seq":(\d+)\}$/.exec(f);
      seqs.push(mm ? Number(mm[1]) : f);
    }
    check(`nchan burst: subscriber on ${name} got all ${N} in order`, seqs.length === N && seqs.every((s, i) => s === i), `got ${seqs.length}`);
  }
  for (const c of [a1, b1, a2, lateA, lateB]) c.close();
}

try {
  await socketio();
  await nchan();
} catch (err) {
  check("no exception", false, err?.stack ?? String(err));
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
