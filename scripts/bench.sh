#!/usr/bin/env bash
# The side-by-side benchmark (bench/run.py): raw libzmq, hand-written
# pyzmq+msgpack, the native API, and oslo.messaging over RabbitMQ and over
# zmqfast, then bench/concurrency.py.  `--quick` takes about two minutes;
# without it, the full runs behind the README's tables.  RabbitMQ is expected at 127.0.0.1:5672 (guest/guest);
# without it those rows say so and the rest still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
NZF_EXTRAS=test,bench ./scripts/bootstrap.sh
.venv/bin/python bench/run.py "$@"
# Then threads, eventlet and asyncio, each client model against each
# service model (the README's "Speed under eventlet and asyncio").
case " $* " in
  *" --smoke "*) rounds=1 ;;
  *" --quick "*) rounds=2 ;;
  *) rounds=7 ;;
esac
mkdir -p bench/out
exec .venv/bin/python bench/concurrency.py --rounds "$rounds" --mixed --json bench/out/concurrency.json
