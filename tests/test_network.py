"""Servers on loopback, and connections that end in one line whatever answers (issue 8, item 6).

Every server here is a thread of this process on 127.0.0.1; the only other
address contacted is one of this machine's own interfaces.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import threading
import time
from urllib.parse import urlparse

import pytest

from tilefuse.cluster.client import close_client, make_client, probe_scheduler
from tilefuse.errors import InputError

BOUND = 8.0
"""Seconds any refused connection may take here (the timeout given is 1 s)."""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(handler) -> tuple[_Server, str]:
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"tcp://127.0.0.1:{server.server_address[1]}"


class _Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


def _junk(payload: bytes):
    class Junk(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                self.request.sendall(payload)
                time.sleep(3)
            except OSError:
                pass

    return Junk


@pytest.fixture()
def servers():
    started = []

    def start(handler):
        server, address = _serve(handler)
        started.append(server)
        return address

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def _refused(spec, match, timeout=1.0):
    began = time.monotonic()
    with pytest.raises(InputError, match=match) as error:
        make_client(spec, timeout=timeout)
    assert time.monotonic() - began < BOUND
    message = str(error.value)
    assert "\n" not in message
    return message


def test_http_server_is_not_a_scheduler(servers):
    address = servers(_Http)
    message = _refused(address, "is not a dask scheduler")
    assert address in message and "check the address" in message


@pytest.mark.parametrize(
    "payload",
    [
        os.urandom(4096),  # random bytes: their first 8 read as a frame length of exabytes
        b"\xff" * 64,
        (16).to_bytes(8, "little") + b"\x00" * 16,  # a plausible length, then no dask frames
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
    ],
    ids=["random", "huge-length", "small-junk", "http-answer"],
)
def test_junk_answers_are_refused_without_allocating(servers, payload):
    address = servers(_junk(payload))
    _refused(address, "is not a dask scheduler")


def test_silent_and_closing_servers_are_refused(servers):
    _refused(servers(_junk(b"")), "is not a dask scheduler")  # says nothing

    class Closes(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.close()

    _refused(servers(Closes), "is not a dask scheduler")


def test_closed_port_and_addresses_without_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _refused(f"tcp://127.0.0.1:{port}", "cannot connect")
    for spec in ("tcp://", "tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://:8786", "tcp://127.0.0.1:99999", "tls://host"):
        _refused(spec, "HOST:PORT")


def test_bad_timeouts_are_refused():
    # inf and huge values overflowed socket/time_t deep in the connection (a traceback); NaN and types are no seconds
    for timeout in (0, -1, "soon", float("inf"), float("nan"), 1e30, "1000000d", True, None, [10]):
        with pytest.raises(InputError, match="timeout"):
            make_client("tcp://127.0.0.1:8786", timeout=timeout)


def test_scheduler_files_with_bad_contents(tmp_path, servers):
    path = tmp_path / "scheduler.json"
    _refused(str(path), "does not exist")
    for text in ("{not json", "[1, 2]", json.dumps({"id": "x"}), json.dumps({"address": 7}), "\x00\xff"):
        path.write_text(text, errors="surrogateescape") if text.isascii() else path.write_bytes(b"\x00\xff")
        _refused(str(path), f"scheduler file {path}")
    path.write_text(json.dumps({"address": servers(_Http)}))
    assert "the scheduler of" in _refused(str(path), "is not a dask scheduler")


def test_a_real_scheduler_passes_the_probe():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=None) as cluster:
        probe_scheduler(cluster.scheduler_address, timeout=5)
        client = make_client(cluster.scheduler_address, timeout=5)
        try:
            assert client.scheduler_info()["address"] == cluster.scheduler_address
        finally:
            close_client(client)


def _own_external_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _ports(client) -> dict[str, tuple[str, int]]:
    """Scheduler, dashboard and worker listening (host, port), from the client's view."""
    info = client.scheduler_info(n_workers=-1)
    found = {}
    for name, address in [("scheduler", info["address"]), *((f"worker {a}", a) for a in info["workers"])]:
        host, port = address.split("://")[1].rsplit(":", 1)
        found[name] = (host, int(port))
    dashboard = urlparse(client.dashboard_link)
    found["dashboard"] = (dashboard.hostname, dashboard.port)
    return found


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only_unless_asked():
    external = _own_external_ipv4()
    if external is None:
        pytest.skip("this machine has no non-loopback IPv4 address to check against")
    client = make_client("local:1")
    try:
        ports = _ports(client)
        assert all(host == "127.0.0.1" for host, _ in ports.values()), ports
        for name, (_, port) in ports.items():
            assert _answers("127.0.0.1", port), name
            assert not _answers(external, port), f"{name} answers on {external}:{port}"
    finally:
        close_client(client)

    exposed = make_client("local:1", listen="0.0.0.0")
    try:
        _, port = _ports(exposed)["dashboard"]
        assert _answers(external, port)  # the check above can fail
    finally:
        close_client(exposed)


def test_bad_listen_addresses_are_refused():
    for listen in ("", "tcp://0.0.0.0", "a/b"):
        with pytest.raises(InputError, match="listen"):
            make_client("local:1", listen=listen)
