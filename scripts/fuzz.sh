#!/usr/bin/env bash
# Coverage-guided fuzzing of the envelope codec and a live server
# (tests/fuzz/): builds the clang + libFuzzer + ASan copy of the core in
# build/fuzz (the in-place build is untouched), then runs every harness for
# its share of [seconds] (default 600).  It can run for hours:
#   nice -n 19 ./scripts/fuzz.sh 36000
# Findings land in build/fuzz/crashes/<harness>/, the corpus grows in
# tests/fuzz/corpus/<harness>/generated/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m tests.fuzz.run --seconds "${1:-600}"
