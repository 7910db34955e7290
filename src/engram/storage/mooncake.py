"""Mooncake Store, the distributed in-memory object store of the Mooncake / vLLM / SGLang serving stack: loading its
library, connecting a client, and running its master.

Three kinds of process make one store (docs/design.md §10): a master (``mooncake_master``: only metadata, which
object lives in which process's memory), holders (processes that lend the store ``segment_bytes`` of their memory
and keep running), and clients (a publisher, model processes) that lend none and move bytes to and from the
holders through the transfer engine (TCP here, RDMA where the wheel is built for it). Nothing in the store
authenticates anyone: bind the master to loopback or a private interface, and firewall the holders' ports.

The library is optional (``pip install -e ".[store]"``, the PyPI wheel ``mooncake-transfer-engine-non-cuda``; it
needs the system libraries ``libibverbs1 libnl-3-200 libnl-route-3-200``); :func:`load_mooncake` says so when it
cannot load.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

INSTALL_HINT = ("install the store extra (pip install -e '.[store]': the PyPI wheel mooncake-transfer-engine-non-cuda) "
                "and the system libraries it loads (apt-get install libibverbs1 libnl-3-200 libnl-route-3-200)")
# The smallest segment a holder may lend: the client refuses anything between 0 and this.
MIN_SEGMENT_BYTES = 16 * 2**20
DEFAULT_LOCAL_BUFFER_BYTES = 16 * 2**20
MASTER_PROBE_TIMEOUT_S = 5.0


def load_mooncake() -> ModuleType:
    """The ``mooncake.store`` module; ``ImportError`` saying what to install when it cannot load."""
    try:
        from mooncake import store
    except ImportError as err:
        raise ImportError(f"Mooncake Store cannot load here ({err}): {INSTALL_HINT}") from err
    return store


@dataclass(frozen=True)
class StoreConfig:
    """How this process joins a Mooncake Store.

    Attributes:
        master: ``host:port`` of the master's RPC server.
        local_hostname: the address this process's transfer engine advertises to the others (and, through
            ``MC_TCP_BIND_ADDRESS`` unless the environment sets it, its TCP transport's): ``127.0.0.1`` for a store
            on one machine, a private interface's address across machines.
        metadata_server: ``"P2PHANDSHAKE"`` (processes exchange their segment descriptors directly: no metadata
            server to run or expose), or an HTTP / etcd metadata server's URL.
        protocol: the transfer engine's transport, ``"tcp"`` (any machine) or ``"rdma"`` (a wheel built with it).
        device_name: RDMA devices for ``"rdma"`` (e.g. ``"mlx5_0"``), empty for TCP.
        segment_bytes: memory this process lends the store, 0 (a client) or at least 16 MiB (a holder).
        local_buffer_bytes: the client's own transfer buffer.
    """

    master: str = field(metadata={"help": "host:port of the store's master (engram store master)"})
    local_hostname: str = field(default="127.0.0.1", metadata={
        "help": "the address this process advertises to the store's other processes (default 127.0.0.1: one "
                "machine; a private interface's address across machines)"})
    metadata_server: str = field(default="P2PHANDSHAKE", metadata={
        "help": "P2PHANDSHAKE (default: no metadata server) or an HTTP/etcd metadata server's URL"})
    protocol: str = field(default="tcp", metadata={"help": "the transfer engine's transport: tcp or rdma"})
    device_name: str = field(default="", metadata={"help": "RDMA devices for --protocol rdma (e.g. mlx5_0)"})
    segment_bytes: int = field(default=0, metadata={"cli": False})
    local_buffer_bytes: int = field(default=DEFAULT_LOCAL_BUFFER_BYTES, metadata={
        "help": "bytes of the client's own transfer buffer"})

    def __post_init__(self) -> None:
        host, _, port = self.master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"master must be 'host:port', got {self.master!r}")
        if self.segment_bytes != 0 and self.segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be 0 (a client) or at least {MIN_SEGMENT_BYTES} (a holder), got "
                             f"{self.segment_bytes}")
        if self.local_buffer_bytes < 1:
            raise ValueError(f"local_buffer_bytes must be >= 1, got {self.local_buffer_bytes}")


def connect(config: StoreConfig) -> Any:
    """A ``MooncakeDistributedStore`` client set up as ``config`` says; ``ConnectionError`` naming the master when
    nothing answers there (within :data:`MASTER_PROBE_TIMEOUT_S`) or setup fails (a segment the machine cannot
    give)."""
    store = load_mooncake()
    host, _, port = config.master.rpartition(":")
    try:  # the client's own setup retries an absent master for minutes
        socket.create_connection((host, int(port)), timeout=MASTER_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(f"no Mooncake Store master answers at {config.master} ({err}): start one "
                              "(engram store master) or pass its host:port") from None
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", config.local_hostname)
    client = store.MooncakeDistributedStore()
    code = client.setup(config.local_hostname, config.metadata_server, config.segment_bytes,
                        config.local_buffer_bytes, config.protocol, config.device_name, config.master)
    if code != 0:
        lending = f", and can this process lend {config.segment_bytes} bytes" if config.segment_bytes else ""
        raise ConnectionError(f"could not join the Mooncake Store whose master is {config.master} (setup returned "
                              f"{code}): is it a mooncake_master{lending}?")
    return client


class SharedClient:
    """One client shared by several users (the tables of a model's Engram layers); closed when the last user
    :meth:`release` s it. The creator holds the first use.

    Example (needs a running master):
        >>> shared = SharedClient(StoreConfig("127.0.0.1:50051"))  # doctest: +SKIP
        >>> shared.acquire().client.is_exist("engram:manifest")  # doctest: +SKIP
    """

    def __init__(self, config: StoreConfig):
        self.config = config
        self.client = connect(config)
        self._users = 1
        self._lock = threading.Lock()

    def acquire(self) -> SharedClient:
        with self._lock:
            if self._users == 0:
                raise RuntimeError(f"the Mooncake Store client of {self.config.master} is closed")
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.client.close()


def master_binary() -> Path:
    """The ``mooncake_master`` executable the installed wheel ships."""
    store = load_mooncake()
    binary = Path(store.__file__).parent / "mooncake_master"
    if not binary.is_file():
        raise FileNotFoundError(f"no mooncake_master beside {store.__file__}: {INSTALL_HINT}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (another process may still take it before it is bound)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class MasterProcess:
    """A running ``mooncake_master``; :meth:`stop` ends it."""

    process: subprocess.Popen
    address: str  # host:port of its RPC server, what clients pass as master
    metrics_address: str

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; waits for the process to end."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> MasterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def master_command(host: str, port: int, metrics_port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``mooncake_master`` command line serving ``host:port``, its metrics/admin HTTP server on
    ``host:metrics_port`` and no HTTP metadata server (clients use P2P handshakes): every socket it opens is on
    ``host``."""
    return [str(master_binary()), f"--rpc_address={host}", f"--rpc_port={port}", f"--metrics_host={host}",
            f"--metrics_port={metrics_port}", "--enable_http_metadata_server=false", *extra]


def start_master(host: str = "127.0.0.1", port: int = 0, metrics_port: int = 0, log: IO | None = None,
                 ready_timeout: float = 60.0, extra: tuple[str, ...] = ()) -> MasterProcess:
    """Start ``mooncake_master`` on ``host`` (ports 0: free ones) and wait until its RPC port accepts connections.

    ``log`` receives its output (default: discarded); ``extra`` are more ``mooncake_master`` flags. Raises
    ``RuntimeError`` with the exit code if it stops before it is ready, ``TimeoutError`` after ``ready_timeout``.
    """
    port = port or free_port(host)
    metrics_port = metrics_port or free_port(host)
    process = subprocess.Popen(master_command(host, port, metrics_port, extra), stdin=subprocess.DEVNULL,
                               stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    master = MasterProcess(process, f"{host}:{port}", f"{host}:{metrics_port}")
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mooncake_master on {master.address} exited with code {process.returncode} before "
                               "it was ready (a port already taken?)")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return master
        except OSError:
            if time.monotonic() > deadline:
                master.stop()
                raise TimeoutError(f"mooncake_master on {master.address} not ready after {ready_timeout} s") from None
            time.sleep(0.05)
