"""A two-service oslo.messaging application: `compute` serves RPC and
emits notifications, `api` calls it, casts to it and listens to what it
announces.  The transport is the only thing that changes:

    python examples/oslo_app.py --transport-url rabbit://guest:guest@127.0.0.1:5672/
    python examples/oslo_app.py --transport-url zmqfast://

(`zmqfast://` needs no broker: the two processes find each other through
the embedded registry.)  In a real service the URL comes from the config
file, [DEFAULT] transport_url.
"""
import argparse
import socket
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import oslo_messaging as messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402

TOPIC = "example_compute"            # --prefix changes "example"
NOTIFICATIONS = "example_notifications"


class ComputeManager:
    target = messaging.Target(version="1.1")

    def __init__(self, notifier):
        self.notifier = notifier
        self.instances = {}

    def create(self, ctxt, name, flavor):
        self.instances[name] = flavor
        self.notifier.info(ctxt, "compute.instance.create", {"name": name, "flavor": flavor})
        return {"name": name, "flavor": flavor, "host": socket.gethostname()}

    def delete(self, ctxt, name):
        self.instances.pop(name, None)
        self.notifier.info(ctxt, "compute.instance.delete", {"name": name})

    def count(self, ctxt):
        return len(self.instances)


def compute(url):
    transport = messaging.get_rpc_transport(cfg.CONF, url=url)
    notifier = messaging.Notifier(messaging.get_notification_transport(cfg.CONF, url=url),
                                  publisher_id="compute", driver="messaging",
                                  topics=[NOTIFICATIONS])
    server = messaging.get_rpc_server(transport, messaging.Target(topic=TOPIC,
                                                                  server=socket.gethostname()),
                                      [ComputeManager(notifier)])
    server.start()
    print("compute ready", flush=True)
    sys.stdin.read()                        # until the api side is done
    server.stop()
    server.wait()
    transport.cleanup()


class Events:
    def __init__(self):
        self.seen = []

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.seen.append(event_type)


def api(url):
    events = Events()
    listener = messaging.get_notification_listener(
        messaging.get_notification_transport(cfg.CONF, url=url),
        [messaging.Target(topic=NOTIFICATIONS)], [events])
    listener.start()
    proc = subprocess.Popen([sys.executable, __file__, "--transport-url", url, "--role",
                             "compute", "--prefix", TOPIC.rpartition("_")[0]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "compute ready"
    transport = messaging.get_rpc_transport(cfg.CONF, url=url)
    client = messaging.get_rpc_client(transport, messaging.Target(topic=TOPIC, version="1.1"),
                                      timeout=30)
    ctxt = {"user_id": "demo", "project_id": "demo"}
    start = time.monotonic()
    print("call  ->", client.call(ctxt, "create", name="vm1", flavor="m1.small"))
    client.cast(ctxt, "delete", name="vm1")
    print("count ->", client.call(ctxt, "count"))
    deadline = time.monotonic() + 10
    while len(events.seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("notifications ->", events.seen)
    print(f"done in {time.monotonic() - start:.3f}s over {url.split(':')[0]}")
    ok = events.seen == ["compute.instance.create", "compute.instance.delete"]
    proc.stdin.close()
    proc.wait(30)
    listener.stop()
    listener.wait()
    transport.cleanup()
    return 0 if ok and proc.returncode == 0 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport-url", default="zmqfast://")
    parser.add_argument("--role", choices=["api", "compute"], default="api")
    parser.add_argument("--prefix", default="example",
                        help="of the topic names (runs sharing a broker keep apart)")
    args = parser.parse_args()
    global TOPIC, NOTIFICATIONS
    TOPIC, NOTIFICATIONS = f"{args.prefix}_compute", f"{args.prefix}_notifications"
    cfg.CONF([], project="example")
    if args.role == "compute":
        compute(args.transport_url)
        return 0
    return api(args.transport_url)


if __name__ == "__main__":
    sys.exit(main())
