#!/usr/bin/env python3
"""The smallest wsbridge backend worth copying: read the chat stream as one consumer of a group,
answer each message on its channel with POST /send, and acknowledge it (XACK) only after the
gateway accepted the answer (202). An entry whose answer was refused, or that a crash left
unacknowledged, stays pending and is read again from this consumer's pending list ("0") before
new entries (">"). backend.py beside it adds the rest: reclaiming a dead consumer's entries,
dead letters, MessagePack, Redis Cluster, the whiteboard.

    pip install -r examples/backends/python/requirements.txt
    python3 examples/backends/python/minimal.py
"""
import json
import os
import socket
import time
import urllib.error
import urllib.request

import redis

API = os.environ.get("WSBRIDGE_API", "http://127.0.0.1:8081")
STREAM = f"{os.environ.get('PREFIX', 'wsbridge')}:in:{os.environ.get('STREAM', 'chat')}"
GROUP = os.environ.get("GROUP", "backend")
CONSUMER = os.environ.get("CONSUMER", f"{socket.gethostname()}-{os.getpid()}")


def post_send(body):
    """POST /send; the gateway's HTTP status, or 0 when it could not be reached."""
    request = urllib.request.Request(f"{API}/send", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
try:  # the gateway creates its groups too; this one starts at the stream's beginning as theirs do
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
except redis.ResponseError as e:
    if "BUSYGROUP" not in str(e):
        raise
print(f"reading {STREAM} as {CONSUMER} in group {GROUP}", flush=True)
start = "0"  # first our own pending entries, then new ones
while True:
    reply = r.xreadgroup(GROUP, CONSUMER, {STREAM: start}, count=10, block=5000)
    entries = reply[0][1] if reply else []
    if start == "0" and not entries:
        start = ">"
    for entry_id, fields in entries:
        entry_id, fields = entry_id.decode(), fields or {}
        data = json.loads(fields[b"data"]) if fields.get(b"encoding") == b"json" else None
        chat = isinstance(data, dict) and isinstance(data.get("channel"), str) and "text" in data
        if not (chat and data["channel"]):
            r.xack(STREAM, GROUP, entry_id)
            print(f"{entry_id} not a chat message: acknowledged", flush=True)
            continue
        who = (fields.get(b"user") or fields.get(b"connection", b"")).decode()
        status = post_send({"to": {"channel": data["channel"]},
                            "data": {"from": who, "text": data["text"]}})
        if status != 202:
            print(f"{entry_id} chat {data['channel']}: the gateway answered {status}, left pending",
                  flush=True)
            time.sleep(1)
            start = "0"
            break
        r.xack(STREAM, GROUP, entry_id)
        print(f"{entry_id} chat {data['channel']} from {who}: sent, acknowledged", flush=True)
