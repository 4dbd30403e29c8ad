"""Logging what remote peers cause, at a bounded rate.

A hostile or broken peer can send thousands of bad messages a second; each
must be dropped and counted, but logging each would flood the log (and the
disk).  A RateLimitedLog writes at most one message per kind per interval,
and the next one of that kind says how many it held back.
"""
import logging
import time

from nova_zmq_fast._green import unpatched


class RateLimitedLog:

    def __init__(self, logger, interval=10.0):
        self.logger = logger
        self.interval = interval
        self._kinds = {}                    # kind -> [quiet until, held back]
        self._lock = unpatched("threading").Lock()

    def log(self, level, kind, msg, *args, exc_info=None):
        """Log `msg % args` unless a message of `kind` was logged less than
        `interval` ago; True if it was logged."""
        now = time.monotonic()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now < entry[0]:
                entry[1] += 1
                return False
            held = entry[1] if entry is not None else 0
            self._kinds[kind] = [now + self.interval, 0]
        if held:
            msg += " (and %d more like this in the last %gs)"
            args += (held, self.interval)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, kind, msg, *args, **kw):
        return self.log(logging.WARNING, kind, msg, *args, **kw)

    def error(self, kind, msg, *args, **kw):
        return self.log(logging.ERROR, kind, msg, *args, **kw)
