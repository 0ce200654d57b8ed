"""Fork server for CPU peak-memory measurements (see ``MemoryServer`` in ``_memory``).

Protocol: one JSON request per line on stdin (``module``, ``case``, ``provider``, ``modes``), one
JSON answer per line on stdout (``{mode: {peak_extra_bytes, method}}``, or ``{"error": ...}``).
Each request is measured in a child forked from this process, which has imported torch, the
family module and the provider's ``preload`` modules but run nothing; the child's stdout goes
to stderr so it cannot break the protocol. ``MemoryServer`` starts it in an empty directory with
its stderr sent to a log file.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys

import torch  # noqa: F401  (imported once here, inherited by every child)

import alignops  # noqa: F401

from ._memory import measure_in_child

# The first autograd call through a custom op or torch's chunked CE imports torch._dynamo (about
# 900 modules, a second or more): import it here once, not in every child.
BASE_PRELOAD = ("torch._dynamo",)

# Per-process probes torch.compile runs before it loads a cached graph (CPU ISA detection builds
# and runs test programs; source hashing), keyed by the preload module that brings them. Their
# results are cached in the process: run them once here, not in every child. Internal functions:
# skipped silently where a torch version lacks them.
WARM_CALLS = {
    "torch._inductor.compile_fx": (
        ("torch._inductor.cpu_vec_isa", "pick_vec_isa"),
        ("torch._inductor.codecache", "torch_key"),
        ("torch._inductor.codecache", "get_system"),
    ),
}
_loaded: set[str] = set()


def _preload(names: list[str]) -> None:
    for name in names:
        if name in _loaded:
            continue
        _loaded.add(name)
        try:
            importlib.import_module(name)
        except ImportError:
            continue  # the provider reports it when it runs
        for module, function in WARM_CALLS.get(name, ()):
            try:
                getattr(importlib.import_module(module), function)()
            except Exception:  # an optimisation only
                pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (killed: out of memory?)" if sig == signal.SIGKILL else ""
        return f"child killed by signal {signal.Signals(sig).name}{hint}"
    return f"child exited with code {os.WEXITSTATUS(status)} without an answer"


def _serve_one(request: dict) -> dict:
    importlib.import_module(request["module"])  # imported here once, children inherit it
    _preload(request.get("preload", []))
    gc.freeze()  # the children's gc.collect() then skips every object imported so far
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        os.dup2(2, 1)
        try:
            result = measure_in_child(
                request["module"], request["case"], request["provider"], request["modes"]
            )
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
    _preload(list(BASE_PRELOAD))
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve_one(json.loads(line))), flush=True)
    # Nothing to clean up (every child has been reaped): skip the interpreter's teardown, where
    # Triton's nanobind bindings print pages of "leaked instance" reports.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
