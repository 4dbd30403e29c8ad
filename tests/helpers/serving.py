"""How a test's service process waits to be told to stop."""
import os
import select
import signal
import sys
import threading

STDIN_CLOSED = 0                # no signal has this number


def serve_until_told(conn):
    """Print "READY <address>" and return once the test says stop: SIGTERM,
    or stdin closing (the test process holds it: if the test dies, so does
    its service)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    # Python writes the number of a signal it handles to the wakeup fd, from
    # whichever thread the kernel delivered it to: the main thread, blocked
    # below, sees it even when another thread took the SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    threading.Thread(target=lambda: (sys.stdin.read(), os.write(wake_w, bytes([STDIN_CLOSED]))),
                     daemon=True).start()
    print("READY", conn.address, flush=True)
    # Never a threading.Event's wait() here: a signal handler's set() would
    # run on this thread, maybe while it holds the event's lock.  The pipe
    # stays open: a later SIGTERM only writes to it again.
    while True:
        select.select([wake_r], [], [])
        if {signal.SIGTERM, STDIN_CLOSED} & set(os.read(wake_r, 512)):
            return
