"""The benchmark harness runs end to end (tiny sizes).  This checks that
every measurement still works and reports; it asserts nothing about speed."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_benchmark_runs_and_reports_every_figure(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke",
                          "--no-micro", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    medians = results["medians"]
    for key in ("raw.call", "raw.cast", "pyzmq.call", "pyzmq.cast", "native.call",
                "native.cast", "native.fanout.1", "native.fanout.2",
                "native.registered.1", "native.registered.4", "oslo_zmqfast.call",
                "oslo_zmqfast.cast"):
        assert medians.get(key, 0) > 0, key
    if "oslo_rabbit" not in results["skipped"]:
        assert medians["oslo_rabbit.call"] > 0 and medians["oslo_rabbit.cast"] > 0
    assert all(t["value"] is not None for t in results["targets"]
               if "RabbitMQ" not in t["target"] or "oslo_rabbit" not in results["skipped"])
    assert results["cpu"]["native.cast"]["server_cpu_s_per_100k"] > 0
    assert "| nova_zmq_fast call" in out.stdout
