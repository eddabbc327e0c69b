"""Real servers on 127.0.0.1 for the remote-shard tests: an S3 store (moto's server mode), a TCP proxy that
drops connections part-way, and a server that accepts connections and never answers.

All of them run in daemon threads of the test process, bind to 127.0.0.1 on a free port, and stop when
their context manager exits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server; yields its endpoint URL. Sets fake AWS credentials and ``AWS_ENDPOINT_URL`` in
    ``os.environ`` (so subprocesses inherit them) and restores the environment afterwards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _serve(listener: socket.socket, handle: Callable[[socket.socket], None], stop: threading.Event) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


@contextlib.contextmanager
def _server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, handle, stop), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Accepts every connection and never sends a byte (a hung shard server); yields its port."""
    held: list[socket.socket] = []
    done = threading.Event()

    def handle(conn: socket.socket) -> None:
        held.append(conn)  # keep it open, read nothing back
        done.wait()
        conn.close()

    with _server(handle) as port:
        try:
            yield port
        finally:
            done.set()


@contextlib.contextmanager
def dropping_proxy(upstream: int, drop_after: int, should_drop: Callable[[bytes], bool]) -> Iterator[int]:
    """A TCP proxy to ``127.0.0.1:upstream`` that closes a connection after ``drop_after`` response bytes
    when ``should_drop(first request bytes)`` says so; yields its port."""

    def handle(client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", upstream)) as server:
            request = client.recv(65536)
            if not request:
                return
            server.sendall(request)
            dropping = should_drop(request)
            up = threading.Thread(target=_pump, args=(client, server), daemon=True)
            up.start()
            sent = 0
            while True:
                try:
                    data = server.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if dropping and sent + len(data) >= drop_after:
                    client.sendall(data[: max(0, drop_after - sent)])
                    client.shutdown(socket.SHUT_RDWR)  # the connection drops mid-response
                    return
                client.sendall(data)
                sent += len(data)

    with _server(handle) as port:
        yield port


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
