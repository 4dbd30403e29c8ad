"""Exceptions raised by nova_zmq_fast, named as openstack.common.rpc named them.

Each class that describes bad input also inherits the matching builtin
(`ValueError`, `TypeError`), so callers can catch either.
"""


class RPCException(Exception):
    """Base class.  `msg_fmt` is formatted with the keyword arguments (a
    subclass written for openstack.common.rpc names it `message`, which
    works too)."""

    msg_fmt = "An unknown RPC related exception occurred."

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        if not message:
            template = _template(type(self))
            try:
                message = template % kwargs
            except (KeyError, TypeError, ValueError):
                message = template
        self.message = message
        super().__init__(message)


def _template(cls):
    # The most derived class that sets a template: as msg_fmt, or in the
    # 2012 way as a class attribute `message`.
    for klass in cls.__mro__:
        if "msg_fmt" in klass.__dict__:
            return klass.__dict__["msg_fmt"]
        if isinstance(klass.__dict__.get("message"), str):
            return klass.__dict__["message"]
    return RPCException.msg_fmt


class Timeout(RPCException):
    """No reply arrived in time.  `topic` and `method` say which call."""

    msg_fmt = "Timeout while waiting on RPC response - topic: %(topic)s, RPC method: %(method)s info: %(info)s"

    def __init__(self, info=None, topic=None, method=None):
        self.info = info
        self.topic = topic
        self.method = method
        super().__init__(None, info=info or "<unknown>",
                         topic=topic or "<unknown>", method=method or "<unknown>")


class NoListeners(Timeout):
    """Discovery knows no live consumer for the topic, so nothing was sent.

    A subclass of Timeout because that is what callers of the original
    driver already handle; it is raised at once instead of after waiting."""

    msg_fmt = "No live consumer for topic %(topic)s (RPC method: %(method)s)"

    def __init__(self, info=None, topic=None, method=None):
        super().__init__(info, topic, method)
        if info and "%(info)s" not in self.msg_fmt:
            self.message = f"{self.message}: {info}"     # the reason, when known
            self.args = (self.message,)


class DiscoveryUnavailable(NoListeners):
    """The discovery backend cannot be reached and knows nothing cached
    about the topic, so nothing was sent.  Topics already in use keep their
    cached routes through an outage; only a topic never looked up before
    fails this way."""

    msg_fmt = "Discovery is unreachable and topic %(topic)s is not cached: %(info)s"


class DiscoveryRefused(DiscoveryUnavailable):
    """The discovery backend refused this process's credentials (a wrong
    or missing password): a configuration error, raised when a server
    registers, so that it fails at start instead of serving unseen."""

    msg_fmt = "%(info)s"


class PeerUnreachable(Timeout):
    """No connection to the named server could be made within
    rpc_zmq_connect_timeout, so nothing was sent to it."""

    msg_fmt = "%(info)s"


class StreamTruncated(RPCException):
    """A multicall's stream lost values on the way: its caller read them
    more slowly than the server produced them, until its queue was full.
    The values before the first lost one arrived; this takes the place of
    the stream's normal end."""

    msg_fmt = ("%(lost)s value(s) of this multicall's stream were lost on the way (the "
               "caller read too slowly): the stream is incomplete")


class InvalidRPCConnectionReuse(RPCException):
    """A Connection used after close()."""

    msg_fmt = "Invalid reuse of an RPC connection."


class TransportClosed(RPCException):
    """The transport was cleaned up (rpc.cleanup(), a driver's cleanup())
    before, or while, this operation ran: nothing more is sent."""


class KeyRevoked(RPCException):
    """The server took this process's CURVE key out of its allow-list
    while a connection made with it was open: nothing sent on it runs."""


class RemoteFailure(Exception):
    """A FAILURE reply, not rebuilt yet: what a runtime shared by
    oslo.messaging transports raises, each transport rebuilding it with its
    own allowed modules.  `failure` is the reply's value."""

    def __init__(self, failure):
        super().__init__(failure)
        self.failure = failure


class RemoteError(RPCException):
    """The remote method raised an exception this process may not re-create.

    `exc_type` is the remote class name, `value` its message and `traceback`
    the remote traceback as text."""

    msg_fmt = "Remote error: %(exc_type)s %(value)s\n%(traceback)s."

    def __init__(self, exc_type=None, value=None, traceback=None):
        self.exc_type = exc_type
        self.value = value
        self.traceback = traceback
        super().__init__(None, exc_type=exc_type, value=value, traceback=traceback)


class UnsupportedRpcVersion(RPCException):
    msg_fmt = "Specified RPC version, %(version)s, not supported by this endpoint."


class UnsupportedRpcEnvelopeVersion(RPCException):
    """A notification wrapped in an 'oslo.version' envelope this transport
    does not know."""

    msg_fmt = "Specified RPC envelope version, %(version)s, not supported by this endpoint."


class ClientException(Exception):
    """An exception a method expects to raise (see client_exceptions()):
    made while it is being handled, it records it; the caller gets the
    original exception, and the service logs nothing."""

    def __init__(self):
        import sys
        self._exc_info = sys.exc_info()


def catch_client_exception(exceptions, func, *args, **kwargs):
    """func(*args, **kwargs), raising ClientException instead of an
    exception whose type is in `exceptions`."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        if type(exc) in exceptions:
            raise ClientException() from exc
        raise


def client_exceptions(*exceptions):
    """Decorator for methods whose listed exceptions are expected: the
    caller gets them as usual, but they are not logged as errors."""
    import functools

    def outer(func):
        @functools.wraps(func)
        def inner(*args, **kwargs):
            return catch_client_exception(exceptions, func, *args, **kwargs)
        return inner
    return outer


def expected(exc):
    """The exception a ClientException stands for, else `exc` itself."""
    if isinstance(exc, ClientException) and exc._exc_info[1] is not None:
        return exc._exc_info[1]
    return exc


class InvalidMessage(RPCException, ValueError):
    """A message given to the API is not `{'method': str, ...}`."""


class SerializationError(RPCException, TypeError):
    """The context or message holds something msgpack cannot encode."""


class MessageTooLarge(RPCException, ValueError):
    """The encoded message exceeds rpc_zmq_max_message_size."""


class MalformedEnvelope(ValueError):
    """Bytes received from the network are not a valid envelope."""


# -- remote exceptions on the wire ------------------------------------------
#
# A failure travels as [module, class name, message, args, traceback text].
# `args` is the exception's args, or {"args": [...], "kwargs": {...}} for one
# that carries keyword arguments: a reader that predates kwargs takes a
# non-list as [message], and still rebuilds the exception's type.

def serialize_remote_exception(failure_info, log_failure=False):
    """The wire form of an exception (or of a sys.exc_info() tuple, as
    openstack.common.rpc took it; log_failure=True also logs it).  A
    re-raised remote exception travels as its original class, so that it
    survives any number of hops."""
    import logging
    import traceback

    import msgpack

    exc = failure_info[1] if isinstance(failure_info, tuple) else failure_info
    exc = expected(exc)
    cls = type(exc)
    text = str(exc)
    if _is_remote(exc):
        cls, text = cls.__mro__[1], remote_message(exc)
    if log_failure:
        logging.getLogger("nova_zmq_fast.exceptions").error(
            "Returning exception %s to caller", text, exc_info=(type(exc), exc, exc.__traceback__))
    from nova_zmq_fast._envelope_py import to_primitive

    def packable(value, otherwise):
        try:
            msgpack.packb(value, use_bin_type=True, default=to_primitive)
            return value
        except (TypeError, ValueError, OverflowError):
            return otherwise
    args = packable(list(exc.args), [text])
    kwargs = getattr(exc, "kwargs", None)
    kwargs = packable(dict(kwargs), {}) if isinstance(kwargs, dict) else {}
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [cls.__module__, cls.__qualname__, text,
            {"args": args, "kwargs": kwargs} if kwargs else args, tb]


def deserialize_remote_exception(failure, allowed_modules):
    """Re-create the remote exception as its own type when its module is
    allowed (builtins by default), else as RemoteError.  Also takes
    openstack.common.rpc's arguments, (conf, data): options that name
    allowed_rpc_exception_modules, and a failure in its JSON or ours."""
    import builtins
    import importlib
    import sys

    if hasattr(failure, "allowed_rpc_exception_modules"):
        # (conf, data): data as 2012 sent it (JSON), or as above.
        conf, failure = failure, allowed_modules
        allowed_modules = tuple(conf.allowed_rpc_exception_modules or ())
        if isinstance(failure, (str, bytes, dict)):
            failure = _failure_2012(failure)
    try:
        module, name, text, args, tb = failure
        module, name, text, tb = str(module), str(name), str(text), str(tb)
        kwargs = {}
        if isinstance(args, dict):
            kwargs = args.get("kwargs")
            kwargs = {str(k): v for k, v in kwargs.items()} if isinstance(kwargs, dict) else {}
            args = args.get("args")
        args = list(args) if isinstance(args, (list, tuple)) else [text]
    except (TypeError, ValueError, AttributeError):
        return RemoteError("Unknown", "malformed failure reply", "")
    if module in ("builtins", "exceptions") and ("builtins" in allowed_modules
                                                 or "exceptions" in allowed_modules):
        cls = getattr(builtins, name, None)
    elif module in allowed_modules:
        try:
            obj = sys.modules.get(module) or importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
            cls = obj
        except (ImportError, AttributeError):
            cls = None
    else:
        cls = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        exc = _rebuild(cls, args, kwargs, text, tb)
        if exc is not None:
            return exc
    return RemoteError(name, text, tb)


def _failure_2012(data):
    """openstack.common.rpc's JSON failure as the wire form above."""
    import json
    try:
        d = json.loads(data) if isinstance(data, (str, bytes)) else data
        tb = d.get("tb", "")
        return [d.get("module"), d.get("class"), d.get("message", ""),
                {"args": d.get("args", []), "kwargs": d.get("kwargs") or {}},
                "".join(tb) if isinstance(tb, list) else tb]
    except (TypeError, ValueError, AttributeError):
        return None


_remote_classes = {}


def _remote_class(cls):
    """`<Name>_Remote`: a subclass of `cls` whose str() is the message
    followed by the remote traceback, as the 2012 driver made it.  It is
    still caught as `cls`, and keeps `cls`'s name in its module."""
    remote = _remote_classes.get(cls)
    if remote is None:
        def __str__(self):
            return f"{remote_message(self)}\n{self.remote_traceback}"

        try:
            remote = type(f"{cls.__name__}_Remote", (cls,),
                          {"__str__": __str__, "__module__": cls.__module__})
        except TypeError:                   # a class that cannot be subclassed
            remote = cls
        _remote_classes[cls] = remote
    return remote


def _rebuild(cls, args, kwargs, text, tb):
    remote = _remote_class(cls)
    try:
        if issubclass(cls, RPCException):
            # The transport's own: the message as it was raised, not
            # re-formatted from arguments it was not given here.
            exc = remote.__new__(remote)
            RPCException.__init__(exc, text)
            exc.kwargs = kwargs
            if issubclass(cls, Timeout):
                exc.info, exc.topic, exc.method = text, None, None
            if issubclass(cls, RemoteError):
                exc.exc_type, exc.value, exc.traceback = cls.__name__, text, tb
        elif kwargs:
            # As openstack.common.rpc rebuilt them: from keyword arguments
            # (a service's exceptions format their message from them).
            try:
                exc = remote(**kwargs)
            except TypeError:
                exc = remote(*args)
        else:
            exc = remote(*args)
    except Exception:
        return None
    try:
        exc.remote_traceback = tb
    except AttributeError:
        return None if remote is not cls else exc
    return exc


def _is_remote(exc):
    return (getattr(exc, "remote_traceback", None) is not None
            and type(exc).__name__.endswith("_Remote"))


def remote_message(exc):
    """An exception's message without the remote traceback that str()
    appends to a re-raised remote exception."""
    if _is_remote(exc):
        return type(exc).__mro__[1].__str__(exc)
    return str(exc)


def remote_type_name(exc):
    """The name of the class the remote side raised."""
    if isinstance(exc, RemoteError) and exc.exc_type and not hasattr(exc, "remote_traceback"):
        return exc.exc_type
    name = type(exc).__name__
    return name[:-len("_Remote")] if name.endswith("_Remote") else name
