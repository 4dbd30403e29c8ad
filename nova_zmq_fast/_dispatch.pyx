"""Turning a received request into a call of the consumer's code.

The receive loop (_server.pyx) parses the envelope, finds the topic's
Subscription (every consumer of that topic in this process: several
Connections may consume one topic) and asks one Consumer, round-robin, to
`invoke` the request; a fanout runs on each.  What create_consumer()
accepts as a proxy, and how it is called:

  * an object with dispatch(), such as an RpcDispatcher: called as
    dispatch(ctxt, version, method, namespace, **args), which applies the
    version rules (nova_zmq_fast.dispatcher);
  * a plain callable: called as proxy(ctxt, msg) with every raw message,
    which is how notification consumers are written;
  * any other object: its public method msg['method'] is called as
    method(ctxt, **args); names starting with '_' are never callable;
  * deferred (the oslo.messaging driver): proxy(ctxt, msg, replier), which
    answers a call later through the Replier (_server.pyx).

Notifications sent with notify(..., envelope=True) travel as
{'oslo.version': '2.0', 'oslo.message': <json>}; consumers get them unwrapped.
"""
import copy
import inspect
import json
import threading

cimport cython
from cpython.object cimport PyObject_Call

from nova_zmq_fast._envelope cimport KIND_CAST, KIND_NOTIFY
from nova_zmq_fast._zmq cimport now as _now

from nova_zmq_fast._envelope_py import to_primitive
from nova_zmq_fast.dispatcher import version_is_compatible
from nova_zmq_fast.exceptions import (
    InvalidMessage, SerializationError, UnsupportedRpcEnvelopeVersion)

cdef object _json_loads = json.loads
cdef object _deepcopy = copy.deepcopy
cdef object _json_dumps = json.dumps
ENVELOPE_VERSION = "2.0"                # openstack.common.rpc's message envelope


cdef object _store = None
cdef object _store_lock = threading.Lock()


def context_store():
    """Where a context's update_store() puts it, for the running thread
    (green thread under eventlet): `context_store().context`, as
    openstack.common.local.store.context."""
    global _store
    with _store_lock:
        if _store is None:
            # Made at first use, so that eventlet's patching, done by then,
            # makes it local to green threads.
            _store = threading.local()
        return _store


def elevated_values(dict values, read_deleted=None):
    """A deep copy of context values with is_admin set and the 'admin'
    role added: what elevated() returns, for every context class."""
    values = _deepcopy(values)
    values["is_admin"] = True
    roles = values.get("roles") or []
    roles = [roles] if isinstance(roles, str) else list(roles)
    if "admin" not in roles:
        roles.append("admin")
    values["roles"] = roles
    if read_deleted is not None:
        values["read_deleted"] = read_deleted
    return values


@cython.final
@cython.freelist(32)
cdef class RpcContext:
    """The request context a server method receives: attribute access to
    the caller's context values, and to_dict() for passing it on."""

    def __cinit__(self):
        self._values = {}

    def __init__(self, values=None, **kwargs):
        self._values = dict(values or (), **kwargs)

    @staticmethod
    cdef RpcContext wrap(dict values):
        cdef RpcContext ctx = RpcContext.__new__(RpcContext)
        ctx._values = values
        return ctx

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self._values[name] = value

    def __delattr__(self, name):
        try:
            del self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self):
        return dict(self._values)

    # What openstack.common.rpc's CommonRpcContext offered a handler.

    @property
    def values(self):
        return self._values

    @classmethod
    def from_dict(cls, values):
        return cls(values)

    def deepcopy(self):
        return RpcContext.wrap(_deepcopy(self._values))

    def update_store(self):
        context_store().context = self

    def elevated(self, read_deleted=None, overwrite=False):
        """A copy with the admin flag and role set."""
        return RpcContext.wrap(elevated_values(self._values, read_deleted))

    def __reduce__(self):
        return (RpcContext, (self._values,))

    def __eq__(self, other):
        if isinstance(other, RpcContext):
            return self._values == (<RpcContext>other)._values
        return NotImplemented

    def __repr__(self):
        return f"RpcContext({self._values!r})"


@cython.final
cdef class Consumer:
    """What a server does with messages for one topic: call into `proxy`."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Consumer is not supposed to be instantiated from Python; "
                        "use Connection.create_consumer()")

    @staticmethod
    cdef Consumer new(str topic, bint fanout, object proxy, bint deferred, object owner):
        cdef Consumer c = Consumer.__new__(Consumer)
        c.topic = topic
        c.fanout = fanout
        c.proxy = proxy
        c.owner = owner
        c.dispatch = getattr(proxy, "dispatch", None)
        if deferred:
            c.mode = PROXY_DEFERRED
        elif callable(c.dispatch):
            c.mode = PROXY_DISPATCHER if _takes_namespace(c.dispatch) else PROXY_DISPATCHER_2012
        elif callable(proxy):
            c.mode = PROXY_CALLABLE
        else:
            c.mode = PROXY_METHODS
        return c

    cdef object invoke(self, RpcContext ctxt, dict msg, int kind):
        if kind == KIND_NOTIFY:
            msg = unwrap(msg)
        if self.mode == PROXY_CALLABLE:
            return self.proxy(ctxt, msg)
        if self.mode == PROXY_DEFERRED:
            return self.proxy(ctxt, msg, None)
        method = msg.get("method")
        if type(method) is not str or not method:
            raise InvalidMessage("message has no 'method'")
        args = msg.get("args")
        if args is None:
            args = {}
        elif type(args) is not dict:
            raise InvalidMessage("message 'args' is not a dict")
        if self.mode == PROXY_DISPATCHER:
            return self.dispatch(ctxt, msg.get("version"), method, msg.get("namespace"),
                                 **args)
        if self.mode == PROXY_DISPATCHER_2012:
            if msg.get("namespace") is not None:
                raise InvalidMessage(f"namespace {msg.get('namespace')!r}: this consumer's "
                                     f"dispatcher (Folsom's) has no namespaces")
            return self.dispatch(ctxt, msg.get("version"), method, **args)
        target = None
        if (<str>method)[0] != "_":
            target = getattr(self.proxy, method, None)
        if target is None or not callable(target):
            raise AttributeError(f"No such RPC function '{method}'")
        return PyObject_Call(target, (ctxt,), args)

    cdef bint accepts(self, object version, object namespace) except -1:
        """Would this consumer serve a call of `version`?  Only a dispatcher
        has version rules (RpcDispatcher.accepts); other proxies take any,
        but a deferred proxy may say (it hands requests on to one)."""
        if self.mode == PROXY_DEFERRED:
            accepts = getattr(self.proxy, "accepts", None)
            return True if accepts is None else bool(accepts(version, namespace))
        if self.mode != PROXY_DISPATCHER and self.mode != PROXY_DISPATCHER_2012:
            return True
        accepts = getattr(self.proxy, "accepts", None)
        return True if accepts is None else bool(accepts(version, namespace))

    cdef void begin(self) noexcept:
        # Called by the receive loop with the GIL held, in the same stretch
        # as the lookup that chose this consumer: a closing Connection that
        # sees active == 0 after removing it knows no call is on its way.
        self.active += 1
        if self.closing:
            self.last_used = _now()

    cdef void end(self) noexcept:
        self.active -= 1


def _takes_namespace(dispatch):
    """Does an RpcDispatcher's dispatch() take the namespace (Grizzly and
    later: dispatch(ctxt, version, method, namespace, **kwargs)), or is it
    Folsom's dispatch(ctxt, version, method, **kwargs)?"""
    try:
        parameters = inspect.signature(dispatch).parameters
    except (TypeError, ValueError):             # no signature to read: the newer API
        return True
    if "namespace" in parameters:
        return True
    positional = [p for p in parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 or any(p.kind == p.VAR_POSITIONAL
                                       for p in parameters.values())


def consumer(str topic not None, bint fanout, proxy):
    """A Consumer outside any server, with a Python-level handle(context,
    message) that runs one cast as the receive loop does: for tests and
    micro-benchmarks."""
    return _Standalone(Consumer.new(topic, fanout, proxy, False, None))


cdef class _Standalone:
    cdef Consumer consumer

    def __cinit__(self, Consumer consumer not None):
        self.consumer = consumer

    def handle(self, dict context not None, dict message not None):
        return self.consumer.invoke(RpcContext.wrap(context), message, KIND_CAST)

    def run(self, RpcContext ctxt not None, dict message not None):
        """Call into the proxy as the receive loop would, with a context
        it already made (the green and asyncio hand-offs)."""
        return self.consumer.invoke(ctxt, message, KIND_CAST)

    def accepts(self, version, namespace):
        return self.consumer.accepts(version, namespace)


@cython.final
cdef class Subscription:
    """Every local consumer of one topic (direct or fanout)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Subscription is not supposed to be instantiated from Python")

    @staticmethod
    cdef Subscription new(tuple consumers):
        cdef Subscription s = Subscription.__new__(Subscription)
        s.consumers = consumers
        s.turn = 0
        return s

    cdef Consumer pick(self):
        cdef Py_ssize_t n = len(self.consumers)
        if n == 1:
            return <Consumer>self.consumers[0]
        self.turn = (self.turn + 1) % n
        return <Consumer>self.consumers[self.turn]


def unwrap(msg):
    """Undo notify(..., envelope=True): {'oslo.version', 'oslo.message'}."""
    if "oslo.message" in msg and "oslo.version" in msg:
        if not version_is_compatible(ENVELOPE_VERSION, msg["oslo.version"]):
            raise UnsupportedRpcEnvelopeVersion(version=msg["oslo.version"])
        inner = msg["oslo.message"]
        try:
            inner = _json_loads(inner) if isinstance(inner, str) else inner
        except ValueError:
            raise InvalidMessage("enveloped message is not valid JSON") from None
        if not isinstance(inner, dict):
            raise InvalidMessage("enveloped message is not a dict")
        return inner
    return msg


def wrap(msg):
    """The envelope notify(..., envelope=True) sends."""
    try:
        return {"oslo.version": ENVELOPE_VERSION, "oslo.message": _json_dumps(msg, default=to_primitive)}
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"notification cannot be encoded as JSON: {exc}") from None
