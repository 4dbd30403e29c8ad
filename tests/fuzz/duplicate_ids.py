"""Investigation tool (issue #11): a second connection that reuses a routing
id already connected, against today's server or a standalone pyzmq ROUTER
with the server's socket options and a candidate fix.

    python -m tests.fuzz.duplicate_ids service          # tests.helpers.service
    python -m tests.fuzz.duplicate_ids x HANDOVER RCVHWM  # standalone ROUTER
    python -m tests.fuzz.duplicate_ids both 1 1000        # ... and a hijack try

Each round floods 5 KB messages from a DEALER that claims the id of a
connected one, then closes it; the target's RSS is read from /proc.
Loopback only; every loop is bounded.
"""
import json, os, subprocess, sys, time
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable

def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

def router_main(handover, rcvhwm):
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1); s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, rcvhwm); s.setsockopt(zmq.SNDHWM, 100000)
    s.setsockopt(zmq.MAXMSGSIZE, 2 * 16777216 + 65536)
    if handover: s.setsockopt(zmq.ROUTER_HANDOVER, 1)
    s.bind("tcp://127.0.0.1:0")
    print("READY", s.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    n = 0
    while True:
        frames = s.recv_multipart()
        n += 1
        if frames[1] == b"ping":            # answer after 0.5 s, like a slow call
            time.sleep(0.5)
            try: s.send_multipart([frames[0], b"pong"])
            except zmq.ZMQError: pass

def start(argv):
    p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line[0] == "READY", line
    return p, line[1]

SIZE = int(os.environ.get("DUP_SIZE", 5000))       # bytes per flooded message


def flood(ctx, endpoint, rid, size=SIZE, max_msgs=300000, seconds=10):
    d = ctx.socket(zmq.DEALER); d.setsockopt(zmq.ROUTING_ID, rid); d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.SNDHWM, 1000000)
    d.connect(endpoint); time.sleep(0.2)
    payload = b"\x00" * size
    sent, t0 = 0, time.monotonic()
    while sent < max_msgs and time.monotonic() - t0 < seconds:
        try:
            d.send_multipart([b"\x01\x01\x00\x00" + bytes(8) + b"\x03svc", payload], zmq.NOBLOCK); sent += 1
        except zmq.Again:
            time.sleep(0.01)
    return d, sent, time.monotonic() - t0

def rounds(pid, endpoint, label, n=3):
    ctx = zmq.Context()
    victim = ctx.socket(zmq.DEALER); victim.setsockopt(zmq.ROUTING_ID, b"victim"); victim.setsockopt(zmq.LINGER, 0)
    victim.connect(endpoint); victim.send_multipart([b"hello", b"x"]); time.sleep(0.3)
    out = {"label": label, "start": rss_mb(pid), "rounds": []}
    for r in range(n):
        d, sent, secs = flood(ctx, endpoint, b"victim")
        time.sleep(1.5)
        during = rss_mb(pid)
        d.close(); time.sleep(5)
        out["rounds"].append({"sent_before_block": sent, "seconds": round(secs, 2), "rss_during": round(during), "rss_5s_after_close": round(rss_mb(pid))})
    victim.close(); ctx.term()
    return out

def hijack(endpoint):
    ctx = zmq.Context()
    v = ctx.socket(zmq.DEALER); v.setsockopt(zmq.ROUTING_ID, b"victim"); v.setsockopt(zmq.LINGER, 0); v.setsockopt(zmq.RCVTIMEO, 2000)
    v.connect(endpoint); time.sleep(0.2)
    v.send_multipart([b"ping"])
    time.sleep(0.1)
    a = ctx.socket(zmq.DEALER); a.setsockopt(zmq.ROUTING_ID, b"victim"); a.setsockopt(zmq.LINGER, 0); a.setsockopt(zmq.RCVTIMEO, 2000)
    a.connect(endpoint)
    res = {}
    for name, s in (("attacker", a), ("victim", v)):
        try: res[name] = s.recv_multipart()
        except zmq.Again: res[name] = None
    a.close(); v.close(); ctx.term()
    return res

if __name__ == "__main__":
    if sys.argv[1] == "router":
        router_main(int(sys.argv[2]), int(sys.argv[3])); sys.exit()
    if sys.argv[1] == "service":
        reg = os.path.join(ROOT, "build", "duplicate-ids-registry"); os.makedirs(reg, exist_ok=True)
        p, ep = start([PY, "-m", "tests.helpers.service", "--host", "dup", "--options", json.dumps({"rpc_zmq_ipc_dir": reg})])
        try: print(json.dumps(rounds(p.pid, ep, "service (today's server)")))
        finally: p.terminate(); p.wait(15)
        sys.exit()
    handover, hwm = int(sys.argv[2]), int(sys.argv[3])
    p, ep = start([PY, "-m", "tests.fuzz.duplicate_ids", "router", str(handover), str(hwm)])
    try:
        res = rounds(p.pid, ep, f"router handover={handover} rcvhwm={hwm} size={SIZE}",
                     n=int(os.environ.get("DUP_ROUNDS", 2)))
        if sys.argv[1] == "both": res["hijack"] = {k: (v and [f.decode() for f in v]) for k, v in hijack(ep).items()}
        print(json.dumps(res))
    finally: p.kill(); p.wait()
