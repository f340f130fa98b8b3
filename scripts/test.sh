#!/usr/bin/env bash
# Install everything, then run the whole test suite (slow tests included: they start the real
# vLLM engine, a real Kafka-protocol broker and a real Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Debian packages run for real: Prometheus (the alert-rule tests), HAProxy (the scale-out rehearsal, tests/test_scaleout.py).
missing=""
for tool in prometheus haproxy; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq $missing >/dev/null) || echo "apt install of$missing failed"
fi
. .venv/bin/activate
# House style, checked before the (long) suite: pyproject.toml's [tool.ruff] says what.
ruff check .
ruff format --check .
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
[ "$rc" = 5 ] && { echo "pytest collected no tests"; exit 1; }
exit "$rc"
