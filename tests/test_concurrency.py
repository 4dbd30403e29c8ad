"""The behaviour suite (tests/helpers/suite.py) run under each
concurrency model: threads, eventlet-monkey-patched processes and
asyncio, each client against a service process of its own model, and
across models on the same wire and discovery."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, ChildProcess

MODELS = ("threads", "eventlet", "asyncio")


@pytest.fixture(scope="module")
def model_services(ipc_dir):
    started = {}
    try:
        for model in MODELS:
            started[model] = ChildProcess(
                f"{model}-service",
                [sys.executable, "-m", "tests.helpers.model_service", model, "--host",
                 f"svc-{model}", "--topic", f"conc-{model}", "--ipc-dir", str(ipc_dir)])
        yield started
    finally:
        codes = {m: s.stop() for m, s in started.items()}
    assert codes == {m: 0 for m in started}, f"services exited with {codes}"


def run_suite(model, topic, ipc_dir):
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.suite", model, "--topic", topic,
                           "--ipc-dir", str(ipc_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: why for name, why in results.items() if why != "ok"}
    assert not failed, "\n".join(f"{name}:\n{why}" for name, why in failed.items())
    return results


@pytest.mark.parametrize("client,service", [(m, m) for m in MODELS] + [
    ("threads", "asyncio"), ("asyncio", "eventlet"), ("eventlet", "asyncio"),
    ("asyncio", "threads")])
def test_behaviour_suite(model_services, ipc_dir, client, service):
    results = run_suite(client, f"conc-{service}", ipc_dir)
    assert "nested call into its own process" in results
    assert "multicall streams" in results
    if client == "eventlet":
        assert "the issue's reproduction, in this process" in results


def test_services_report_their_model(model_services, client):
    for model in MODELS:
        assert client.call({}, f"conc-{model}", {"method": "model"}) == model
