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
