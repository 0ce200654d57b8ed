"""Fork server for CPU peak-memory measurements (see ``MemoryServer`` in ``_harness``).

Protocol: one JSON request per line on stdin (``module``, ``case``, ``provider``, ``modes``), one
JSON answer per line on stdout (``{mode: {peak_extra_bytes, method}}``, or ``{"error": ...}``).
Each request is measured in a child forked from this process, which has imported torch, the
family module and the peers it names in ``PRELOAD`` but run nothing; the child's stdout goes
to stderr so it cannot break the protocol.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys

import torch  # noqa: F401  (imported once here, inherited by every child)

import alignops  # noqa: F401

# Imported here rather than in every child: torch.compile's machinery takes seconds to import.
SERVER_PRELOAD = ("torch._dynamo", "torch._inductor.compile_fx")

from ._harness import measure_in_child


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (killed: out of memory?)" if sig == signal.SIGKILL else ""
        return f"child killed by signal {signal.Signals(sig).name}{hint}"
    return f"child exited with code {os.WEXITSTATUS(status)} without an answer"


def _serve_one(request: dict) -> dict:
    mod = importlib.import_module(request["module"])  # imported here once, children inherit it
    for name in getattr(mod, "PRELOAD", ()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the provider reports it when it runs
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        os.dup2(2, 1)
        try:
            result = measure_in_child(request["module"], request["case"], request["provider"], request["modes"])
        except BaseException as e:  # report, never hang the server
            result = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(write_fd, "w") as f:
            f.write(json.dumps(result))
        os._exit(0)  # no atexit handlers, no thread-pool teardown
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": _describe(status)}


def main() -> None:
    for name in SERVER_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve_one(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
