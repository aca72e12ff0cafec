"""A private redis-server for `campaign-scheduler run` and the tests, when none is configured."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise BackendUnavailable(
            "no redis-server on PATH and no REDIS_URL/REDIS_HOST set: install Redis "
            "(Debian: apt-get install redis-server) or point REDIS_URL at a running server"
        )
    return path


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, folder: Path, port: int | None = None, persist: bool = True) -> EmbeddedRedis:
        folder.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        args = [
            find_redis_server(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(folder.resolve()),
            "--logfile", "redis.log",
            "--maxmemory-policy", "noeviction",  # BullMQ must never lose keys to eviction
            "--save", "",
            "--appendonly", "yes" if persist else "no",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise BackendUnavailable(
                    f"redis-server exited at start (see {folder / 'redis.log'}): {err.strip()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return cls(proc, port, folder)
            except OSError:
                time.sleep(0.05)
        proc.kill()
        raise BackendUnavailable(f"redis-server did not answer on port {port} within 10 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
