"""A hostile peer against a running service: it cannot crash it, stall it
or make it hold memory, and everything it sent is counted.  The peer is an
independent pyzmq process (tests/helpers/hostile_peer.py)."""
import json
import subprocess
import sys

from tests.helpers.ledger import balanced
from tests.conftest import ROOT, ServiceProcess, wait_until

CTX = {"user_id": "u"}


def msg(method, **args):
    return {"method": method, "args": args}


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_hostile_peer_cannot_crash_stall_or_bloat_a_service(ipc_dir, client):
    svc = ServiceProcess("target", ipc_dir)                # the default limits
    try:
        assert client.call(CTX, "svc.target", msg("echo", value=1)) == 1
        start_mb = rss_mb(svc.proc.pid)
        before = client.call(CTX, "svc.target", msg("stats"))
        out = subprocess.run([sys.executable, "-m", "tests.helpers.hostile_peer", svc.address,
                              "7", "300"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads(out.stdout)
        sent = report["sent"]
        assert report["fenced"], "the service did not answer the peer's PING"
        # Still serving, and every message accounted for.
        assert client.call(CTX, "svc.target", msg("echo", value=2), timeout=10) == 2
        assert wait_until(lambda: balanced(client.call(CTX, "svc.target", msg("stats"))), 60)
        after = client.call(CTX, "svc.target", msg("stats"))
        grew = {k: after[k] - before[k] for k in before if isinstance(before[k], int)}
        for counter in ("dropped_frame_count", "dropped_bad_header", "dropped_version",
                        "dropped_bad_body", "dropped_unknown_topic", "handler_errors"):
            assert grew[counter] > 0, (counter, grew)
        hostile = sum(sent.values())
        # The fence was read after all of them; the stats calls and the
        # twins' flood come on top.
        assert grew["received"] >= hostile + 1, (grew, sent)
        assert report["twin_sent"] > 0
        # Memory back near where it started, however the peer connected.
        assert wait_until(lambda: rss_mb(svc.proc.pid) < start_mb + 64, 30), \
            (start_mb, rss_mb(svc.proc.pid))
        print(f"\nhostile peer: {hostile} messages of {len(sent)} kinds, then "
              f"{report['twin_sent']} from twin ids; service RSS "
              f"{start_mb:.0f} -> {rss_mb(svc.proc.pid):.0f} MB; {grew}")
    finally:
        assert svc.stop() == 0
