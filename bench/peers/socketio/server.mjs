// socket.io 4.8 + @socket.io/redis-adapter (regular pub/sub adapter): the socket.io peer of the
// wsbridge benchmark. One process serves the socket.io WebSocket endpoint on --port and a small
// HTTP API on --api-port; instances sharing one Redis route messages to each other.
//
//   node server.mjs --port 4001 --api-port 4101 --redis redis://127.0.0.1:6379
//   (or WS_PORT / API_PORT / REDIS_URL; --host / HOST, default 127.0.0.1; port 0 = pick one)
//   --prefix wsbridge --streams chat[,...] --stream-max-len 100000: the inbound streams (below)
//
// permessage-deflate is off, as in socket.io's defaults. --deflate-threshold BYTES (or
// DEFLATE_THRESHOLD) turns it on: `perMessageDeflate: { threshold: BYTES }`, ws's other
// defaults kept (context takeover on both sides, window 15 bits, zlib level default).
// The default threshold is 1024 bytes, which a ~1 KiB message can fall under, so give it
// explicitly. ws (8.21, lib/sender.js) applies it only with server_no_context_takeover: with its
// defaults it compresses every frame, however small.
//
// Prints `listening ws=PORT api=PORT` on stdout once both ports listen and Redis is connected.
//
// Protocol (raw Engine.IO v4 over a plain WebSocket, no socket.io client needed):
//   ws://HOST:PORT/socket.io/?EIO=4&transport=websocket
//   <- 0{"sid":...,"pingInterval":25000,...}    -> 40    <- 40{"sid":"<socket id>"}
//   -> 42["subscribe","<room>"]                  <- 42["subscribed","<room>"]
//   <- 42["message",<data>]                      (from POST /send)
//   -> 42<k>["send",{"stream":"chat","id":N,"data":<json>}]   (emit with an ack callback)
//                                                <- 43<k>[{"entry":"<stream entry id>"}]
//      The handler XADDs the message to <prefix>:in:<stream> (MAXLEN ~ --stream-max-len) with
//      wsbridge's entry fields, then calls the ack: the seeds' inbound path. No dedupe: a resend
//      is stored again. Bad input or a failed XADD: 43<k>[{"error":CODE,"message":...}].
//   -> 42["send",{"id":N,...}]                   <- 42["ack",N]   (id missing: null)
//      (no ack callback: acked WITHOUT storing anything, for the fan-out checks in verify.mjs)
//   <- 2 (ping, every pingInterval)               -> 3 (pong; the client must answer)
// HTTP API:
//   POST /send  {"to":{"channel":"room"}|{"connection":"<sid>"}|{"all":true},"data":<json>}
//               or an array of those  -> 202 {"accepted":N}; 400 {"error":...} if anything is bad
//               (nothing is sent then). Other fields and auth headers are ignored.
//   GET /healthz -> 200 ok

import http from "node:http";
import { parseArgs } from "node:util";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const { values: args } = parseArgs({
  options: {
    port: { type: "string" },
    "api-port": { type: "string" },
    redis: { type: "string" },
    host: { type: "string" },
    "deflate-threshold": { type: "string" },
    prefix: { type: "string" },
    streams: { type: "string" },
    "stream-max-len": { type: "string" },
  },
  strict: true,
});

const host = args.host ?? process.env.HOST ?? "127.0.0.1";
const wsPort = Number(args.port ?? process.env.WS_PORT ?? 4001);
const apiPort = Number(args["api-port"] ?? process.env.API_PORT ?? 4101);
const redisUrl = args.redis ?? process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
const MAX_BODY = 16 * 1024 * 1024;
const deflateThreshold = args["deflate-threshold"] ?? process.env.DEFLATE_THRESHOLD;
// Inbound stream keys and fields as wsbridge writes them (docs/consuming.md): the key
// <prefix>:in:<stream>, only for the streams listed (comma-separated), trimmed MAXLEN ~ N.
const prefix = args.prefix ?? "wsbridge";
const streams = new Set((args.streams ?? "chat").split(","));
const streamMaxLen = Number(args["stream-max-len"] ?? 100000);
const replica = `sio-${process.pid}`;

function fail(msg) {
  console.error(`server.mjs: ${msg}`);
  process.exit(1);
}
if (!Number.isInteger(wsPort) || wsPort < 0 || wsPort > 65535) fail(`bad --port ${wsPort}`);
if (!Number.isInteger(apiPort) || apiPort < 0 || apiPort > 65535) fail(`bad --api-port ${apiPort}`);
if (deflateThreshold !== undefined && !(Number.isInteger(Number(deflateThreshold)) && Number(deflateThreshold) >= 0)) {
  fail(`bad --deflate-threshold ${deflateThreshold}`);
}
if ([...streams].some((name) => name === "" || /\s/.test(name))) {
  fail(`bad --streams ${args.streams}: names must be non-empty and without spaces`);
}
if (!(Number.isInteger(streamMaxLen) && streamMaxLen > 0)) fail(`bad --stream-max-len ${args["stream-max-len"]}`);
const perMessageDeflate = deflateThreshold === undefined ? false : { threshold: Number(deflateThreshold) };

// --- Redis: one client publishes, a duplicate subscribes (what createAdapter wants). ---
const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();
for (const [name, c] of [["pub", pubClient], ["sub", subClient]]) {
  c.on("error", (err) => console.error(`redis ${name} client: ${err?.message ?? err}`));
}
try {
  await Promise.all([pubClient.connect(), subClient.connect()]);
} catch (err) {
  fail(`cannot connect to ${redisUrl}: ${err?.message ?? err}`);
}

// --- socket.io: defaults except websocket only and no permessage-deflate (unless asked). ---
const wsServer = http.createServer();
const io = new Server(wsServer, {
  transports: ["websocket"],
  perMessageDeflate,
  serveClient: false,
  adapter: createAdapter(pubClient, subClient),
});

io.on("connection", (socket) => {
  socket.on("subscribe", async (room) => {
    if (typeof room !== "string" || room === "") return;
    await socket.join(room);
    socket.emit("subscribed", room);
  });
  socket.on("unsubscribe", async (room) => {
    if (typeof room !== "string") return;
    await socket.leave(room);
    socket.emit("unsubscribed", room);
  });
  socket.on("send", async (data, ack) => {
    if (typeof ack !== "function") {
      const id = data !== null && typeof data === "object" && "id" in data ? data.id : null;
      socket.emit("ack", id ?? null);
      return;
    }
    // The seeds' inbound handler: append to the stream, then ack with the entry id.
    if (data === null || typeof data !== "object" || Array.isArray(data) || !("data" in data)) {
      return ack({ error: "bad_frame", message: 'expected {"stream":S,"id":ID,"data":ANY}' });
    }
    const stream = data.stream ?? "chat";
    if (!streams.has(stream)) {
      return ack({ error: "stream_not_allowed", message: `stream ${JSON.stringify(stream)} is not one of --streams` });
    }
    try {
      const entry = await pubClient.xAdd(
        `${prefix}:in:${stream}`,
        "*",
        {
          connection: socket.id,
          user: "",
          data: JSON.stringify(data.data),
          encoding: "json",
          id: data.id === undefined || data.id === null ? "" : String(data.id),
          replica,
          ts: String(Date.now()),
        },
        { TRIM: { strategy: "MAXLEN", strategyModifier: "~", threshold: streamMaxLen } },
      );
      ack({ entry });
    } catch (err) {
      ack({ error: "redis_unavailable", message: String(err?.message ?? err) });
    }
  });
});

// --- HTTP API ---
function reply(res, status, body) {
  const text = typeof body === "string" ? body : JSON.stringify(body);
  res.writeHead(status, {
    "content-type": typeof body === "string" ? "text/plain" : "application/json",
    "content-length": Buffer.byteLength(text),
  });
  res.end(text);
}

// Returns [emit thunks] or throws a message.
function plan(body) {
  const items = Array.isArray(body) ? body : [body];
  return items.map((item, i) => {
    const where = Array.isArray(body) ? `item ${i}: ` : "";
    if (item === null || typeof item !== "object" || Array.isArray(item)) {
      throw `${where}expected an object {"to":...,"data":...}`;
    }
    const { to } = item;
    if (!("data" in item)) throw `${where}missing "data"`;
    const data = item.data;
    if (to === null || typeof to !== "object" || Array.isArray(to)) {
      throw `${where}"to" must be an object`;
    }
    if (typeof to.channel === "string" && to.channel !== "") {
      return () => io.to(to.channel).emit("message", data);
    }
    if (typeof to.connection === "string" && to.connection !== "") {
      return () => io.to(to.connection).emit("message", data);
    }
    if (to.all === true) {
      return () => io.emit("message", data);
    }
    throw `${where}"to" must be {"channel":s}, {"connection":s} or {"all":true}`;
  });
}

const apiServer = http.createServer((req, res) => {
  const path = (req.url ?? "/").split("?")[0];
  if (path === "/healthz" && (req.method === "GET" || req.method === "HEAD")) {
    return reply(res, 200, "ok\n");
  }
  if (path !== "/send") return reply(res, 404, { error: "not found" });
  if (req.method !== "POST") return reply(res, 405, { error: "POST only" });

  const chunks = [];
  let size = 0;
  let tooBig = false;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY) tooBig = true;
    else chunks.push(chunk);
  });
  req.on("end", () => {
    if (tooBig) return reply(res, 413, { error: "body too large" });
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (err) {
      return reply(res, 400, { error: `bad JSON: ${err.message}` });
    }
    let sends;
    try {
      sends = plan(body);
    } catch (msg) {
      return reply(res, 400, { error: String(msg) });
    }
    try {
      for (const send of sends) send();
    } catch (err) {
      return reply(res, 500, { error: String(err?.message ?? err) });
    }
    reply(res, 202, { accepted: sends.length });
  });
  req.on("error", () => res.destroy());
});
apiServer.keepAliveTimeout = 65_000;

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      server.off("error", reject);
      resolve(server.address().port);
    });
  });
}

let ws, api;
try {
  ws = await listen(wsServer, wsPort);
  api = await listen(apiServer, apiPort);
} catch (err) {
  fail(`listen: ${err?.message ?? err}`);
}
if (perMessageDeflate) console.error(`server.mjs: permessage-deflate on, threshold ${perMessageDeflate.threshold} bytes`);
console.log(`listening ws=${ws} api=${api}`);

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  const force = setTimeout(() => process.exit(0), 3000);
  force.unref();
  try {
    apiServer.close();
    apiServer.closeAllConnections?.();
    io.close();
    await Promise.allSettled([pubClient, subClient].map((c) => (c.close ?? c.quit).call(c)));
  } finally {
    console.error(`server.mjs: stopped (${signal})`);
    process.exit(0);
  }
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
