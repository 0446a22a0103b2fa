"""TCP_NODELAY on a store's connections only: the listener, the client's end and the served end."""

from __future__ import annotations

import socket

from fastdeploy_patch.signal_group.store_sockets import store_without_delay


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_the_store_connections_and_only_they_get_nodelay() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as store,
        socket.create_server(("127.0.0.1", 0)) as other,
        socket.create_connection(store.getsockname()) as client,
        socket.create_connection(other.getsockname()) as bystander,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as local,
    ):
        served, _ = store.accept()
        with served:
            assert not any(_nodelay(s) for s in (store, client, served, bystander, unconnected))
            # The store's listener, the client's end and the store's end of that connection.
            assert store_without_delay(store.getsockname()[1]) == 3
            assert [_nodelay(s) for s in (store, client, served)] == [True, True, True]
            assert [_nodelay(s) for s in (other, bystander, unconnected)] == [False, False, False]
            assert local.fileno() >= 0 and client.send(b"still open") == 10
