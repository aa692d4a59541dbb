#!/usr/bin/env bash
# The JS client installs the way JS users install things: `npm pack examples/js`, then
# `npm install` of the tarball into an empty folder. There, `import ... from "wsbridge-client"`
# must load in Node (the "default" export condition) and type-check (the "types" condition) with
# no DOM and no Node types, under both module resolutions apps use (nodenext, bundler).
# Needs tests/ts's packages (npm ci --prefix tests/ts) for tsc. Run by tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
ts="$PWD/tests/ts"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tarball=$(npm pack --silent --pack-destination "$tmp" ./examples/js)
files=$(tar -tzf "$tmp/$tarball" | sort | tr '\n' ' ')
want="package/README.md package/package.json package/wsbridge-client.d.mts package/wsbridge-client.mjs "
if [ "$files" != "$want" ]; then
  echo "pack.sh: $tarball holds [$files], expected [$want]" >&2
  exit 1
fi

app="$tmp/app"
mkdir "$app"
cat >"$app/package.json" <<'EOF'
{ "name": "an-app", "private": true, "type": "module" }
EOF
npm install --silent --no-audit --no-fund --prefer-offline --prefix "$app" "$tmp/$tarball"

# Loads through the package's exports, and is the client (the default export included).
(cd "$app" && node --input-type=module -e '
  import Default, { WsBridgeClient, WsBridgeError, compareOffsets } from "wsbridge-client";
  const ok = Default === WsBridgeClient && typeof WsBridgeError === "function" &&
    compareOffsets("e:1-0", "e:2-0") === -1;
  if (!ok) { console.error("pack.sh: the installed wsbridge-client exports the wrong things"); process.exit(1); }
')

cp "$ts/consumer.ts" "$app/"
cat >"$app/tsconfig.json" <<'EOF'
{
  "compilerOptions": {
    "strict": true, "noEmit": true, "target": "es2022", "lib": ["es2022"], "types": [],
    "module": "nodenext", "moduleResolution": "nodenext"
  },
  "files": ["consumer.ts"]
}
EOF
"$ts/node_modules/.bin/tsc" -p "$app"
"$ts/node_modules/.bin/tsc" -p "$app" --module preserve --moduleResolution bundler
echo "pack.sh: $tarball installs, imports and type-checks"
