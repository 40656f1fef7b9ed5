"""Starts mcp-guard for the interop scripts and waits for its listening address."""

from __future__ import annotations

import os
import subprocess
import threading


def launch(binary: str, config: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Runs `binary --config config`; returns the process, the data plane's address
    (host:port, not the admin listener's) and the log lines so far (kept growing)."""
    proc = subprocess.Popen(
        [binary, "--config", config],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "info"},
    )
    logs: list[str] = []
    addr: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            logs.append(line.rstrip("\n"))
            if not addr and "listening on http://" in line and "admin listening" not in line:
                addr.append(line.split("listening on http://", 1)[1].split()[0])
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(20):
        proc.kill()
        raise SystemExit("mcp-guard did not start:\n" + "\n".join(logs))
    return proc, addr[0], logs
