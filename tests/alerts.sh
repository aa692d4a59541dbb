#!/usr/bin/env bash
# The Prometheus alert rules (grafana/alerts.yml): valid, each one's unit tests pass
# (grafana/alerts.test.yml), and every wsbridge_ metric they read is one the gateway exports
# (named in src/metrics/mod.rs), so a rule cannot watch a metric that does not exist.
# promtool comes with Debian's `prometheus` package, which tests/run.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
promtool="${PROMTOOL:-promtool}"
"$promtool" check rules grafana/alerts.yml
"$promtool" test rules grafana/alerts.test.yml
missing=0
for name in $(grep -o 'wsbridge_[a-z_]*' grafana/alerts.yml | sed -E 's/_(sum|count|bucket)$//' | sort -u); do
  if ! grep -q "\"$name\"" src/metrics/mod.rs; then
    echo "grafana/alerts.yml reads $name, which src/metrics/mod.rs does not export" >&2
    missing=1
  fi
done
exit "$missing"
