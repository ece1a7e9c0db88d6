"""Process helpers of the crash tests: a forkserver that has imported the engine, and free ports.

Importing torch, transformers and the engine takes seconds per process, and the crash tests start dozens.
Processes forked from a server that imported them once start at once. Python keeps one forkserver per
interpreter, so its preload list covers every test module that forks, whichever starts the server first.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import socket
from pathlib import Path

# torch.optim imports torch._dynamo on its first use, and transformers imports model classes lazily.
ENGINE_MODULES = ("finetune.train", "finetune.checkpoint", "torch._dynamo", "transformers.models.bert.modeling_bert")
# Test modules whose functions are process targets; the server imports them, so a target needs no import.
FORKING_TEST_MODULES = ("test_checkpoint", "test_resume")


def engine_forkserver() -> multiprocessing.context.ForkServerContext:
    """Start the forkserver with the engine and the forking test modules imported, and return its context."""
    tests_dir = Path(__file__).resolve().parent
    package = __name__.rpartition(".")[0]  # "tests" when tests/ is imported as a package, else ""
    test_modules = [f"{package}.{name}" if package else name for name in FORKING_TEST_MODULES]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*test_modules, *ENGINE_MODULES])
    # Python 3.11 does not pass sys.path to the server, so PYTHONPATH carries it while the server starts.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tests_dir), str(tests_dir.parent)] + ([saved] if saved else []))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return context


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now, for a multi-process run's rendezvous.

    Accelerate's default port 29500 collides with any other multi-process run on the same machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
