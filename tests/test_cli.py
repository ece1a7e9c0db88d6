"""The `finetune` dispatcher: help, a missing command and an unknown command."""

from __future__ import annotations

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
