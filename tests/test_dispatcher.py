"""Version rules of RpcDispatcher (the wire path is covered in test_rpc)."""
import pytest

from nova_zmq_fast._dispatch import unwrap, wrap
from nova_zmq_fast.dispatcher import RpcDispatcher, version_is_compatible
from nova_zmq_fast.exceptions import InvalidMessage, UnsupportedRpcVersion


@pytest.mark.parametrize("implemented,requested,ok", [
    ("1.0", "1.0", True), ("1.3", "1.0", True), ("1.3", "1.3", True), ("1.3", "1.4", False),
    ("1.3", "2.0", False), ("2.1", "1.0", False), ("1.0", "1", True), ("1.0", "x.y", False),
    ("1.10", "1.9", True), ("1.9", "1.10", False),
])
def test_version_is_compatible(implemented, requested, ok):
    assert version_is_compatible(implemented, requested) is ok


class V1:
    RPC_API_VERSION = "1.2"

    def hello(self, ctxt, name):
        return f"v1 {name}"

    def _secret(self, ctxt):
        return "never"


class V1Newer:
    RPC_API_VERSION = "1.5"

    def newer(self, ctxt):
        return "newer"


class Ns:
    RPC_API_NAMESPACE = "admin"

    def hello(self, ctxt, name):
        return f"admin {name}"


def test_dispatch_rules():
    d = RpcDispatcher([V1(), V1Newer(), Ns()])
    assert d.dispatch(None, None, "hello", None, name="a") == "v1 a"       # missing = 1.0
    assert d.dispatch(None, "1.2", "hello", None, name="a") == "v1 a"
    assert d.dispatch(None, "1.4", "newer", None) == "newer"
    assert d.dispatch(None, "1.0", "hello", "admin", name="b") == "admin b"
    with pytest.raises(AttributeError):
        d.dispatch(None, "1.0", "missing", None)
    with pytest.raises(AttributeError):
        d.dispatch(None, "1.0", "_secret", None)
    with pytest.raises(UnsupportedRpcVersion):
        d.dispatch(None, "1.6", "newer", None)
    with pytest.raises(UnsupportedRpcVersion):
        d.dispatch(None, "2.0", "hello", None, name="x")
    with pytest.raises(UnsupportedRpcVersion):
        d.dispatch(None, "1.0", "hello", "other", name="x")


def test_envelope_wrapping():
    assert unwrap(wrap({"a": 1})) == {"a": 1}
    assert unwrap({"a": 1}) == {"a": 1}
    with pytest.raises(InvalidMessage):
        unwrap({"oslo.version": "2.0", "oslo.message": "{not json"})


def test_rpc_context():
    import copy

    from nova_zmq_fast.rpc import RpcContext

    ctxt = RpcContext({"user_id": "u", "roles": ["admin"]}, request_id="r")
    assert ctxt.user_id == "u" and ctxt.request_id == "r"
    with pytest.raises(AttributeError):
        ctxt.missing
    ctxt.read_deleted = "no"
    assert ctxt.to_dict() == {"user_id": "u", "roles": ["admin"], "request_id": "r",
                              "read_deleted": "no"}
    ctxt.to_dict()["user_id"] = "changed"           # a copy
    assert ctxt.user_id == "u"
    clone = copy.deepcopy(ctxt)
    assert clone == ctxt and clone is not ctxt
    clone.roles.append("member")
    assert ctxt.roles == ["admin"]
    del ctxt.read_deleted
    assert "read_deleted" not in ctxt.to_dict()
    assert RpcContext.__new__(RpcContext).to_dict() == {}
