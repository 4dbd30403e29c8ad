"""Measure how much memory decoding a hostile body costs, against its size.

    python -m tests.fuzz.amplification [--limit BYTES] [--baseline]

For each kind of body, the script builds the largest one that the codec
accepts under `--limit` (rpc_zmq_max_message_size, 16 MiB by default) and
decodes it with `_envelope.unpack_body` in a fresh child process, which
resets its peak RSS (VmHWM) once the body is built and reports how far the
peak rose above the RSS it had then.  `--baseline` decodes
bodies of the full limit with plain `msgpack.unpackb`, as the codec did
before it had limits.  The figures in docs/envelope.md come from here.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _array(n, item):
    return b"\xdd" + n.to_bytes(4, "big") + item * n


def _distinct(n, tag):
    # Two-byte scalars that are no cached singleton (ints above 256,
    # two-letter strings): each needs an object of its own.
    values = [tag + bytes([97 + i % 26, 97 + i // 26 % 26]) for i in range(676)]
    return b"\xdd" + n.to_bytes(4, "big") + b"".join(values[i % 676] for i in range(n))


def _map_of_ints(n):
    return b"\xdf" + n.to_bytes(4, "big") + b"".join(
        b"\xce" + (i + 1000).to_bytes(4, "big") + b"\xc0" for i in range(n))


def _nested(n):
    # 1,000 levels each declaring n/2 items, then nil to fill n bytes: each
    # level made the old codec preallocate n/2 slots before any arrived.
    level = b"\xdd" + (n // 2).to_bytes(4, "big")
    depth = min(1000, n // (2 * len(level)))
    return level * depth + b"\xc0" * (n - depth * len(level))


# name -> (body of about n items, bytes per item).  Bodies refused at any
# size (nesting, extension types) are shown at the full limit.
BODIES = {
    "array of nil": (lambda n: _array(n, b"\xc0"), 1),
    "array of empty maps": (lambda n: _array(n, b"\x80"), 1),
    "array of empty arrays": (lambda n: _array(n, b"\x90"), 1),
    "array of {nil: nil}": (lambda n: _array(n, b"\x81\xc0\xc0"), 3),
    "array of 2-byte str": (lambda n: _distinct(n, b"\xa2"), 3),
    "array of uint16": (lambda n: _distinct(n, b"\xcd"), 3),
    "array of fixext1": (lambda n: _array(n, b"\xd4\x01\x00"), 3),
    "array of float32": (lambda n: _array(n, b"\xca\x3f\x80\0\0"), 5),
    "map of uint32 -> nil": (_map_of_ints, 6),
    "nested preallocated arrays": (_nested, 1),
}


def largest_accepted(name, limit):
    """The biggest body of this kind that passes the codec's limits."""
    from nova_zmq_fast import _envelope
    from nova_zmq_fast.exceptions import MalformedEnvelope
    build, width = BODIES[name]

    def accepted(n):
        try:
            _envelope.check_body_limits(build(n), limit)
            return True
        except MalformedEnvelope:
            return False

    lo, hi = 0, (limit - 5) // width
    if build is _nested or accepted(hi) or not accepted(1):
        return build(hi)            # the full size passes, or nothing does
    while hi - lo > max(1, hi // 1000):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if accepted(mid) else (lo, mid)
    return build(lo)


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def reset_peak():
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(name, limit, baseline):
    import msgpack

    from nova_zmq_fast import _envelope
    from nova_zmq_fast.exceptions import MalformedEnvelope
    if baseline:
        body = BODIES[name][0]((limit - 5) // BODIES[name][1])
        decode = lambda: msgpack.unpackb(body, raw=False, strict_map_key=False)  # noqa: E731
    else:
        body = largest_accepted(name, limit)
        decode = lambda: _envelope.unpack_body(body, limit)  # noqa: E731
    reset_peak()
    before = status_kb("VmRSS")
    start = time.perf_counter()
    try:
        decode()
        outcome = "decoded"
    except (MalformedEnvelope, ValueError) as exc:
        outcome = f"rejected: {str(exc)[:50]}"
    seconds = time.perf_counter() - start
    print(json.dumps({"name": name, "size": len(body), "before_kb": before,
                      "peak_kb": status_kb("VmHWM"), "seconds": seconds, "outcome": outcome}))


def measure(name, limit, baseline=False):
    """Run one body in a child process; its figures as a dict, with the
    growth of the peak RSS in bytes."""
    argv = [sys.executable, "-m", "tests.fuzz.amplification", "--child", name,
            "--limit", str(limit)] + (["--baseline"] if baseline else [])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         check=True)
    r = json.loads(out.stdout)
    r["growth"] = (r["peak_kb"] - r["before_kb"]) * 1024
    return r


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=16 << 20, help="max message size")
    parser.add_argument("--baseline", action="store_true",
                        help="plain msgpack.unpackb on bodies of the full limit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.limit, args.baseline)
        return
    print(f"{'body':28} {'bytes':>10} {'peak growth MB':>15} {'x body':>7} "
          f"{'x limit':>8} {'s':>6}  outcome")
    for name in BODIES:
        r = measure(name, args.limit, args.baseline)
        print(f"{name:28} {r['size']:>10} {r['growth'] / 1e6:>15.1f} "
              f"{r['growth'] / r['size']:>7.1f} {r['growth'] / args.limit:>8.1f} "
              f"{r['seconds']:>6.2f}  {r['outcome']}", flush=True)


if __name__ == "__main__":
    main()
