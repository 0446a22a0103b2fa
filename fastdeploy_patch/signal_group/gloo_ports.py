"""The port of a gloo group's own rendezvous store, held by us until Paddle's store has bound it.

Paddle's store binds its port itself, on 0.0.0.0, and aborts the whole process (a failed libuv assertion, no Python
error) when that port is taken. A port merely found free a moment earlier can be taken by anyone before Paddle binds
it. So the port is bound here first, by a socket of ours, with no ``SO_REUSEADDR`` at first: while it is bound, any
other bind to that port fails, and the kernel never hands it out to another ``bind(port 0)`` or outgoing connection.
Just before Paddle's store starts, the socket gets ``SO_REUSEADDR``, which the store's own socket has too (libuv
sets it on every TCP bind): a socket that binds without listening and one that binds and listens may then share the
port, and the store binds it while ours still holds it. Ours is closed once the store listens.

Once the option is set, a process that binds that very port with ``SO_REUSEADDR`` too could listen on it before
Paddle's store binds. So right before the store starts, ``store_can_bind`` binds the port as the store will (with
the option, and no listen): that fails exactly when the store's bind would, and the port is then given up for
another. What is left is the few microseconds between that check and the store's own bind and listen. No process
picks a held port by ``bind(port 0)``.
"""

from __future__ import annotations

import errno
import random
import socket

BIND_ADDRESS = "0.0.0.0"
"""Where Paddle's TCP store listens (IPv4, every interface), so where the port is held: a hold on one address only
would miss a listener on another."""

_TAKEN = (errno.EADDRINUSE, errno.EACCES)


def hold_port(ports: range | None) -> socket.socket:
    """A socket bound to a port that nothing else holds: any free port (the kernel's choice) when ``ports`` is None,
    else one of ``ports``, tried from a random one on, so that ranks creating groups at once seldom try the same.

    Raises ``OSError`` naming the range when every port of it is taken."""
    if ports is None:
        return _bind(0)
    start = random.randrange(len(ports))
    for offset in range(len(ports)):
        try:
            return _bind(ports[(start + offset) % len(ports)])
        except OSError as exc:
            if exc.errno not in _TAKEN:
                raise
    raise OSError(
        errno.EADDRINUSE,
        f"every port of {ports.start}-{ports.stop - 1} (FASTDEPLOY_PATCH_GLOO_PORTS) is taken on this host",
    )


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((BIND_ADDRESS, port))
    except BaseException:
        sock.close()
        raise
    return sock


def store_can_bind(port: int) -> bool:
    """Whether Paddle's store could bind ``port`` now: a bind with ``SO_REUSEADDR`` on ``BIND_ADDRESS``, as libuv
    makes it, succeeds (it fails while another socket listens on the port, or holds it without the option)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((BIND_ADDRESS, port))
        except OSError as exc:
            if exc.errno in _TAKEN:
                return False
            raise
    return True


def share_with_store(sock: socket.socket) -> int:
    """Let Paddle's store bind the port ``sock`` holds (see the module's docstring); returns the port."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock.getsockname()[1]
