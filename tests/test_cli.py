"""The `finetune` dispatcher: help, a missing command, an unknown command and a closed stdout pipe."""

from __future__ import annotations

import os
import subprocess
import sys

from finetune.cli import main


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "usage: finetune COMMAND" in capsys.readouterr().out


def test_missing_command_is_usage_error(capsys):
    assert main([]) == 2
    error = capsys.readouterr().err
    assert "finetune: a command is required." in error
    assert "usage: finetune COMMAND" in error


def test_unknown_command_named(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_module_logger_named_after_module(monkeypatch):
    """`python -m finetune.train` logs as `finetune.train`, and a script without a spec logs as `finetune.__main__`."""
    import importlib.util
    import sys
    import types

    from finetune.log import get_logger

    main = types.ModuleType("__main__")
    main.__spec__ = importlib.util.find_spec("finetune.train")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert get_logger("__main__").logger.name == "finetune.train"

    main.__spec__ = None
    assert get_logger("__main__").logger.name == "finetune.__main__"


def test_closed_pipe_no_traceback(tmp_path):
    # The reader is gone before the command writes, as when `finetune jobs list | head -1` has its line.
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "jobs", "list", "--workspace", str(tmp_path / "ws")],
        stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
    )
    os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 1
