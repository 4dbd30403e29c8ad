#!/usr/bin/env bash
# The main job: two services and a client in separate processes on the
# embedded discovery, showing call, spread, topic.host, multicall streaming,
# errors, timeouts, cast and fanout delivery, failover, and a quick speed
# figure.  Set up first if needed (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m nova_zmq_fast.demo "$@"
