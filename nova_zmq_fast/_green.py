"""Living next to eventlet.

The core's worker threads must be real OS threads (they block in libzmq and
on pthread conditions), and the oslo.messaging driver's wake-up pipe must
use the real os.read/os.write on its non-blocking descriptors (eventlet's
versions would wait for data instead of raising).  `unpatched()` gives the
standard module as it was before any monkey-patching; without eventlet it
is just the module.
"""
import importlib
import sys


def unpatched(name):
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None:
        return patcher.original(name)
    return importlib.import_module(name)


# -- waiting on eventlet's hub (the calling side's shared outboxes) -----------

_hubs = None
_event = None


def event():
    """An eventlet Event: wait(timeout) parks only the green thread."""
    global _event
    if _event is None:
        import eventlet.event
        _event = eventlet.event.Event
    return _event()


def _ignore(*args):
    pass


def watch(fd, callback):
    """Call `callback()` in the hub of this thread whenever `fd` is
    readable, until unwatch().  The callback runs in the hub itself: it
    must not block, and should only wake green threads."""
    global _hubs
    if _hubs is None:
        import eventlet.hubs
        _hubs = eventlet.hubs
    hub = _hubs.get_hub()
    return hub.add(hub.READ, fd, lambda _fd: callback(), _ignore, _ignore)


def unwatch(listener):
    _hubs.get_hub().remove(listener)
