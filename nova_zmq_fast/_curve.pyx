"""CURVE: key pairs, the allow-list, and the ZAP handler that enforces it.

CURVE (ZeroMQ's encryption and authentication, RFC 26) is on when a process
has a secret key (rpc_zmq_secret_key_file).  Then every connection is
encrypted, and both ends are authenticated:

  * a server accepts a connection only once this module's ZAP handler
    (RFC 27) has found the client's public key in the allow-list
    (rpc_zmq_allowed_keys).  Servers set a ZAP domain, which makes libzmq
    require a handler: with none, or an empty allow-list, every connection
    is refused.  The allow-list is re-read when it changes; the User-Id of
    an accepted connection is its key, so that after a revocation the
    receive loop can drop what that connection still sends;
  * a client dials a server only with the public key discovery published
    for it (Endpoint.key), so an impersonator fails the handshake.

Keys are Z85 text, 40 characters, as `nova-zmq-fast keygen` writes them.
"""
import logging
import os
import stat
import time

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from nova_zmq_fast._libzmq cimport *
from nova_zmq_fast._zmq cimport Context, check, raise_zmq_error, set_int

from nova_zmq_fast import _zmq
from nova_zmq_fast._green import unpatched
from nova_zmq_fast._zmq import MIN_LIBZMQ, libzmq_version
from nova_zmq_fast.exceptions import TransportClosed
from nova_zmq_fast.logs import RateLimitedLog

LOG = logging.getLogger("nova_zmq_fast.curve")
THROTTLED = RateLimitedLog(LOG)

ZAP_ENDPOINT = b"inproc://zeromq.zap.01"
ZAP_DOMAIN = b"nova_zmq_fast"
cdef enum:
    KEY_LEN = 40                    # Z85 of 32 bytes
RELOAD_EVERY = 1.0                  # seconds between checks of the allow-list's files


def unavailable_reason():
    """Why CURVE cannot be used with the libzmq loaded, or None."""
    if libzmq_version() < MIN_LIBZMQ:
        return (f"libzmq {'.'.join(map(str, libzmq_version()))} is older than "
                f"{'.'.join(map(str, MIN_LIBZMQ))}, whose CURVE handshake has known flaws")
    if not zmq_has(b"curve"):
        return "the libzmq loaded was built without CURVE (zmq_has('curve') is false)"
    return None


def keypair():
    """A new (public, secret) key pair, Z85 bytes."""
    cdef char public[KEY_LEN + 1]
    cdef char secret[KEY_LEN + 1]
    check(zmq_curve_keypair(public, secret))
    return public[:KEY_LEN], secret[:KEY_LEN]


def public_key(bytes secret not None):
    """The public key of a Z85 secret key; ValueError if it is not one."""
    cdef char public[KEY_LEN + 1]
    if PyBytes_GET_SIZE(secret) != KEY_LEN or not _is_z85(secret):
        raise ValueError("not a Z85 CURVE key (40 characters)")
    if zmq_curve_public(public, PyBytes_AS_STRING(secret)) != 0:
        raise ValueError("not a Z85 CURVE key")
    return public[:KEY_LEN]


_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 b".-:+=^!/*?&<>()[]{}@%$#")


cdef bint _is_z85(bytes text):
    return PyBytes_GET_SIZE(text) == KEY_LEN and all(c in _Z85 for c in text)


def _parse_keys(data, where):
    """(keys, problems) in a key file's text: one key per line, optionally
    followed by a '#' comment.  Blank lines, and lines starting with '#'
    that are not keys ('#' is a Z85 character, but a key is exactly 40 of
    them), are comments.  A line that is neither is a problem, and
    contributes nothing."""
    keys, problems = [], []
    for number, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or (line.startswith(b"#") and not _is_z85(line)):
            continue
        first, _, rest = line.partition(b" ")
        if _is_z85(first) and (not rest.strip() or rest.strip().startswith(b"#")):
            keys.append(first)
        else:
            problems.append(f"{where}:{number}: {line[:50]!r} is not a Z85 CURVE key")
    return keys, problems


def write_keypair(prefix):
    """Write a new key pair: `<prefix>.key`, the secret key, readable by its
    owner only, and `<prefix>.pub`, the public key to put in allow-lists.
    Refuses to overwrite.  Returns both paths."""
    public, secret = keypair()
    secret_path, public_path = f"{prefix}.key", f"{prefix}.pub"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"# nova_zmq_fast CURVE secret key: keep it to its owner (mode 600)\n" +
                secret + b"\n")
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(public + b"\n")
    return secret_path, public_path


def load_secret_key(path):
    """The secret key in `path`.  Refused unless only its owner can read
    it: a secret key others can read is no secret."""
    path = os.fspath(path)              # an int would be taken for a file descriptor
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"rpc_zmq_secret_key_file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"rpc_zmq_secret_key_file {path} is not a file")
    if st.st_mode & 0o077:
        raise ValueError(f"rpc_zmq_secret_key_file {path} is readable by others "
                         f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    with open(path, "rb") as f:
        keys, problems = _parse_keys(f.read(), path)
    if problems:
        raise ValueError(f"rpc_zmq_secret_key_file {problems[0]}")
    if len(keys) != 1:
        raise ValueError(f"rpc_zmq_secret_key_file {path} must hold exactly one key")
    public_key(keys[0])                 # proves it is one
    return keys[0]


cdef class AllowList:
    """The public keys a server accepts: a directory of `.pub` files, or
    one file; one key per line.  None: nobody.

    It fails closed.  A line that is not a key, a file that cannot be read
    or that others may write (any local user could add a key), a directory
    others may write: none of it allows anything.  At start each is a
    ValueError, for the operator to see at once; when the files change
    they are logged once and skipped, and every key no longer listed is
    revoked at once."""

    def __init__(self, path=None):
        # os.fspath: an int would be taken for a file descriptor.
        self.path = None if path is None else os.fspath(path)
        self.keys = frozenset()
        self.revoked_keys = frozenset()
        self.revoked = False
        self.stamp = None
        self.checked = 0.0
        problems = self._load()
        if problems:
            raise ValueError(f"rpc_zmq_allowed_keys {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))

    def _files(self):
        """The allow-list's files and a stamp that changes when any does;
        ValueError if there is no list to read, or others may write it."""
        try:
            st = os.stat(self.path)
            names = os.listdir(self.path) if stat.S_ISDIR(st.st_mode) else None
        except OSError as exc:
            raise ValueError(f"{self.path}: {exc.strerror}") from None
        if names is None:
            files = [self.path]
        else:
            if st.st_mode & 0o002:
                raise ValueError(f"{self.path}: the directory is writable by others "
                                 f"(mode {stat.S_IMODE(st.st_mode):o})")
            files = sorted(os.path.join(self.path, name) for name in names
                           if name.endswith(".pub") and not name.startswith("."))
        # ctime: a chmod changes it too.
        stamp = [(self.path, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)]
        for name in files:
            try:
                st = os.stat(name)
            except OSError:
                continue
            stamp.append((name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
        return files, tuple(stamp)

    def _read(self, files):
        """(keys, problems) from the allow-list's files as they are now."""
        keys, problems = set(), []
        for name in files:
            try:
                # Non-blocking: a FIFO named *.pub must not stall the handler.
                with os.fdopen(os.open(name, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        problems.append(f"{name}: not a regular file; ignored")
                        continue
                    if st.st_mode & 0o002:
                        problems.append(f"{name}: writable by others "
                                        f"(mode {stat.S_IMODE(st.st_mode):o}); ignored")
                        continue
                    found, bad = _parse_keys(f.read(), name)
            except OSError as exc:
                problems.append(f"{name}: {exc.strerror}")
                continue
            keys.update(found)
            problems.extend(bad)
        return keys, problems

    def _load(self):
        """Read the files again if any changed; the problems found."""
        self.checked = time.monotonic()
        if self.path is None:
            return []
        try:
            files, stamp = self._files()
            problems = []
        except ValueError as exc:
            # Gone, unreadable or open to others: nobody is allowed.
            files, stamp, problems = [], (str(exc),), [str(exc)]
        if stamp == self.stamp:
            return []
        keys, bad = self._read(files)
        problems += bad
        gone = self.keys - keys
        self.keys = frozenset(keys)
        # A key taken away is revoked: what connections it opened still
        # send is dropped (the receive loop asks), until it is listed again.
        self.revoked_keys = frozenset((self.revoked_keys | gone) - keys)
        self.revoked = bool(self.revoked_keys)
        if self.stamp is not None:
            for problem in problems:
                LOG.error("allow-list: %s", problem)
            LOG.warning("allow-list %s reloaded: %d key(s), %d revoked", self.path,
                        len(self.keys), len(gone))
        self.stamp = stamp
        return problems

    def reload(self):
        """Read the keys again if a file changed."""
        self._load()

    def allows(self, bytes key not None):
        """Is the Z85 public key `key` allowed?  Re-reads the files at
        most every RELOAD_EVERY seconds."""
        if time.monotonic() - self.checked >= RELOAD_EVERY:
            self.reload()
        return key in self.keys

    def __len__(self):
        return len(self.keys)


cdef class Authenticator:
    """The ZAP handler of one libzmq context: a thread answering the
    handshakes of its CURVE servers from an AllowList."""

    def __cinit__(self, Context ctx not None, AllowList allow not None, logger):
        self.ctx = ctx
        self.allow = allow
        self.log = logger               # a RateLimitedLog for refusals
        self.sock = NULL
        self.thread = None
        self.serving = None
        self.stopping = False
        self.accepted = self.refused = 0

    def start(self):
        """Bind the ZAP endpoint and start answering."""
        cdef bytes endpoint = ZAP_ENDPOINT
        if self.sock != NULL:
            return
        self.sock = self.ctx.socket(ZMQ_REP)
        try:
            set_int(self.sock, ZMQ_LINGER, 0)
            set_int(self.sock, ZMQ_RCVTIMEO, 200)       # to notice stop() and file changes
            check(zmq_bind(self.sock, endpoint))
        except BaseException:
            self.ctx.close_socket(self.sock, 0)
            self.sock = NULL
            raise
        self.serving = object()
        self.thread = unpatched("threading").Thread(target=self._serve, args=(self.serving,),
                                                    daemon=True, name="nova_zmq_fast-zap")
        self.thread.start()

    def _serve(self, token):
        # Only the thread start() made may use the socket.
        if token is not self.serving or self.serving is None:
            raise RuntimeError("the ZAP handler's loop runs on the thread start() makes")
        while not self.stopping:
            try:
                request = self._receive()
                if request is None:
                    if time.monotonic() - self.allow.checked >= RELOAD_EVERY:
                        self.allow.reload()
                    continue
                self._answer(request)
            except TransportClosed:
                return                  # the context is shut down: no handshake is left
            except Exception:
                # Every CURVE handshake of the context waits for this loop.
                THROTTLED.error("serve", "the ZAP handler failed; going on", exc_info=True)
                time.sleep(0.1)

    cdef list _receive(self):
        """One ZAP request's frames, or None after the receive timeout."""
        cdef zmq_msg_t part
        cdef int rc, err
        cdef list frames = []
        zmq_msg_init(&part)
        try:
            while True:
                with nogil:
                    rc = zmq_msg_recv(&part, self.sock, 0)
                if rc == -1:
                    err = zmq_errno()
                    if frames or (err != EAGAIN and err != EINTR):
                        raise_zmq_error(err)        # ETERM: TransportClosed
                    return None
                frames.append(PyBytes_FromStringAndSize(<const char *>zmq_msg_data(&part),
                                                        zmq_msg_size(&part)))
                if not zmq_msg_more(&part):
                    return frames
        finally:
            zmq_msg_close(&part)

    cdef _answer(self, list request):
        try:
            status, text, user = self._decide(request)
        except Exception:
            # Refused, and answered all the same: unanswered, the handshake
            # would hang.
            THROTTLED.error("decide", "the ZAP handler failed on a request; refused",
                            exc_info=True)
            status, text, user = b"500", b"internal error", b""
        if status == b"200":
            self.accepted += 1
        else:
            self.refused += 1
        request_id = request[1] if len(request) > 1 else b""
        reply = (b"1.0", request_id, status, text, user, b"")
        for i, frame in enumerate(reply):
            check(zmq_send(self.sock, PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame),
                           ZMQ_SNDMORE if i < len(reply) - 1 else 0))

    cdef tuple _decide(self, list request):
        """(status, text, user id) for a ZAP request: 200 for an allowed
        CURVE key, 400 for anything else."""
        cdef char z85[KEY_LEN + 1]
        if len(request) >= 7 and request[0] == b"1.0" and request[5] == b"CURVE" \
                and request[2] == ZAP_DOMAIN and len(request[6]) == 32:
            zmq_z85_encode(z85, <const unsigned char *>PyBytes_AS_STRING(request[6]), 32)
            key = z85[:KEY_LEN]
            if self.allow.allows(key):
                return b"200", b"OK", key
            self.log.warning("refused", "refused a connection from %s: its key %s is "
                             "not in the allow-list", request[3].decode(errors="replace"),
                             key.decode())
        else:
            self.log.warning("malformed", "refused a malformed ZAP request")
        return b"400", b"not allowed", b""

    def stop(self):
        """Stop answering and release the socket (call before the context
        terminates).  A thread still busy after _zmq.STOP_WAIT seconds (a log
        handler that blocks) keeps its socket, which is closed when this
        object goes, once the thread has ended; returns False then."""
        self.stopping = True
        thread = self.thread
        if thread is not None and thread is not unpatched("threading").current_thread():
            thread.join(_zmq.STOP_WAIT)
            if thread.is_alive():
                # A socket belongs to one thread: closing it under this one
                # would be a use after free in libzmq.
                LOG.error("the ZAP handler did not stop within %gs; leaving its socket open",
                          _zmq.STOP_WAIT)
                return False
        self.thread = None
        if self.sock != NULL:
            self.ctx.close_socket(self.sock, 0)
            self.sock = NULL
        return True

    def __dealloc__(self):
        # Its thread, if any, has ended: it holds this object until then.
        if self.sock != NULL:
            self.ctx.close_socket(self.sock, 0)
