"""An exception module that services and clients can both import."""
from nova_zmq_fast.rpc.common import RPCException


class CustomError(Exception):
    pass


class InstanceNotFound(Exception):
    """nova.exception.NovaException's shape: a `message` template formatted
    from keyword arguments, which also carry a code."""
    message = "Instance %(instance_id)s could not be found."
    code = 404

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        self.kwargs.setdefault("code", self.code)
        super().__init__(message or self.message % kwargs)


class LegacyRefusal(RPCException):
    """An RPCException subclass written for openstack.common.rpc, whose
    template attribute was `message`."""
    message = "refused %(what)s"
