"""The coverage-guided fuzzers run briefly on every test run: each harness
(tests/fuzz/fuzz_*.py) against the instrumented core, in processes of their
own, must exit cleanly after executing inputs.  scripts/fuzz.sh runs the
same harnesses for as long as one likes."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECONDS = 60            # in total, split evenly between the harnesses


@pytest.mark.timeout(SECONDS + 900)     # a fresh checkout builds the core first
def test_the_fuzzers_run_clean():
    out = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--json",
                          "--seconds", str(SECONDS)], cwd=ROOT, capture_output=True,
                         text=True, timeout=SECONDS + 600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    print(results)
    assert set(results) == {"header", "body", "server"}
    for harness, result in results.items():
        assert result["ok"], (harness, result)
        # Even on a loaded machine each harness gets through far more than
        # its seeds; a count of a few would mean it never really ran.
        assert result["executed"] > 100, (harness, result)
