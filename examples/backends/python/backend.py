#!/usr/bin/env python3
"""A small chat and whiteboard backend for wsbridge, in Python (redis-py).

It reads one inbound stream, `<prefix>:in:<stream>` (`chat` by default), with a Redis consumer
group, as every wsbridge backend does, and answers through the gateway's backend API
(`POST /send`). examples/backends/README.md specifies the messages; in short:

- `data` with a "board" key is for the whiteboard (examples/whiteboard, stream `board`): a
  "stroke" is stored in the hash `<prefix>:whiteboard:<board>` and published to the channel
  `board:<board>`; "load": true sends the stored strokes to the asking connection;
- `data` with a non-empty string "channel" and a "text": the message goes to every subscriber of
  that channel as {"from": <user, or connection when anonymous>, "text": TEXT};
- anything else is echoed to the sending connection as {"echo": DATA}.

An entry is acknowledged (XACK) only after the gateway accepted the reply (202). When the gateway
answers 5xx (503: Redis did not take it) or 429, or cannot be reached, the entry stays pending and
is retried after a backoff, before any newer entry. A 400 or 413 means the reply itself can never
be taken: it is logged and acknowledged (dropped). Any other answer (401 wrong key, 404 wrong URL)
is a misconfiguration: the backend exits with status 1 without acknowledging, leaving the entry
to a correctly configured instance. A group this backend creates starts at the beginning of the
stream, as the gateway's own groups do, so no stored entry is skipped.

Backends that crash. Run as many instances as you like, each with its own consumer name (the
default is unique per process). An entry that an instance read but did not acknowledge stays in
the group's pending list under its name. At start, and then every --reclaim-every-ms (half of
--claim-idle-ms by default), each instance takes over (XAUTOCLAIM) the entries that have been
pending for more than --claim-idle-ms (60 s) -- those of an instance that died or hangs -- and
handles them before newer entries. On the same tick a live instance refreshes the idle time of
the entries it still holds (XCLAIM to itself), so that nobody takes over work it is retrying.

Entries that can never be handled. Redis counts every delivery of a pending entry (XPENDING shows
the count). An entry whose handler raised is delivered again after a backoff; an entry that is
still pending after --max-deliveries deliveries (5) -- its handler failed, or the instances that
read it crashed, that many times -- is not handed to the handler again: it is moved to the
dead-letter stream `{<prefix>:in:<stream>}:dead` (e.g. `{wsbridge:in:chat}:dead`) with its
original fields plus `original_id`, `deliveries` and `reason`, and logged. One Lua script adds it
there and acknowledges it, so it is never in both places or in neither; the braces put the
dead-letter stream in the inbound stream's hash slot, so this holds on a Redis Cluster too.
Retrying a reply the gateway could not take for now (503, unreachable) does not count as a
delivery, so an outage of the gateway does not dead-letter the backlog. Nothing trims the
dead-letter stream: inspect it with XRANGE, and XDEL what you have dealt with.

Redis Cluster. With --redis-cluster (or REDIS_CLUSTER=1), REDIS_URL is a comma-separated list of
cluster nodes to start from (redis://127.0.0.1:7000,redis://127.0.0.1:7001,...) and the backend
uses redis-py's RedisCluster. Every command names one key, or two in one slot (the dead-letter
script). The blocking XREADGROUP has a client, and so a connection, of its own -- on a single
Redis too -- so it does not hold up the other commands, and a read cut short by a signal leaves
nothing half-read behind for them.

Redis Sentinel. With --redis-sentinel MASTER (or REDIS_SENTINEL=MASTER), REDIS_URL is a
comma-separated list of the Sentinels (redis://127.0.0.1:26379,...) and the backend uses redis-py's
Sentinel client, master_for(MASTER): each new connection asks the Sentinels for the primary, and a
connection to a node that was demoted (READONLY) is dropped. After a failover the backend sees a
connection error, waits a second and carries on against the new primary; an entry it handled but
could not acknowledge stays pending and is handled again (at least once). The Sentinels' own
credentials come from the first URL; the data nodes' from REDIS_PASSWORD / REDIS_USERNAME.

Run it (needs `pip install -r examples/backends/python/requirements.txt`):

    python3 examples/backends/python/backend.py                  # the chat
    python3 examples/backends/python/backend.py --stream board   # the whiteboard

Settings come from flags, or from the environment: REDIS_URL (redis://127.0.0.1:6379),
REDIS_CLUSTER (off; 1 = --redis-cluster), REDIS_SENTINEL (off; a master name = --redis-sentinel),
WSBRIDGE_API (http://127.0.0.1:8081), WSBRIDGE_API_KEY
(none), PREFIX (wsbridge), STREAM (chat), GROUP (backend), CONSUMER (<hostname>-<pid>). `--max N`
exits after handling N entries.

Two flags exist for tests and demonstrations: `--fail-on TEXT` makes the handler raise on every
chat message whose text is TEXT (a message it can never handle), and `--work-ms MS` spends MS
milliseconds on each entry before replying (so that a killed instance dies holding work).
"""

import argparse
import base64
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel
from redis.exceptions import ClusterError, RedisClusterException

try:
    import msgpack
except ImportError:  # MessagePack entries are then echoed as base64.
    msgpack = None


def log(message):
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} backend: {message}", flush=True)


class Shutdown(BaseException):
    """Raised by the signal handler to break out of a blocking XREADGROUP."""


class Stop(Exception):
    """The backend must stop; the message says why, the code is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Transient(Exception):
    """The reply was not taken this time (gateway down, 5xx): leave the entry pending."""


# Redis failing, or a node of the cluster: not the entry's fault; the backend reconnects and
# carries on. A cluster client raises ClusterError while the cluster is down (a failover), and
# RedisClusterException when it reaches none of its nodes.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ClusterError, RedisClusterException)


def settings():
    env = os.environ.get
    p = argparse.ArgumentParser(description="wsbridge chat and whiteboard backend (Python)")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379"),
                   help="with --redis-cluster: the cluster nodes to start from, comma-separated")
    p.add_argument("--redis-cluster", action="store_true",
                   default=env("REDIS_CLUSTER", "").lower() in ("1", "true", "yes"),
                   help="Redis is a Redis Cluster (REDIS_CLUSTER=1)")
    p.add_argument("--redis-sentinel", default=env("REDIS_SENTINEL") or None, metavar="MASTER",
                   help="--redis-url lists Sentinels; use the primary of MASTER (REDIS_SENTINEL)")
    p.add_argument("--api", default=env("WSBRIDGE_API", "http://127.0.0.1:8081"),
                   help="the gateway's backend API (any replica)")
    p.add_argument("--api-key", default=env("WSBRIDGE_API_KEY") or None)
    p.add_argument("--prefix", default=env("PREFIX", "wsbridge"))
    p.add_argument("--stream", default=env("STREAM", "chat"))
    p.add_argument("--group", default=env("GROUP", "backend"))
    p.add_argument("--consumer", default=env("CONSUMER") or f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--block-ms", type=int, default=5000, help="XREADGROUP BLOCK")
    p.add_argument("--claim-idle-ms", type=int, default=60000,
                   help="take over entries other consumers left pending longer than this")
    p.add_argument("--reclaim-every-ms", type=int, default=None,
                   help="how often to look for such entries (default: half of --claim-idle-ms)")
    p.add_argument("--max-deliveries", type=int, default=5, metavar="N",
                   help="dead-letter an entry still pending after N deliveries")
    p.add_argument("--max", type=int, default=None, metavar="N",
                   help="exit after handling N entries")
    p.add_argument("--fail-on", default=None, metavar="TEXT",
                   help="test hook: the handler raises on chat messages with this text")
    p.add_argument("--work-ms", type=int, default=0, metavar="MS",
                   help="test hook: simulated work per entry, before replying")
    a = p.parse_args()
    if a.max_deliveries < 1:
        p.error("--max-deliveries must be at least 1")
    if a.redis_cluster and a.redis_sentinel:
        p.error("--redis-cluster and --redis-sentinel exclude each other")
    if "," in a.redis_url and not (a.redis_cluster or a.redis_sentinel):
        p.error("--redis-url lists several nodes: add --redis-cluster (REDIS_CLUSTER=1) or "
                "--redis-sentinel MASTER")
    if a.reclaim_every_ms is None:
        a.reclaim_every_ms = a.claim_idle_ms // 2
    a.reclaim_every_ms = max(a.reclaim_every_ms, 100)
    a.api = a.api.rstrip("/")
    a.key = f"{a.prefix}:in:{a.stream}"
    a.dead_key = f"{{{a.key}}}:dead"  # {<prefix>:in:<stream>}:dead, in the hash slot of a.key
    return a


def to_json_value(v):
    """Makes a decoded MessagePack value JSON-serialisable (bytes become base64 text)."""
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    # Before tuples: an ExtType is a tuple. A timestamp is extension type -1.
    if msgpack is not None and isinstance(v, msgpack.ExtType):
        return {"ext": v.code, "data": base64.b64encode(v.data).decode()}
    if msgpack is not None and isinstance(v, msgpack.Timestamp):
        return {"ext": -1, "data": base64.b64encode(v.to_bytes()).decode()}
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k if isinstance(k, str) else json.dumps(to_json_value(k)): to_json_value(x)
                for k, x in v.items()}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None  # NaN and infinities have no JSON form
    return v


def decode_data(fields):
    """The entry's `data` as a Python value."""
    raw = fields.get(b"data", b"null")
    if fields.get(b"encoding", b"json") == b"msgpack":
        if msgpack is None:
            return {"msgpack_base64": base64.b64encode(raw).decode()}
        try:
            return to_json_value(msgpack.unpackb(raw, raw=False, strict_map_key=False))
        except Exception:  # not valid MessagePack, or non-UTF-8 strings: echo the bytes
            return {"msgpack_base64": base64.b64encode(raw).decode()}
    try:
        return json.loads(raw)
    except ValueError:  # the gateway only stores valid JSON; be lenient anyway
        return raw.decode("utf-8", "replace")


BOARD_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
COLOR = re.compile(r"#[0-9a-fA-F]{6}")
MAX_POINTS = 500
SNAPSHOT_STROKES = 100


def is_number(v, low, high):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


def stroke_error(stroke):
    """What is wrong with a whiteboard stroke, or None when it is well formed."""
    if not isinstance(stroke, dict):
        return "stroke must be an object"
    sid = stroke.get("id")
    if not isinstance(sid, str) or not 1 <= len(sid) <= 64:
        return "stroke.id must be a string of 1 to 64 characters"
    if not isinstance(stroke.get("color"), str) or not COLOR.fullmatch(stroke["color"]):
        return 'stroke.color must be "#rrggbb"'
    if not is_number(stroke.get("width"), 1, 50):
        return "stroke.width must be a number from 1 to 50"
    points = stroke.get("points")
    if not isinstance(points, list) or not 1 <= len(points) <= MAX_POINTS:
        return f"stroke.points must be a list of 1 to {MAX_POINTS} points"
    for point in points:
        if not (isinstance(point, list) and len(point) == 2
                and all(is_number(c, 0, 1) for c in point)):
            return "every point must be [x, y] with numbers from 0 to 1"
    return None


def seq_key(stroke):
    """Sorts strokes by `seq`, a stream entry id "<ms>-<n>"."""
    ms, _, n = stroke.get("seq", "0-0").partition("-")
    return int(ms), int(n or 0)


def board_work(r, cfg, entry_id, who, connection, data):
    """The whiteboard: stores a stroke and publishes it to the board's channel, or sends the
    board so far to the asking connection. Returns the /send bodies and a log description."""
    board = data["board"]
    if not isinstance(board, str) or not BOARD_NAME.fullmatch(board):
        error = "board must be 1 to 64 characters of A-Z a-z 0-9 _ -"
    elif "stroke" in data:
        error = stroke_error(data["stroke"])
        if error is None:
            stroke = dict(data["stroke"], seq=entry_id)
            # Idempotent: storing the same stroke again (a redelivery) changes nothing.
            r.hset(f"{cfg.prefix}:whiteboard:{board}", stroke["id"],
                   json.dumps(stroke, separators=(",", ":")))
            body = {"to": {"channel": f"board:{board}"},
                    "data": {"type": "stroke", "board": board, "stroke": stroke}}
            return [body], f"board {board} stroke {stroke['id']} from {who}"
    elif data.get("load") is True:
        stored = r.hvals(f"{cfg.prefix}:whiteboard:{board}")
        strokes = sorted((json.loads(s) for s in stored), key=seq_key)
        chunks = [strokes[i:i + SNAPSHOT_STROKES]
                  for i in range(0, len(strokes), SNAPSHOT_STROKES)] or [[]]
        bodies = [{"to": {"connection": connection},
                   "data": {"type": "snapshot", "board": board, "strokes": chunk,
                            "last": i == len(chunks) - 1}}
                  for i, chunk in enumerate(chunks)]
        return bodies, f"board {board} load for {connection}"
    else:
        error = 'a board message needs "stroke" or "load": true'
    body = {"to": {"connection": connection},
            "data": {"type": "error", "board": board, "error": error}}
    return [body], f"board {board} error to {connection}"


def work_for(r, cfg, entry_id, fields):
    """Does the entry's work (the whiteboard stores strokes) and returns the /send bodies to
    post, in order, and a short description for the log."""
    connection = fields.get(b"connection", b"").decode()
    user = fields.get(b"user", b"").decode()
    who = user or connection
    data = decode_data(fields)
    if isinstance(data, dict) and "board" in data:
        return board_work(r, cfg, text_of(entry_id), who, connection, data)
    channel = data.get("channel") if isinstance(data, dict) else None
    if isinstance(channel, str) and channel and "text" in data:
        body = {"to": {"channel": channel}, "data": {"from": who, "text": data["text"]}}
        return [body], f"chat {channel} from {who}"
    return [{"to": {"connection": connection}, "data": {"echo": data}}], f"echo to {connection}"


def post_send(cfg, body):
    """POST /send; returns 202, or the 4xx status of a reply the gateway will never take.

    Raises Transient (retry later) or Stop (misconfigured: retrying cannot help)."""
    req = urllib.request.Request(
        cfg.api + "/send",
        data=json.dumps(body, separators=(",", ":")).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if cfg.api_key:
        req.add_header("Authorization", f"Bearer {cfg.api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace").strip()
        if e.code in (400, 413, 422):  # this reply is bad: dropping it is the only way forward
            return e.code
        if e.code in (408, 429) or e.code >= 500:
            raise Transient(f"{e.code} {detail}")
        if e.code in (401, 403):
            raise Stop(f"the gateway refused the API key ({e.code}): {detail}", 1)
        raise Stop(f"unexpected answer from {cfg.api}/send ({e.code}): {detail}", 1)
    except (urllib.error.URLError, OSError) as e:
        raise Transient(f"gateway unreachable: {getattr(e, 'reason', e)}")


def text_of(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def redis_client(cfg):
    """A client of the Redis, or the Redis Cluster, of the settings. A single Redis is reached
    on first use; a cluster client asks the nodes for the cluster's layout at once."""
    # The socket timeout outlasts the blocking read, so a silently dead link is noticed.
    options = dict(socket_connect_timeout=5, socket_timeout=cfg.block_ms / 1000 + 10)
    if cfg.redis_sentinel:
        urls = [urllib.parse.urlsplit(u.strip()) for u in cfg.redis_url.split(",") if u.strip()]
        sentinel_auth = {k: v for k, v in (("username", urls[0].username),
                                           ("password", urls[0].password)) if v}
        data_auth = {k: v for k, v in (("username", os.environ.get("REDIS_USERNAME")),
                                       ("password", os.environ.get("REDIS_PASSWORD"))) if v}
        sentinel = Sentinel([(u.hostname, u.port or 26379) for u in urls],
                            sentinel_kwargs=dict(socket_connect_timeout=1, socket_timeout=1,
                                                 **sentinel_auth))
        return sentinel.master_for(cfg.redis_sentinel, **options, **data_auth)
    if not cfg.redis_cluster:
        return redis.Redis.from_url(cfg.redis_url, **options)
    urls = [url.strip() for url in cfg.redis_url.split(",") if url.strip()]
    nodes = [ClusterNode(u.hostname, u.port or 6379) for u in map(urllib.parse.urlsplit, urls)]
    # The first URL also gives the scheme (rediss: TLS) and the credentials for every node.
    return RedisCluster(url=urls[0], startup_nodes=nodes, **options)


def raw_xautoclaim(client):
    """Makes XAUTOCLAIM ... JUSTID return what Redis sends: [next cursor, claimed ids, deleted
    ids] (redis-py keeps only the claimed ids).

    A cluster client parses a reply twice, with the callback of the node's own client and then
    with its own, so both are replaced. It creates node clients as it discovers nodes: call this
    before each round of XAUTOCLAIM."""
    def raw(response, **_options):
        return response
    client.set_response_callback("XAUTOCLAIM", raw)
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            client.get_redis_connection(node).set_response_callback("XAUTOCLAIM", raw)


# Moves an entry to the dead-letter stream: adds it there, then acknowledges it, in one script, so
# that it is never in both places or in neither. KEYS: the inbound stream, the dead-letter stream
# (one hash slot); ARGV: the group, the entry id, then the dead letter's fields as name, value, ...
DEAD_LETTER_LUA = """
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""


class Backend:
    def __init__(self, cfg):
        self.cfg = cfg
        # Created by connect(): one client for XREADGROUP, which blocks, so that it has a
        # connection of its own; one for everything else.
        self.reader = None
        self.r = None
        self.dead_letter_script = None
        self.handled = 0
        self.stopping = False
        self.in_read = False
        # Whether our own pending list may hold entries to (re)process: at start, after taking
        # over entries, and after a failed delivery.
        self.pending = True
        self.retry_at = 0.0
        self.backoff = 0.5  # seconds before retrying a failed delivery, doubled up to 30
        self.next_tick = 0.0  # when to refresh our entries and look for abandoned ones
        # The entry whose reply the gateway could not take for now: it is retried without being
        # delivered again, so that the retries do not count towards --max-deliveries.
        self.transient_id = None
        self.errors = {}  # entry id -> the last handler error, for the dead-letter `reason`

    def on_signal(self, signum, _frame):
        log(f"{signal.Signals(signum).name}: stopping")
        self.stopping = True
        if self.in_read:  # only a blocking read is interrupted; an entry in progress completes
            raise Shutdown()

    def connect(self):
        """Creates the clients, once. (A cluster client raises at once when it reaches no node.)"""
        if self.r is None:
            self.r = redis_client(self.cfg)
            self.dead_letter_script = self.r.register_script(DEAD_LETTER_LUA)
        if self.reader is None:
            self.reader = redis_client(self.cfg)

    def ensure_group(self):
        try:
            self.r.xgroup_create(self.cfg.key, self.cfg.group, id="0", mkstream=True)
            log(f"created group {self.cfg.group} on {self.cfg.key}")
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def reclaim(self):
        """Takes over entries that other (dead) consumers left pending too long.

        JUSTID: taking an entry over is not a delivery; reading it from our pending list is."""
        start, total, deleted = "0-0", 0, 0
        raw_xautoclaim(self.r)
        while True:
            reply = self.r.xautoclaim(self.cfg.key, self.cfg.group, self.cfg.consumer,
                                      self.cfg.claim_idle_ms, start_id=start, count=100,
                                      justid=True)
            start = reply[0]
            total += len(reply[1])
            deleted += len(reply[2]) if len(reply) > 2 else 0
            if start in (b"0-0", "0-0"):
                break
        if total:
            log(f"reclaimed {total} entries idle for more than {self.cfg.claim_idle_ms} ms")
            self.pending = True
        if deleted:
            log(f"{deleted} abandoned entries were deleted from the stream; dropped")

    def keep_fresh(self):
        """Resets the idle time of the entries we hold, so no other consumer takes them over
        while we work on them. The min-idle guard leaves alone an entry another consumer has
        just taken (its idle time is near 0)."""
        guard = self.cfg.reclaim_every_ms // 2
        mine = self.r.xpending_range(self.cfg.key, self.cfg.group, "-", "+", 100,
                                     consumername=self.cfg.consumer, idle=guard)
        if mine:
            self.r.xclaim(self.cfg.key, self.cfg.group, self.cfg.consumer, guard,
                          [p["message_id"] for p in mine], justid=True)

    def tick(self):
        """Every --reclaim-every-ms: keep our entries fresh, then take over abandoned ones."""
        now = time.monotonic()
        if now < self.next_tick:
            return
        self.next_tick = now + self.cfg.reclaim_every_ms / 1000
        self.keep_fresh()
        self.reclaim()

    def remaining(self):
        return None if self.cfg.max is None else self.cfg.max - self.handled

    def read(self, start, block, count=None):
        count = count or min(100, self.remaining() or 100)
        self.in_read = True
        try:
            if self.stopping:
                raise Shutdown()
            reply = self.reader.xreadgroup(self.cfg.group, self.cfg.consumer,
                                           {self.cfg.key: start}, count=count, block=block)
        finally:
            self.in_read = False
        if not reply:
            return []
        # RESP2: [[key, [(id, fields), ...]]]; RESP3: {key: [[(id, fields), ...]]}
        if isinstance(reply, dict):
            return [e for entries in reply.values() for batch in entries for e in batch]
        return [e for _key, entries in reply for e in entries]

    def check_fail_on(self, bodies):
        for body in bodies:
            data = body.get("data")
            if self.cfg.fail_on is not None and isinstance(data, dict) \
                    and data.get("text") == self.cfg.fail_on:
                raise RuntimeError(f"--fail-on {self.cfg.fail_on!r}: this handler cannot take it")

    def handle(self, entry_id, fields):
        """Returns True when the entry is done (acknowledged), False to keep it pending."""
        eid = text_of(entry_id)
        if fields is None:  # trimmed away while it was pending: nothing left to do
            self.r.xack(self.cfg.key, self.cfg.group, entry_id)
            log(f"{eid} was deleted from the stream; acknowledged")
            self.done(entry_id)
            return True
        what = "entry"
        try:
            bodies, what = work_for(self.r, self.cfg, entry_id, fields)
            self.check_fail_on(bodies)
            if self.cfg.work_ms:
                time.sleep(self.cfg.work_ms / 1000)
            # All of them again after a failure: a reply sent twice is harmless (the page
            # merges strokes by id), a reply never sent is not.
            status = 202
            for body in bodies:
                answer = post_send(self.cfg, body)
                if answer != 202:
                    status = answer
        except Transient as e:
            log(f"{eid} {what}: not delivered ({e}); left pending, retry in {self.backoff:.1f} s")
            self.transient_id = entry_id
            return False
        except (Stop, *REDIS_DOWN):
            raise  # Redis failing is not the entry's fault: reconnect, then retry it
        except Exception as e:  # a bug, or an entry this handler cannot take: retry, then give up
            log(f"{eid} {what}: handler failed ({e!r}); left pending, retry in {self.backoff:.1f} s")
            self.errors[entry_id] = f"handler failed: {e!r}"
            if self.transient_id == entry_id:
                self.transient_id = None
            return False
        self.r.xack(self.cfg.key, self.cfg.group, entry_id)
        self.done(entry_id)
        if status == 202:
            log(f"{eid} {what}: sent, acknowledged")
        else:
            log(f"{eid} {what}: the gateway refused the reply ({status}); dropped, acknowledged")
        return True

    def done(self, entry_id):
        self.handled += 1
        self.errors.pop(entry_id, None)
        if self.transient_id == entry_id:
            self.transient_id = None

    def dead_letter(self, entry_id, deliveries):
        """Moves a pending entry to the dead-letter stream and acknowledges it, in one script."""
        eid = text_of(entry_id)
        found = self.r.xrange(self.cfg.key, entry_id, entry_id)
        if not found:
            self.r.xack(self.cfg.key, self.cfg.group, entry_id)
            log(f"{eid} was deleted from the stream; acknowledged")
            self.done(entry_id)
            return
        reason = self.errors.get(entry_id) or \
            f"still pending after {deliveries} deliveries (its consumers crashed or gave up)"
        fields = dict(found[0][1])
        fields.update({b"original_id": eid, b"deliveries": str(deliveries), b"reason": reason})
        self.dead_letter_script(keys=[self.cfg.key, self.cfg.dead_key],
                                args=[self.cfg.group, entry_id,
                                      *(x for field in fields.items() for x in field)])
        self.done(entry_id)
        self.backoff = 0.5  # the entry that kept failing is gone
        log(f"{eid} moved to {self.cfg.dead_key} after {deliveries} deliveries: {reason}")

    def failed(self):
        self.pending = True
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, 30.0)

    def process(self, entries):
        """Handles new entries in order; stops at the first that must be retried."""
        for entry_id, fields in entries:
            if not self.handle(entry_id, fields):
                self.failed()
                return
            self.backoff = 0.5
            if self.remaining() == 0:
                return
            self.tick()

    def process_pending(self):
        """Handles our own pending entries, oldest first, one at a time so that each delivery
        Redis counts is one attempt; stops at the first that must be retried."""
        while not self.stopping and self.remaining() != 0:
            self.tick()
            head = self.r.xpending_range(self.cfg.key, self.cfg.group, "-", "+", 1,
                                         consumername=self.cfg.consumer)
            if not head:
                self.pending = False
                return
            entry_id, deliveries = head[0]["message_id"], head[0]["times_delivered"]
            if entry_id == self.transient_id:  # the gateway failed: not another delivery
                found = self.r.xrange(self.cfg.key, entry_id, entry_id)
                fields = found[0][1] if found else None
            elif deliveries >= self.cfg.max_deliveries:
                self.dead_letter(entry_id, deliveries)
                continue
            else:
                entries = self.read("0", None, count=1)
                if not entries:
                    continue
                entry_id, fields = entries[0]
            if not self.handle(entry_id, fields):
                self.failed()
                return
            self.backoff = 0.5

    def step(self):
        self.tick()
        if self.pending:
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.5))  # short naps, so a signal stops us promptly
                return
            self.process_pending()
        else:
            # Wake up for the next tick even when nothing arrives.
            until_tick = int((self.next_tick - time.monotonic()) * 1000)
            self.process(self.read(">", max(1, min(self.cfg.block_ms, until_tick))))

    def cleanup(self):
        """Removes this consumer from the group when it holds nothing, so names do not pile up."""
        if self.r is None:
            return
        try:
            info = self.r.xpending_range(self.cfg.key, self.cfg.group, "-", "+", 1,
                                         consumername=self.cfg.consumer)
            if not info:
                self.r.xgroup_delconsumer(self.cfg.key, self.cfg.group, self.cfg.consumer)
        except (redis.RedisError, RedisClusterException) as e:
            log(f"could not remove consumer {self.cfg.consumer}: {e}")

    def run(self):
        cfg = self.cfg
        log(f"reading {cfg.key} as {cfg.group}/{cfg.consumer}, replying via {cfg.api}")
        ready = False
        while not self.stopping and self.remaining() != 0:
            try:
                if not ready:
                    self.connect()
                    self.ensure_group()
                    self.next_tick = 0.0  # take over abandoned entries now
                    self.tick()
                    ready = True
                    self.pending, self.retry_at = True, 0.0  # (re)read our own pending list
                self.step()
            except Shutdown:
                break
            except REDIS_DOWN as e:  # first: a cluster being down is also a ResponseError
                log(f"Redis: {e}; retrying in 1 s")
                ready = False
                try:
                    self.in_read = True
                    time.sleep(1)
                except Shutdown:
                    break
                finally:
                    self.in_read = False
            except redis.ResponseError as e:
                # Stream or group deleted under us (UNBLOCKED: while we were blocked reading it,
                # Redis 7+): create it again.
                if "NOGROUP" in str(e) or "UNBLOCKED" in str(e):
                    log(f"{e}; creating the group again")
                    ready = False
                    continue
                raise
        # Not with the reader: a read interrupted by a signal left its connection mid-reply.
        self.cleanup()
        log(f"stopped after handling {self.handled} entries")


def main():
    cfg = settings()
    backend = Backend(cfg)
    signal.signal(signal.SIGTERM, backend.on_signal)
    signal.signal(signal.SIGINT, backend.on_signal)
    try:
        backend.run()
    except Stop as e:
        log(str(e))
        sys.exit(e.code)


if __name__ == "__main__":
    main()
