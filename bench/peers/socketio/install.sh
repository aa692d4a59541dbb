#!/usr/bin/env bash
# Installs the socket.io peer (server.mjs + its pinned npm dependencies) from the npm registry.
#
#   bench/peers/socketio/install.sh [DIR]
#
# DIR (created if missing; default: this folder) receives server.mjs, package.json,
# package-lock.json and node_modules/. With package-lock.json present the install is `npm ci`
# (exact versions from the lock file), otherwise `npm install`. Prints, as its last stdout line:
#   installed DIR
# Run the server afterwards with:
#   node DIR/server.mjs --port WSPORT --api-port APIPORT --redis redis://127.0.0.1:6379
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [[ "$dir" != "$here" ]]; then
    cp "$here/server.mjs" "$here/package.json" "$dir/"
    if [[ -f "$here/package-lock.json" ]]; then cp "$here/package-lock.json" "$dir/"; fi
fi
command -v node >/dev/null || { echo "install.sh: node is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "install.sh: npm is not installed" >&2; exit 1; }
cd "$dir"
if [[ -f package-lock.json ]]; then
    npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2
else
    npm install --omit=dev --no-audit --no-fund --loglevel=error >&2
fi
echo "installed $dir"
