"""How a test's service process waits to be told to stop."""
import signal
import sys
import threading
import time


def serve_until_told(conn, poll=0.2):
    """Print "READY <address>" and return once the test says stop: SIGTERM,
    or stdin closing (the test process holds it: if the test dies, so does
    its service)."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("READY", conn.address, flush=True)
    # Never done.wait() here: a signal handler's done.set() would then run
    # on this thread while it holds the event's lock, and wait for itself.
    while not done.is_set():
        time.sleep(poll)
