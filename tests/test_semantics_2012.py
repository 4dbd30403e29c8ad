"""What the 2012 driver's callers relied on: remote exceptions that show
the remote traceback in str(), the transport's own exceptions keeping
their detail across a call, and direct topics ('topic.<host>')."""
import json
import subprocess
import sys

import pytest

from nova_zmq_fast.exceptions import remote_message, remote_type_name
from tests.conftest import ChildProcess, wait_until
from tests.helpers.errors import CustomError, InstanceNotFound

CTX = {"user_id": "u1"}


def msg(method, **args):
    return {"method": method, "args": args}


def test_str_of_a_remote_exception_is_its_message_then_the_remote_traceback(services, client):
    with pytest.raises(ValueError) as info:
        client.call(CTX, "svc", msg("fail", kind="value", text="bad value"))
    exc = info.value
    text = str(exc)
    assert text.startswith("bad value\n")
    assert "Traceback (most recent call last)" in text
    assert "raise ValueError(text)" in text
    assert text.index("bad value") < text.index("Traceback")
    assert exc.remote_traceback in text
    assert type(exc).__name__ == "ValueError_Remote" and isinstance(exc, ValueError)
    assert remote_message(exc) == "bad value" and remote_type_name(exc) == "ValueError"


def test_an_allowed_custom_exception_shows_its_traceback_too(services, client):
    with pytest.raises(CustomError) as info:
        client.call(CTX, "svc", msg("fail", kind="custom", text="custom text"))
    assert str(info.value).startswith("custom text\n")
    assert "CustomError" in str(info.value)


def test_the_transports_own_exception_keeps_its_detail(services, client):
    # The handler's nested call finds nobody: its NoListeners, as raised
    # there, reaches this caller with the topic it named.
    with pytest.raises(client.NoListeners) as info:
        client.call(CTX, "svc", msg("relay", topic="nobody-consumes-this", name="x"))
    exc = info.value
    assert "nobody-consumes-this" in str(exc)
    assert "<unknown>" not in remote_message(exc)
    assert remote_message(exc) == "No live consumer for topic nobody-consumes-this " \
                                  "(RPC method: x)"
    assert "Traceback" in str(exc)
    assert isinstance(exc, client.Timeout)


def test_remote_unsupported_version_keeps_its_message(services, client):
    with pytest.raises(client.UnsupportedRpcVersion) as info:
        client.call(CTX, "svc", {"method": "add", "args": {"a": 1, "b": 1}, "version": "1.9"})
    assert "1.9" in remote_message(info.value)


class Direct:
    def __init__(self):
        self.seen = []

    def where(self, ctxt, via):
        self.seen.append(via)
        return via


def test_a_consumer_of_topic_dot_this_host_serves_topic_too(client):
    # As the 2012 driver did (it consumed on the base topic name): topic
    # and topic.host both reach a consumer created on topic.<this host>.
    proxy = Direct()
    conn = client.create_connection()
    try:
        conn.create_consumer("direct2012.client", proxy)
        conn.consume_in_thread()
        assert client.call(CTX, "direct2012.client", msg("where", via="host")) == "host"
        assert client.call(CTX, "direct2012", msg("where", via="topic")) == "topic"
        assert proxy.seen == ["host", "topic"]
        assert conn.stats()["topics"] == ["direct2012", "direct2012.client"]
        # Removing it takes both away.
        conn.remove_consumer("direct2012.client")
        assert conn.stats()["topics"] == []
        with pytest.raises(client.Timeout):
            client.call(CTX, "direct2012", msg("where", via="gone"), timeout=2)
    finally:
        conn.close()


def test_removing_the_host_consumer_keeps_the_topic_consumer_nova_made(client):
    """Nova's Service.start() consumes 'compute' and 'compute.<host>' on one
    connection; removing the second leaves 'compute' served and announced."""
    proxy = Direct()
    conn = client.create_connection()
    try:
        conn.create_consumer("nova2012", proxy)
        conn.create_consumer("nova2012.client", proxy)
        conn.consume_in_thread()
        conn.remove_consumer("nova2012.client")
        assert conn.stats()["topics"] == ["nova2012"]
        for i in range(4):          # each time: still found in discovery
            assert client.call(CTX, "nova2012", msg("where", via=i), timeout=5) == i
    finally:
        conn.close()


def test_a_consumer_of_another_hosts_topic_is_not_widened(client):
    conn = client.create_connection()
    try:
        conn.create_consumer("direct2012.elsewhere", Direct())
        conn.consume_in_thread()
        assert conn.stats()["topics"] == ["direct2012.elsewhere"]
    finally:
        conn.close()


def test_a_folsom_service_runs_unchanged_under_eventlet(ipc_dir, client):
    """Folsom Nova's shape (tests/helpers/folsom_service.py): monkey-patched,
    its manager behind rpc.dispatcher, a client API on rpc.proxy, errors
    from rpc.common; handlers and callers alike, and its own dispatcher
    with Folsom's signature."""
    from nova_zmq_fast.rpc import common as rpc_common
    from nova_zmq_fast.rpc import proxy as rpc_proxy
    svc = ChildProcess("folsom", [sys.executable, "-m", "tests.helpers.folsom_service",
                                  "--host", "node1", "--options",
                                  json.dumps({"rpc_zmq_ipc_dir": str(ipc_dir)})])
    try:
        api = rpc_proxy.RpcProxy(topic="compute", default_version="2.0")
        assert api.call(CTX, api.make_msg("ping", x=7)) == 7
        assert api.call(CTX, api.make_msg("ping", x=8), topic="compute.node1") == 8
        assert api.call(CTX, api.make_msg("relay", x=9)) == 9           # nested, green
        assert api.call(CTX, api.make_msg("hand_over", x=10)) == 10     # spawn_n + queue
        api.fanout_cast(CTX, api.make_msg("refresh", n=1))
        assert wait_until(lambda: api.call(CTX, api.make_msg("fanouts_seen")) == [1], 10)
        assert list(api.multicall(CTX, api.make_msg("ping", x=11))) == [11]
        with pytest.raises(rpc_common.RPCException, match="refused by policy"):
            api.call(CTX, api.make_msg("refuse"))
        with pytest.raises(rpc_common.UnsupportedRpcVersion, match="3.0, not supported"):
            api.call(CTX, api.make_msg("ping", x=1), version="3.0")
        # Folsom's own dispatcher: dispatch(ctxt, version, method, **kwargs).
        assert api.call(CTX, api.make_msg("whoami"), topic="compute_folsom") == "node1"

        class RequestContext(rpc_common.CommonRpcContext):
            pass                                    # nova.context's base, as it was

        ctxt = RequestContext(user_id="u7", project_id="p")
        assert (ctxt.user_id, ctxt.deepcopy().to_dict()) == ("u7", ctxt.values)
        assert api.call(ctxt, api.make_msg("whois")) == "u7"
        assert ctxt.elevated().is_admin and "admin" in ctxt.elevated().roles
        assert "is_admin" not in ctxt.values
        # The context a handler gets: elevated(), deepcopy(), values.
        assert api.call(ctxt, api.make_msg("admin_view")) == {
            "is_admin": True, "roles": ["admin"], "read_deleted": "yes", "unchanged": True,
            "copy": True}
        # Exceptions as Nova raised them: rebuilt from their keyword
        # arguments; a 2012 RPCException's `message` template; expected
        # exceptions; a builtin re-raised two hops away keeps its type.
        with pytest.raises(InstanceNotFound) as info:
            api.call(CTX, api.make_msg("lookup", instance_id=7))
        assert info.value.kwargs == {"instance_id": 7, "code": 404}
        assert remote_message(info.value) == "Instance 7 could not be found."
        with pytest.raises(rpc_common.RPCException) as info:
            api.call(CTX, api.make_msg("legacy_refusal", what="resize"))
        assert remote_message(info.value) == "refused resize"
        with pytest.raises(KeyError):
            api.call(CTX, api.make_msg("expected_miss", key="k"))
        with pytest.raises(ValueError) as info:
            api.call(CTX, api.make_msg("relay_failure"))
        assert remote_type_name(info.value) == "ValueError"
        assert "bad value two hops away" in str(info.value)
        # Values openstack.common.rpc's JSON encoder converted.
        assert api.call(CTX, api.make_msg("created_at")) == "2012-09-27T01:02:03.000004"
        assert api.call(CTX, api.make_msg("sorted_ids", ids={3, 1, 2})) == [1, 2, 3]
        assert api.call(CTX, api.make_msg("ping", x=12), timeout=0) == 12   # 0: the default
        conn = client.create_connection()
        conn.close()
        with pytest.raises(rpc_common.InvalidRPCConnectionReuse):
            conn.create_consumer("late", object())
    finally:
        assert svc.stop() == 0


CONFIG_SCRIPT = """
import json, sys
from oslo_config import cfg
cfg.CONF(args=[], default_config_files=[sys.argv[1]])
from nova_zmq_fast import rpc
if sys.argv[2] == "init":
    rpc.init(cfg.CONF)
opts = rpc._runtime().options
# oslo.messaging registers its own rpc_response_timeout on the same CONF.
import oslo_messaging
transport = oslo_messaging.get_rpc_transport(cfg.CONF, url="zmqfast://")
oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic="t"))
transport.cleanup()
print(json.dumps([opts.rpc_zmq_host, opts.rpc_response_timeout, opts.rpc_zmq_ipc_dir]))
rpc.cleanup()
"""


@pytest.mark.parametrize("how", ["first-use", "init"])
def test_options_come_from_the_services_config_file(tmp_path, how):
    """As openstack.common.rpc read them: [DEFAULT] of the service's
    oslo.config files, with no init() or with init(cfg.CONF); and
    oslo.messaging can still register its options on the same CONF."""
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[DEFAULT]\nrpc_zmq_host = from-conf\nrpc_response_timeout = 17\n"
                    f"rpc_zmq_ipc_dir = {tmp_path}\n")
    proc = subprocess.run([sys.executable, "-c", CONFIG_SCRIPT, str(conf), how],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == ["from-conf", 17, str(tmp_path)]


def test_the_exception_codec_takes_the_2012_arguments_both_ways():
    """serialize_remote_exception(sys.exc_info()) and
    deserialize_remote_exception(conf, data), with data as this transport
    sends it or as openstack.common.rpc sent it (JSON)."""
    from nova_zmq_fast.rpc import common

    class Conf:
        allowed_rpc_exception_modules = ["builtins", "tests.helpers.errors"]
    try:
        raise InstanceNotFound(instance_id=7)
    except InstanceNotFound:
        data = common.serialize_remote_exception(sys.exc_info())
    exc = common.deserialize_remote_exception(Conf(), data)
    assert isinstance(exc, InstanceNotFound)
    assert exc.kwargs == {"instance_id": 7, "code": 404}
    legacy = json.dumps({"class": "InstanceNotFound", "module": "tests.helpers.errors",
                         "message": "Instance 8 could not be found.",
                         "tb": ["Traceback (most recent call last):\n", "  ...\n"],
                         "args": ["Instance 8 could not be found."],
                         "kwargs": {"instance_id": 8}})
    exc = common.deserialize_remote_exception(Conf(), legacy)
    assert isinstance(exc, InstanceNotFound) and exc.kwargs == {"instance_id": 8, "code": 404}
    assert remote_message(exc) == "Instance 8 could not be found."


def test_a_failure_with_kwargs_is_still_read_by_a_reader_that_takes_only_lists():
    """The wire form stays five fields; a reader that predates kwargs (it
    rebuilds from [message] when args is not a list) keeps the type."""
    from nova_zmq_fast.exceptions import serialize_remote_exception
    module, name, text, args, tb = serialize_remote_exception(InstanceNotFound(instance_id=9))
    assert (module, name) == ("tests.helpers.errors", "InstanceNotFound")
    assert isinstance(args, dict) and args["kwargs"] == {"instance_id": 9, "code": 404}
    rebuilt = InstanceNotFound(*(args if isinstance(args, (list, tuple)) else [text]))
    assert str(rebuilt) == "Instance 9 could not be found."
    plain = serialize_remote_exception(ValueError("v"))
    assert len(plain) == 5 and plain[3] == ["v"]
