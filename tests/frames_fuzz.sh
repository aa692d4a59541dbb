#!/usr/bin/env bash
# The client protocol fuzzed from its schema (tests/frames_fuzz.py): frames generated from
# docs/schema/client-frame.json and from its negation, JSON and MessagePack, sent to a real
# replica with a real Redis; every answer must be valid under docs/schema/server-frame.json and
# documented, and the connection must stay usable. ~15-25 s on a 2-core machine.
#
# Its Python packages live in a virtualenv under target/: hypothesis-jsonschema 0.23.1 (the
# newest) fails with the newest hypothesis ('many' object has no attribute 'more'), so hypothesis
# is pinned to 6.98.0 there without downgrading the one other tests (Schemathesis) install.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/frames-fuzz-venv
pins=(hypothesis-jsonschema==0.23.1 hypothesis==6.98.0 jsonschema==4.26.0 msgpack==1.2.4 websockets==15.0.1)
if ! "$venv/bin/python" -c 'import sys, importlib.metadata as m; sys.exit(any(m.version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))' "${pins[@]}" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
fi
cargo build --quiet # the replica under test is target/debug/wsbridge
"$venv/bin/python" tests/frames_fuzz.py "$@"
