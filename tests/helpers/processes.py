"""Processes the cluster tests start outside pytest (``ray start`` nodes): the loopback address they use, a free
port there, and stopping them by command line."""
from __future__ import annotations

import socket
import subprocess
import time

HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop_processes(patterns: list[str], grace_s: float = 15) -> None:
    """SIGTERM the processes whose command line matches, then SIGKILL what is left after ``grace_s``."""
    for p in patterns:
        subprocess.run(["pkill", "-f", p], check=False)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(subprocess.run(["pgrep", "-f", p], capture_output=True).stdout
                                         for p in patterns):
        time.sleep(0.5)
    for p in patterns:
        subprocess.run(["pkill", "-9", "-f", p], check=False)
