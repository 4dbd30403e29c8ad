#!/usr/bin/env bash
# The side-by-side benchmark (bench/run.py): raw libzmq, hand-written
# pyzmq+msgpack, the native API, and oslo.messaging over RabbitMQ and over
# zmqfast.  `--quick` takes under a minute; without it, the full run behind
# the README's table.  RabbitMQ is expected at 127.0.0.1:5672 (guest/guest);
# without it those rows say so and the rest still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
NZF_EXTRAS=test,bench ./scripts/bootstrap.sh
exec .venv/bin/python bench/run.py "$@"
