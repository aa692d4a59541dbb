#!/usr/bin/env python3
"""Redis CPU per entry of script calls that append inbound entries, against a bare pipelined
XADD: how much of the once-per-id cost is the script itself and how much the dedupe.

    python3 bench/inbound_script_floor.py        # needs redis-server and the `redis` package

Starts its own redis-server (loopback, free port). Each variant appends 300 calls x 480 entries
(the batch size the gateway's appender reaches under bench/inbound_redis.sh) with the gateway's
seven fields, and reads Redis's CPU from INFO before and after:
  bare       pipelined XADD (no script)
  args_only  a script that receives the entries and only walks its arguments
  xadd_only  a script that XADDs each entry (no dedupe)
  append     the gateway's APPEND_BATCH (src/inbound/appender.rs), every id new
"""
import re
import socket
import subprocess
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
DEDUPE_LUA = re.search(r'r#"(.*?)"#', (ROOT / "src/inbound/dedupe.rs").read_text(), re.S)[1]
APPEND_BATCH = DEDUPE_LUA + re.search(
    r'const APPEND_BATCH: &str = concat!\(\s*super::dedupe::dedupe_lua!\(\),\s*r#"(.*?)"#',
    (ROOT / "src/inbound/appender.rs").read_text(),
    re.S,
)[1]
ARGS_ONLY = """
local n, a, ids = tonumber(ARGV[4]), 5, {}
for i = 1, n do
  ids[i] = ARGV[a]
  a = a + 2 + tonumber(ARGV[a + 1])
end
return ids
"""
XADD_ONLY = """
local n, a, ids = tonumber(ARGV[4]), 5, {}
for i = 1, n do
  local count = tonumber(ARGV[a + 1])
  ids[i] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, a + 2, a + 1 + count))
  a = a + 2 + count
end
return ids
"""
FIELDS = ["connection", "r1.1a2b3c.123", "user", "user-123", "data",
          '{"n":123,"text":"hello, how are you?"}', "encoding", "json", "id", "c-12345",
          "replica", "r1", "ts", "1700000000000"]
ENTRIES, CALLS = 480, 300

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]
sock.close()
server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
try:
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)

    def cpu():
        info = r.info("cpu")
        return info["used_cpu_user"] + info["used_cpu_sys"]

    def per_entry(run):
        r.flushall()
        before = cpu()
        run()
        return (cpu() - before) / (ENTRIES * CALLS) * 1e6

    def bare():
        for _ in range(CALLS):
            pipe = r.pipeline(transaction=False)
            for _ in range(ENTRIES):
                pipe.execute_command("XADD", "bare", "MAXLEN", "~", "100000", "*", *FIELDS)
            pipe.execute()

    def script(body):
        sha = r.script_load(body)

        def run():
            seq = 0
            for _ in range(CALLS):
                args = ["100000", "{p:in:chat}:dedupe:", "120000", str(ENTRIES)]
                for _ in range(ENTRIES):
                    seq += 1
                    args += [f"10:u:user-{seq % 1000}:c-{seq}", str(len(FIELDS))] + FIELDS
                r.evalsha(sha, 1, "p:in:chat", *args)
        return run

    base = per_entry(bare)
    print(f"bare       {base:.2f} us/entry")
    for name, body in [("args_only", ARGS_ONLY), ("xadd_only", XADD_ONLY), ("append", APPEND_BATCH)]:
        us = per_entry(script(body))
        print(f"{name:<10} {us:.2f} us/entry  {us / base:.2f}x bare")
finally:
    server.terminate()
    server.wait()
