"""Bad arguments at the API raise a clear exception before anything is
sent; options are checked when given."""
import pytest

from nova_zmq_fast import rpc
from nova_zmq_fast.options import Options
from tests.conftest import ServiceProcess

CTX = {"user_id": "u"}
GOOD = {"method": "echo", "args": {"value": 1}}

BAD_TOPICS = [
    ("", ValueError), ("a/b", ValueError), ("..", ValueError), (".", ValueError),
    ("a\\b", ValueError), ("has space", ValueError), ("tab\t", ValueError),
    ("nul\0", ValueError), ("x" * 256, ValueError), (None, TypeError), (b"svc", TypeError),
    (42, TypeError),
]
BAD_MESSAGES = [
    (None, rpc.InvalidMessage), ("echo", rpc.InvalidMessage), (["echo"], rpc.InvalidMessage),
    ({}, rpc.InvalidMessage), ({"method": ""}, rpc.InvalidMessage),
    ({"method": 5}, rpc.InvalidMessage), ({"args": {}}, rpc.InvalidMessage),
    ({"method": "echo", "args": [1]}, rpc.InvalidMessage),
    ({"method": "echo", "args": {"value": object()}}, rpc.SerializationError),
    ({"method": "echo", "args": {"value": 1 + 2j}}, rpc.SerializationError),
    ({"method": "echo", "args": {"value": "x" * 5000}}, rpc.MessageTooLarge),
]


@pytest.fixture(scope="module")
def server(ipc_dir):
    service = ServiceProcess("api1", ipc_dir)
    yield service
    assert service.stop() == 0


@pytest.fixture
def api(server, ipc_dir, client):
    rpc.init(rpc_zmq_ipc_dir=str(ipc_dir), rpc_zmq_host="client",
             rpc_zmq_max_message_size=4096)
    assert rpc.call(CTX, "svc", GOOD) == 1
    yield rpc


def received(api):
    return api.call(CTX, "svc", {"method": "stats"})["received"]


def test_the_server_counts_what_it_receives(api):
    before = received(api)
    api.cast(CTX, "svc", GOOD)
    assert received(api) == before + 2          # the cast and the first stats call


@pytest.mark.parametrize("topic,error", BAD_TOPICS)
def test_bad_topic_is_refused_before_sending(api, topic, error):
    before = received(api)
    for send in (
        lambda: api.call(CTX, topic, GOOD),
        lambda: api.multicall(CTX, topic, GOOD),
        lambda: api.cast(CTX, topic, GOOD),
        lambda: api.fanout_cast(CTX, topic, GOOD),
        lambda: api.notify(CTX, topic, {"event_type": "x"}),
        lambda: api.cast_to_server(CTX, {"host": "127.0.0.1", "port": 1}, topic, GOOD),
        lambda: api.create_connection().create_consumer(topic, object()),
    ):
        with pytest.raises(error):
            send()
    assert received(api) == before + 1         # only the first stats call


@pytest.mark.parametrize("message,error", BAD_MESSAGES)
def test_bad_message_is_refused_before_sending(api, message, error):
    before = received(api)
    for send in (
        lambda: api.call(CTX, "svc", message),
        lambda: api.multicall(CTX, "svc", message),
        lambda: api.cast(CTX, "svc", message),
        lambda: api.fanout_cast(CTX, "svc", message),
    ):
        with pytest.raises(error):
            send()
    assert received(api) == before + 1


def test_errors_also_match_the_builtin_types(api):
    with pytest.raises(ValueError):
        api.cast(CTX, "svc", {"args": {}})
    with pytest.raises(TypeError):
        api.cast(CTX, "svc", {"method": "echo", "args": {"value": object()}})


def test_bad_context_is_refused(api):
    class NoDict:
        def to_dict(self):
            return ["not", "a", "dict"]

    for context in (42, "ctx", NoDict()):
        with pytest.raises(TypeError):
            api.cast(context, "svc", GOOD)
    assert api.call(None, "svc", GOOD) == 1         # no context at all is fine


@pytest.mark.parametrize("timeout", [-1, "5", True, False])
def test_bad_timeout_is_refused(api, timeout):
    with pytest.raises((TypeError, ValueError)):
        api.call(CTX, "svc", GOOD, timeout=timeout)


def test_bad_server_params(api):
    for params in ({}, {"host": ""}, {"host": "h", "port": "x"}, {"host": "h", "port": 70000},
                   {"address": "no-scheme"}, 5):
        with pytest.raises((TypeError, ValueError)):
            api.cast_to_server(CTX, params, "svc", GOOD)


def test_notification_must_be_a_dict(api):
    for bad in (None, "event", ["event"]):
        with pytest.raises(rpc.InvalidMessage):
            api.notify(CTX, "svc", bad)
        with pytest.raises(rpc.InvalidMessage):
            api.notify(CTX, "svc", bad, envelope=True)


def test_consumer_needs_a_proxy(api):
    with pytest.raises(TypeError):
        api.create_connection().create_consumer("svc", None)


def test_queue_get_for():
    assert rpc.queue_get_for(None, "compute", "node1") == "compute.node1"
    assert rpc.queue_get_for(None, "compute", None) == "compute"


# -- options --------------------------------------------------------------------

def test_defaults_are_the_original_drivers():
    opts = Options.from_conf()
    assert opts.rpc_zmq_matchmaker == "local"
    assert opts.rpc_response_timeout == 60 and opts.rpc_cast_timeout == 30
    assert opts.rpc_thread_pool_size == 64
    assert opts.rpc_zmq_ipc_dir == "/var/run/openstack"
    assert "builtins" in opts.allowed_rpc_exception_modules
    assert Options.from_conf(rpc_zmq_matchmaker="ring").port == 9501
    assert Options.from_conf().port == 0
    assert Options.from_conf().bind_endpoint() == "tcp://127.0.0.1:*"
    assert Options.from_conf(rpc_zmq_bind_address="::1", rpc_zmq_port=5000).bind_endpoint() \
        == "tcp://[::1]:5000"


def test_options_from_a_conf_object_and_a_dict():
    class Conf:
        rpc_zmq_host = "from-conf"
        rpc_response_timeout = 5

    assert Options.from_conf(Conf()).rpc_zmq_host == "from-conf"
    assert Options.from_conf(Conf(), rpc_zmq_host="override").rpc_zmq_host == "override"
    assert Options.from_conf({"rpc_cast_timeout": 3}).rpc_cast_timeout == 3


@pytest.mark.parametrize("bad", [
    {"rpc_zmq_matchmaker": "zookeeper"}, {"rpc_zmq_port": 70000}, {"rpc_zmq_port": "9501"},
    {"rpc_response_timeout": 0}, {"rpc_cast_timeout": -1}, {"rpc_thread_pool_size": 0},
    {"rpc_zmq_max_message_size": 1.5}, {"rpc_zmq_host": ""}, {"rpc_zmq_host": "a/b"},
    {"rpc_zmq_linger": -1},
])
def test_bad_option_values(bad):
    with pytest.raises(ValueError):
        rpc.init(**bad)


def test_unknown_option_names_are_refused():
    with pytest.raises(TypeError, match="rpc_zmq_hots"):
        rpc.init(rpc_zmq_hots="typo")
