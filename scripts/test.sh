#!/usr/bin/env bash
# Run the test suite on a fresh machine: set up (scripts/bootstrap.sh), then
# pytest.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest tests -q "$@"
