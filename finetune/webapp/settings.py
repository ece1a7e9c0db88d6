"""Command-line options of `finetune app` and the settings object every tab builder receives."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from .security import load_auth

DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 500.0
WORKSPACE_ENV = "FINETUNE_WORKSPACE"
ALLOW_NO_AUTH_ENV = "FINETUNE_ALLOW_NO_AUTH"


@dataclass
class AppSettings:
    """Settings of one app process: folders it reads and writes, logins, upload limit and scheduler switch."""

    workspace: Path
    data_roots: list[Path] = field(default_factory=list)
    model_roots: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    auth: list[tuple[str, str]] | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    run_scheduler: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_dir(self) -> Path:
        """Folder where accepted uploads are stored; it is always one of the data roots."""
        return self.workspace / "uploads"

    @property
    def download_dir(self) -> Path:
        return self.workspace / "downloads"

    def all_data_roots(self) -> list[Path]:
        return _unique([*self.data_roots, self.upload_dir])

    def all_model_roots(self) -> list[Path]:
        """Model roots plus the workspace, whose run folders hold the exported models."""
        return _unique([*self.model_roots, self.workspace])


def _unique(paths: list[Path]) -> list[Path]:
    seen, result = set(), []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if resolved not in seen:
            seen.add(resolved)
            result.append(resolved)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune app",
        description="Start the web app: launch and watch fine-tuning jobs, try and compare the models.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind; 0.0.0.0 exposes the app to the network.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port to listen on.")
    parser.add_argument(
        "--workspace", default=None,
        help=f"Job store and run folders (default: ${WORKSPACE_ENV}, else ./workspace).",
    )
    parser.add_argument(
        "--data-root", action="append", default=[], metavar="PATH",
        help="Folder whose files may be used as training data (repeatable); uploads are always allowed.",
    )
    parser.add_argument(
        "--model-root", action="append", default=[], metavar="PATH",
        help="Folder whose model folders may be used as backbones or tried (repeatable); run exports are always allowed.",
    )
    parser.add_argument(
        "--auth-file", default=None, metavar="FILE",
        help="File of `user:password` lines required to log in (else $FINETUNE_AUTH=user:password, else no login).",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
        help="Largest accepted upload, in MiB; larger uploads are rejected before they are stored.",
    )
    parser.add_argument(
        "--require-auth", action="store_true",
        help="Exit unless --auth-file or $FINETUNE_AUTH sets a login; $FINETUNE_ALLOW_NO_AUTH=1 lifts this (the Docker image sets it).",
    )
    parser.add_argument(
        "--no-scheduler", action="store_true",
        help="Do not run the job scheduler in the app process (use when `finetune worker` runs it).",
    )
    return parser


def parse_settings(argv: list[str] | None = None) -> AppSettings:
    """Parse `finetune app` options into settings; a bad value exits with argparse's usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error(f"--max-upload-mb must be above 0, got {args.max_upload_mb}.")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}.")
    try:
        auth = load_auth(args.auth_file, os.environ.get("FINETUNE_AUTH"))
    except ValueError as error:
        parser.error(str(error))
    if args.require_auth and auth is None and os.environ.get(ALLOW_NO_AUTH_ENV) != "1":
        parser.error(
            "a login is required: pass --auth-file FILE or set FINETUNE_AUTH=user:password "
            f"(or set {ALLOW_NO_AUTH_ENV}=1 to serve without a login on a trusted network)."
        )
    workspace = Path(args.workspace or os.environ.get(WORKSPACE_ENV) or "workspace").expanduser().resolve()
    return AppSettings(
        workspace=workspace,
        data_roots=[Path(p).expanduser().resolve() for p in args.data_root],
        model_roots=[Path(p).expanduser().resolve() for p in args.model_root],
        host=args.host,
        port=args.port,
        auth=auth,
        max_upload_mb=args.max_upload_mb,
        run_scheduler=not args.no_scheduler,
    )
