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


def test_the_concurrency_benchmark_runs_every_pair(tmp_path):
    """bench/concurrency.py: every client model against every service model
    reports a call round trip, a cast rate and its ratios to threads."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "concurrency.py"),
                          "--rounds", "1", "--calls", "50", "--casts", "500", "--mixed",
                          "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "c.json") as f:
        figures = json.load(f)["figures"]
    models = ("threads", "eventlet", "asyncio")
    assert set(figures) == {f"{c}->{s}" for c in models for s in models}
    for key, entry in figures.items():
        assert entry["call_usec"] > 0 and entry["cast_rate"] > 0, key
        assert key == "threads->threads" or entry["call_ratio"] > 0, key
