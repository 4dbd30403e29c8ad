"""Nothing built from Python can crash the interpreter: every class and
function each compiled module exports, tried every way, in a subprocess
that must not die of a signal."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MODULES = ["_zmq", "_curve", "_envelope", "_routes", "_dispatch", "_client", "_courier",
           "_server"]


@pytest.mark.parametrize("module", MODULES)
def test_no_way_of_building_or_calling_it_crashes(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.helpers.probe", module],
                         cwd=tmp_path, env={"PYTHONPATH": ROOT}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    made = int(out.stdout.split()[-1])
    assert made > 0, out.stdout             # it did try


def test_internal_classes_refuse_to_be_built_from_python():
    from nova_zmq_fast import _dispatch, _server
    for cls in (_server.Server, _server.Replier, _server.Seen, _dispatch.Consumer,
                _dispatch.Subscription):
        with pytest.raises(TypeError, match="not supposed to be instantiated"):
            cls()
    replier = _server.Replier.__new__(_server.Replier)
    with pytest.raises(RuntimeError, match="not bound"):
        replier.result(1)
    server = _server.Server.__new__(_server.Server)
    with pytest.raises(RuntimeError, match="worker threads"):
        server._work(object())


def test_the_courier_thread_body_runs_only_on_its_thread(client):
    """A courier's loop driven from another thread would share its socket
    (or, never started, have none): refused."""
    from nova_zmq_fast._courier import Courier
    rt = client._runtime()
    courier = Courier(rt.client, rt.routes, rt.options)
    with pytest.raises(RuntimeError, match="courier's own thread"):
        courier._run()
    with pytest.raises(RuntimeError, match="courier's own thread"):
        rt.courier._run()


def test_what_peers_cause_is_logged_at_a_bounded_rate(monkeypatch, caplog):
    """A thousand errors of one kind within the interval: one line, and the
    next line after it says how many were held back."""
    import logging
    import types

    from nova_zmq_fast import logs
    now = [1000.0]
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    log = logs.RateLimitedLog(logging.getLogger("nova_zmq_fast.test"), interval=10.0)
    caplog.set_level(logging.WARNING, logger="nova_zmq_fast.test")
    for _ in range(1000):
        log.warning(("dropped", 1), "dropped %s", "a bad message")
    log.warning(("dropped", 2), "dropped %s", "another kind")      # its own allowance
    assert [r.getMessage() for r in caplog.records] == ["dropped a bad message",
                                                        "dropped another kind"]
    now[0] += 10.0
    log.warning(("dropped", 1), "dropped %s", "a bad message")
    assert caplog.records[-1].getMessage() == (
        "dropped a bad message (and 999 more like this in the last 10s)")
