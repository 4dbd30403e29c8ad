"""Smoke test of an installed nova_zmq_fast, run from outside any checkout:
by scripts/wheel.sh in a fresh virtualenv, and by cibuildwheel on every wheel.

This process starts a copy of itself as a service (`--serve`), then makes a
call, a cast and a fanout to it through the public API, and pings it and
asks its status with the `nova-zmq-fast` command, all over CURVE (so the
libzmq it loads must have it).  It checks that both processes import the
package from site-packages and load exactly one libzmq (with --bundled: the
wheel's own copy), and that each path given with --hidden cannot be loaded
here.  It prints one JSON line of what it found and exits 0 only if every
check held.
"""
import argparse
import ctypes
import json
import os
import select
import subprocess
import sys
import sysconfig
import tempfile
import time

TOPIC = "smoke"
CTX = {"user_id": "smoke"}
TIMEOUT = 60
SITE = os.path.realpath(sysconfig.get_paths()["platlib"])


def facts():
    """Where the package and libzmq came from, in this process."""
    import nova_zmq_fast
    from nova_zmq_fast import _zmq
    return {"package": os.path.realpath(os.path.dirname(nova_zmq_fast.__file__)),
            "version": nova_zmq_fast.__version__,
            "libzmq": ".".join(map(str, _zmq.libzmq_version())),
            "libzmq_files": _zmq.loaded_libzmq_files()}


class Consumer:
    def __init__(self, kind):
        self.kind = kind

    def echo(self, ctxt, value):
        return {"value": value, "facts": facts()}

    def note(self, ctxt, what):
        print(f"{what} via {self.kind}", flush=True)     # the client waits for it


def keys(ipc_dir):
    """CURVE options of the service and of the client (their keys, and
    the service's allow-list holding the client's), made on first use."""
    from nova_zmq_fast import _curve
    allowed = os.path.join(ipc_dir, "allowed")
    service, client = os.path.join(ipc_dir, "service"), os.path.join(allowed, "client")
    if not os.path.exists(allowed):
        os.mkdir(allowed, 0o700)
        _curve.write_keypair(service)
        _curve.write_keypair(client)
    return ({"rpc_zmq_secret_key_file": service + ".key", "rpc_zmq_allowed_keys": allowed},
            {"rpc_zmq_secret_key_file": client + ".key"})


def serve(ipc_dir):
    from nova_zmq_fast import rpc
    rpc.init(rpc_zmq_ipc_dir=ipc_dir, rpc_zmq_host="smoke-service", **keys(ipc_dir)[0])
    conn = rpc.create_connection()
    conn.create_consumer(TOPIC, Consumer("direct"))
    conn.create_consumer(TOPIC, Consumer("fanout"), fanout=True)
    conn.consume_in_thread()
    print("READY", flush=True)
    sys.stdin.read()                # until the client closes our stdin
    rpc.cleanup()


def next_line(proc, buf, deadline):
    """The service's next stdout line; bounded by `deadline`."""
    while b"\n" not in buf[0]:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise TimeoutError("the service said nothing in time")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise EOFError(f"the service exited ({proc.poll()})")
        buf[0] += chunk
    line, buf[0] = buf[0].split(b"\n", 1)
    return line.decode()


def check_process(name, found, args, problems):
    if found["package"] != os.path.join(SITE, "nova_zmq_fast"):
        problems.append(f"{name} imported the package from {found['package']}")
    if len(found["libzmq_files"]) != 1:
        problems.append(f"{name} loaded libzmq {found['libzmq_files']}")
    libs = os.path.join(SITE, "nova_zmq_fast.libs")
    if args.bundled and any(os.path.dirname(f) != libs for f in found["libzmq_files"]):
        problems.append(f"{name} loaded {found['libzmq_files']}, not the copy in {libs}")
    if args.expect_libzmq and found["libzmq"] != args.expect_libzmq:
        problems.append(f"{name} loaded libzmq {found['libzmq']}, not {args.expect_libzmq}")


def smoke(args):
    from nova_zmq_fast import rpc
    report = {"client": facts(), "hidden": {}, "problems": []}
    problems = report["problems"]
    for path in args.hidden:
        try:
            ctypes.CDLL(path)
            problems.append(f"{path} is still loadable")
        except OSError as exc:
            report["hidden"][path] = str(exc)
    with tempfile.TemporaryDirectory() as ipc_dir:
        # Everything below runs over CURVE: the wheel's libzmq must have it.
        client_keys = keys(ipc_dir)[1]
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", ipc_dir],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        buf = [b""]
        deadline = time.monotonic() + TIMEOUT
        try:
            if next_line(proc, buf, deadline) != "READY":
                raise RuntimeError("the service did not start")
            rpc.init(rpc_zmq_ipc_dir=ipc_dir, rpc_response_timeout=TIMEOUT, **client_keys)
            reply = rpc.call(CTX, TOPIC, {"method": "echo", "args": {"value": 42}})
            report["service"] = reply["facts"]
            report["call"] = reply["value"] == 42
            rpc.cast(CTX, TOPIC, {"method": "note", "args": {"what": "cast"}})
            report["cast"] = next_line(proc, buf, deadline) == "cast via direct"
            rpc.fanout_cast(CTX, TOPIC, {"method": "note", "args": {"what": "fanout"}})
            report["fanout"] = next_line(proc, buf, deadline) == "fanout via fanout"
            # The operator's command line, as the wheel installed it.
            script = os.path.join(os.path.dirname(sys.executable), "nova-zmq-fast")
            key = ["-o", f"rpc_zmq_secret_key_file={client_keys['rpc_zmq_secret_key_file']}"]
            ping = subprocess.run([script, "ping", TOPIC, "--ipc-dir", ipc_dir, "--json", *key],
                                  capture_output=True, text=True, timeout=TIMEOUT)
            status = subprocess.run([script, "status", "--ipc-dir", ipc_dir, "--json", *key],
                                    capture_output=True, text=True, timeout=TIMEOUT)
            report["command_line"] = ping.returncode == 0 and status.returncode == 0 and \
                json.loads(ping.stdout)["consumers"][0]["pid"] == proc.pid and \
                [n["ping"]["pid"] for n in json.loads(status.stdout)["nodes"]] == [proc.pid]
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            rpc.cleanup()
            proc.stdin.close()
            try:
                report["service_exit"] = proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                report["service_exit"] = proc.wait()
            proc.stdout.close()
    for step in ("call", "cast", "fanout", "command_line"):
        if report.get(step) is not True:
            problems.append(f"{step} failed")
    if report["service_exit"] != 0:
        problems.append(f"the service exited with {report['service_exit']}")
    check_process("client", report["client"], args, problems)
    if "service" in report:
        check_process("service", report["service"], args, problems)
    print(json.dumps(report), flush=True)
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", metavar="IPC_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--bundled", action="store_true",
                        help="libzmq must be the copy inside the installed wheel")
    parser.add_argument("--expect-libzmq", metavar="X.Y.Z", help="libzmq version required")
    parser.add_argument("--hidden", nargs="*", default=[], metavar="PATH",
                        help="libraries that must not be loadable here")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    return smoke(args)


if __name__ == "__main__":
    sys.exit(main())
