#!/usr/bin/env python3
"""A tiny chat backend for wsbridge, in Python.

It reads the inbound stream `<prefix>:in:chat` with a Redis consumer group, as every wsbridge
backend does, and answers through the gateway's backend API (`POST /send`):

- `data` is an object with a non-empty string "channel" and a "text": the message goes to every
  subscriber of that channel as {"from": <user, or connection when anonymous>, "text": TEXT};
- anything else is echoed to the sending connection as {"echo": DATA}.

An entry is acknowledged (XACK) only after the gateway accepted the reply (202). When the gateway
answers 5xx (503: Redis did not take it) or 429, or cannot be reached, the entry stays pending and
is retried after a backoff, before any newer entry. A 400 or 413 means the reply itself can never
be taken: it is logged and acknowledged (dropped). Any other answer (401 wrong key, 404 wrong URL)
is a misconfiguration: the backend exits with status 1 without acknowledging, leaving the entry
to a correctly configured instance. At start, entries that a dead consumer left pending for more
than --claim-idle-ms (60 s) are taken over with XAUTOCLAIM. A group this backend creates starts
at the beginning of the stream, as the gateway's own groups do, so no stored entry is skipped.

Run it (needs `pip install -r examples/requirements.txt`):

    python3 examples/backend.py

Settings come from flags, or from the environment: REDIS_URL (redis://127.0.0.1:6379),
WSBRIDGE_API (http://127.0.0.1:8081), WSBRIDGE_API_KEY (none), PREFIX (wsbridge), STREAM (chat),
GROUP (backend), CONSUMER (<hostname>-<pid>). `--max N` exits after handling N entries.
"""

import argparse
import base64
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

import redis

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


def settings():
    env = os.environ.get
    p = argparse.ArgumentParser(description="wsbridge chat backend (Python)")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--api", default=env("WSBRIDGE_API", "http://127.0.0.1:8081"),
                   help="the gateway's backend API (any replica)")
    p.add_argument("--api-key", default=env("WSBRIDGE_API_KEY") or None)
    p.add_argument("--prefix", default=env("PREFIX", "wsbridge"))
    p.add_argument("--stream", default=env("STREAM", "chat"))
    p.add_argument("--group", default=env("GROUP", "backend"))
    p.add_argument("--consumer", default=env("CONSUMER") or f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--block-ms", type=int, default=5000, help="XREADGROUP BLOCK")
    p.add_argument("--claim-idle-ms", type=int, default=60000,
                   help="at start, take over entries pending longer than this")
    p.add_argument("--max", type=int, default=None, metavar="N",
                   help="exit after handling N entries")
    a = p.parse_args()
    a.api = a.api.rstrip("/")
    a.key = f"{a.prefix}:in:{a.stream}"
    return a


def to_json_value(v):
    """Makes a decoded MessagePack value JSON-serialisable (bytes become base64 text)."""
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k if isinstance(k, str) else json.dumps(to_json_value(k)): to_json_value(x)
                for k, x in v.items()}
    if msgpack is not None and isinstance(v, msgpack.ExtType):
        return {"ext": v.code, "data": base64.b64encode(v.data).decode()}
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


def reply_for(fields):
    """The /send body for one entry, and a short description for the log."""
    connection = fields.get(b"connection", b"").decode()
    user = fields.get(b"user", b"").decode()
    data = decode_data(fields)
    channel = data.get("channel") if isinstance(data, dict) else None
    if isinstance(channel, str) and channel and "text" in data:
        body = {"to": {"channel": channel}, "data": {"from": user or connection, "text": data["text"]}}
        return body, f"chat {channel} from {user or connection}"
    return {"to": {"connection": connection}, "data": {"echo": data}}, f"echo to {connection}"


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


class Backend:
    def __init__(self, cfg):
        self.cfg = cfg
        # The socket timeout outlasts the blocking read, so a silently dead link is noticed.
        self.r = redis.Redis.from_url(cfg.redis_url, socket_connect_timeout=5,
                                      socket_timeout=cfg.block_ms / 1000 + 10)
        self.handled = 0
        self.stopping = False
        self.in_read = False
        # Entries of our own pending list to (re)process: at start (XAUTOCLAIM may have given us
        # some) and after a failed delivery.
        self.pending = True
        self.retry_at = 0.0
        self.backoff = 0.5  # seconds before retrying a failed delivery, doubled up to 30

    def on_signal(self, signum, _frame):
        log(f"{signal.Signals(signum).name}: stopping")
        self.stopping = True
        if self.in_read:  # only a blocking read is interrupted; an entry in progress completes
            raise Shutdown()

    def ensure_group(self):
        try:
            self.r.xgroup_create(self.cfg.key, self.cfg.group, id="0", mkstream=True)
            log(f"created group {self.cfg.group} on {self.cfg.key}")
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def reclaim(self):
        """Takes over entries that other (dead) consumers left pending too long."""
        start, total = "0-0", 0
        while True:
            reply = self.r.xautoclaim(self.cfg.key, self.cfg.group, self.cfg.consumer,
                                      self.cfg.claim_idle_ms, start_id=start, count=100)
            start, claimed = reply[0], reply[1]
            total += len(claimed)
            if start in (b"0-0", "0-0"):
                break
        if total:
            log(f"reclaimed {total} entries idle for more than {self.cfg.claim_idle_ms} ms")

    def remaining(self):
        return None if self.cfg.max is None else self.cfg.max - self.handled

    def read(self, start, block):
        count = min(100, self.remaining() or 100)
        self.in_read = True
        try:
            if self.stopping:
                raise Shutdown()
            reply = self.r.xreadgroup(self.cfg.group, self.cfg.consumer, {self.cfg.key: start},
                                      count=count, block=block)
        finally:
            self.in_read = False
        if not reply:
            return []
        # RESP2: [[key, [(id, fields), ...]]]; RESP3: {key: [[(id, fields), ...]]}
        if isinstance(reply, dict):
            return [e for entries in reply.values() for batch in entries for e in batch]
        return [e for _key, entries in reply for e in entries]

    def handle(self, entry_id, fields):
        """Returns True when the entry is done (acknowledged), False to keep it pending."""
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if fields is None:  # trimmed away while it was pending: nothing left to do
            self.r.xack(self.cfg.key, self.cfg.group, entry_id)
            log(f"{eid} was deleted from the stream; acknowledged")
            return True
        body, what = reply_for(fields)
        try:
            status = post_send(self.cfg, body)
        except Transient as e:
            log(f"{eid} {what}: not delivered ({e}); left pending, retry in {self.backoff:.1f} s")
            return False
        self.r.xack(self.cfg.key, self.cfg.group, entry_id)
        self.handled += 1
        if status == 202:
            log(f"{eid} {what}: sent, acknowledged")
        else:
            log(f"{eid} {what}: the gateway refused the reply ({status}); dropped, acknowledged")
        return True

    def process(self, entries):
        """Handles entries in order; stops at the first that must be retried."""
        for entry_id, fields in entries:
            if not self.handle(entry_id, fields):
                self.pending = True
                self.retry_at = time.monotonic() + self.backoff
                self.backoff = min(self.backoff * 2, 30.0)
                return
            self.backoff = 0.5
            if self.remaining() == 0:
                return

    def step(self):
        if self.pending:
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.5))  # short naps, so a signal stops us promptly
                return
            entries = self.read("0", None)  # our own pending entries, oldest first
            if not entries:
                self.pending = False
                return
            self.process(entries)
        else:
            self.process(self.read(">", self.cfg.block_ms))

    def cleanup(self):
        """Removes this consumer from the group when it holds nothing, so names do not pile up."""
        try:
            info = self.r.xpending_range(self.cfg.key, self.cfg.group, "-", "+", 1,
                                         consumername=self.cfg.consumer)
            if not info:
                self.r.xgroup_delconsumer(self.cfg.key, self.cfg.group, self.cfg.consumer)
        except redis.RedisError as e:
            log(f"could not remove consumer {self.cfg.consumer}: {e}")

    def run(self):
        cfg = self.cfg
        log(f"reading {cfg.key} as {cfg.group}/{cfg.consumer}, replying via {cfg.api}")
        ready = False
        while not self.stopping and self.remaining() != 0:
            try:
                if not ready:
                    self.ensure_group()
                    self.reclaim()
                    ready = True
                    self.pending, self.retry_at = True, 0.0  # (re)read our own pending list
                self.step()
            except Shutdown:
                break
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # stream or group deleted under us: create it again
                    log(f"{e}; creating the group again")
                    ready = False
                    continue
                raise
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log(f"Redis: {e}; retrying in 1 s")
                ready = False
                try:
                    self.in_read = True
                    time.sleep(1)
                except Shutdown:
                    break
                finally:
                    self.in_read = False
        # A fresh connection: a read interrupted by a signal leaves the old one mid-reply.
        self.r.connection_pool.disconnect()
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
