"""Packaging: the libzmq version refused at import, and scripts/wheel.sh
(the sdist and a repaired wheel, each installed into a fresh virtualenv and
smoke-tested by two processes; the wheel with every system libzmq hidden)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from nova_zmq_fast import _zmq
from tests.conftest import ROOT

WHEEL_SH_TIMEOUT = 600


@pytest.mark.parametrize("version, refused", [
    ((4, 3, 3), False), ((4, 3, 5), False), ((4, 4, 0), False), ((5, 0, 0), False),
    ((4, 3, 2), True), ((4, 2, 9), True), ((3, 9, 9), True), ((0, 0, 0), True),
])
def test_libzmq_older_than_4_3_3_is_refused(version, refused):
    if refused:
        expected = (r"needs libzmq >= 4\.3\.3 .* libzmq %d\.%d\.%d is loaded from /x/libzmq"
                    % version)
        with pytest.raises(ImportError, match=expected):
            _zmq.require_libzmq(version, "/x/libzmq.so.5")
    else:
        _zmq.require_libzmq(version, "/x/libzmq.so.5")


def test_import_fails_when_the_loaded_libzmq_is_old(tmp_path):
    """A zmq_version() reporting 4.3.2, preloaded over the real one: the
    import of the package itself must fail, with the reason."""
    source = tmp_path / "old_version.c"
    source.write_text("void zmq_version(int *major, int *minor, int *patch)\n"
                      "{ *major = 4; *minor = 3; *patch = 2; }\n")
    shim = tmp_path / "old_version.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True)
    argv = [sys.executable, "-c", "import nova_zmq_fast.rpc"]
    normal = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert normal.returncode == 0, normal.stderr
    old = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, LD_PRELOAD=str(shim)))
    assert old.returncode == 1
    assert "ImportError: nova_zmq_fast needs libzmq >= 4.3.3" in old.stderr, old.stderr
    assert "libzmq 4.3.2 is loaded from /" in old.stderr, old.stderr


def private_mount_namespace():
    for argv in (["unshare", "--mount", "true"],
                 ["unshare", "--mount", "--map-root-user", "true"]):
        try:
            if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
                return True
        except OSError:
            pass
    return False


def run_in_own_group(argv, timeout, env):
    """Run `argv` as a process group; kill whatever of it is left (after a
    timeout or a failure), and say whether anything was."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = f"(timed out after {timeout} s)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            leftover = True
        except ProcessLookupError:
            leftover = False
        proc.wait()
    return proc.returncode, output, leftover


@pytest.mark.skipif(not private_mount_namespace(),
                    reason="hiding the system libzmq needs a private mount namespace "
                           "(unshare -m): run as root or enable user namespaces")
@pytest.mark.timeout(WHEEL_SH_TIMEOUT + 60)
def test_wheel_and_sdist_install_and_work(tmp_path):
    out = tmp_path / "out"
    # TMPDIR: wheel.sh's own work directory then lives, and dies, with tmp_path.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    code, output, leftover = run_in_own_group(
        [os.path.join(ROOT, "scripts", "wheel.sh"), "--out", str(out)], WHEEL_SH_TIMEOUT, env)
    assert code == 0, output[-6000:]
    assert not leftover, "wheel.sh left processes behind"
    report = json.loads((out / "wheel-report.json").read_text())
    wheel = report["wheel"]
    assert (out / wheel["name"]).exists() and (out / report["sdist"]["name"]).exists()

    # The repaired wheel carries libzmq, and our licence and libzmq's.
    libzmq = [name for name in wheel["libs"] if os.path.basename(name).startswith("libzmq-")]
    assert libzmq and all(name.startswith("nova_zmq_fast.libs/") for name in libzmq)
    licences = [os.path.basename(name) for name in wheel["licences"]]
    assert "LICENSE" in licences and "libzmq-copyright.txt" in licences, licences

    for smoke in (report["smoke_wheel"], report["smoke_sdist"]):
        assert smoke["problems"] == []
        assert (smoke["call"], smoke["cast"], smoke["fanout"], smoke["command_line"]) == \
            (True, True, True, True)
        assert smoke["service_exit"] == 0

    # Installed wheel, system libzmq unloadable: both processes used the copy
    # inside the wheel.
    smoke = report["smoke_wheel"]
    assert report["hidden"] and set(report["hidden"]) <= set(smoke["hidden"])
    for process in (smoke["client"], smoke["service"]):
        [loaded] = process["libzmq_files"]
        assert os.path.dirname(loaded) == os.path.join(
            os.path.dirname(process["package"]), "nova_zmq_fast.libs")

    # Installed sdist: built from source, so it uses the system libzmq.
    smoke = report["smoke_sdist"]
    for process in (smoke["client"], smoke["service"]):
        [loaded] = process["libzmq_files"]
        assert loaded in report["hidden"]
