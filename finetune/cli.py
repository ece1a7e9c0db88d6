"""The `finetune` command: a thin dispatcher; each sub-command's module owns its own arguments."""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, function, one-line help). The function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("finetune.train", "main", "Fine-tune a model from a YAML config (one process; use accelerate launch for more)."),
    "predict": ("finetune.predict", "main", "Classify texts or images with an exported model folder; prints JSON lines."),
    "inspect": ("finetune.groups", "inspect_main", "Show a model's layer groups with their parameter counts."),
    "convert-efficientnet": ("finetune.convert", "main", "Convert an EfficientNet-PyTorch checkpoint into a model folder."),
    "jobs": ("finetune.jobs.cli", "main", "Submit, list, watch, stop and resume training jobs."),
    "worker": ("finetune.jobs.cli", "worker_main", "Run the job scheduler in the foreground."),
    "app": ("finetune.webapp", "main", "Start the web app (binds to 127.0.0.1 unless told otherwise)."),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: finetune COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "Run `finetune COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not argv:
        # A missing command is a usage error, as argparse treats a missing required argument (exit code 2).
        print(f"finetune: a command is required.\n\n{_usage()}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"finetune: unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    try:
        return int(getattr(module, function_name)(rest) or 0)
    except BrokenPipeError:
        return _closed_pipe_exit()


def _closed_pipe_exit() -> int:
    """Point stdout at /dev/null after its reader went away (`finetune jobs list | head -1`); return 1.

    Without the redirect, the flush at interpreter exit raises BrokenPipeError again. The Python documentation
    of the `signal` module recommends this handling for SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
