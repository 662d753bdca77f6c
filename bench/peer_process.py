"""A peer tool's worker process in its own virtual environment, driven over JSON lines.

The worker prints one JSON reply per line (``{"ok": true, ...}`` or ``{"ok": false, "error":
...}``), the first one a greeting; requests are JSON objects, ``{"cmd": "quit"}`` ends it. Its
stderr goes to a log file. Used by the iNMF (pyplanc, pyliger) and metric-encoder (SCimilarity)
benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class JsonLinesWorker:
    """Start ``argv`` with stdin/stdout pipes; ``hello`` is its greeting."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 quit_timeout: float = 30) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.quit_timeout = name, quit_timeout
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log_file, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.hello = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self.proc.poll()}); see "
                               f"{self.log_file.name}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name} worker: {reply.get('error')}")
        return reply

    def request(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(dict(msg)) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=self.quit_timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
