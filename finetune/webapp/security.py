"""Safety rules of the web app: typed paths stay inside configured roots, uploads stay under a size limit,
and logins come from a file or an environment variable.

Every path that reaches the app from a browser goes through `resolve_inside`, which resolves symlinks and
`..` first and compares afterwards, so neither can lead out of a root.
"""

from __future__ import annotations

import re
import shutil
import uuid
import zipfile
from pathlib import Path

from ..log import get_logger

logger = get_logger(__name__)

# Upload kinds accepted as training data; a zip must contain an image folder (one sub-folder per class).
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
UPLOAD_SUFFIXES = (*TABLE_SUFFIXES, ".zip")
# A Hub repository id: `name` or `owner/name`, letters, digits, `-`, `_` and `.` only.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PathNotAllowed(ValueError):
    """Raised for a path that resolves outside every allowed root."""


class UploadRejected(ValueError):
    """Raised for an upload that is too large or of an unsupported kind; nothing is stored."""


def resolve_inside(text: str, roots: list[Path], subject: str = "path") -> Path:
    """Resolve a typed path and return it if it lies inside one of `roots`.

    A relative path is looked up under each root in order and the first that exists wins (else the first root).
    Symlinks and `..` are resolved before the check, so `root/../x` and a link pointing out of a root are
    rejected just like `/etc/passwd`.
    """
    raw = (text or "").strip()
    if not raw:
        raise PathNotAllowed(f"The {subject} is empty; give a path inside {_roots_text(roots)}.")
    if "\x00" in raw:
        raise PathNotAllowed(f"The {subject} {raw!r} contains a NUL character.")
    candidate = Path(raw).expanduser()
    if candidate.is_absolute():
        options = [candidate]
    else:
        options = [root / candidate for root in roots]
        options.sort(key=lambda option: not option.exists())
    if not options:
        raise PathNotAllowed(f"No roots are configured for the {subject} {raw!r}; start the app with a root option.")
    resolved = options[0].resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise PathNotAllowed(
        f"The {subject} {raw!r} resolves to {resolved}, which is outside the allowed folders {_roots_text(roots)}. "
        "Use a path inside them (symlinks and '..' leading out are rejected)."
    )


def _roots_text(roots: list[Path]) -> str:
    return ", ".join(str(root) for root in roots) or "(none configured)"


def looks_like_hub_id(text: str) -> bool:
    """Return whether `text` reads as a Hub repository id rather than a filesystem path."""
    raw = text.strip()
    return bool(_HUB_ID.match(raw)) and ".." not in raw and not raw.startswith((".", "~", "/"))


def resolve_model_reference(text: str, roots: list[Path]) -> str:
    """Return a local model folder inside `roots`, or the Hub id unchanged.

    A reference that names an existing folder under a root, or that reads as a path (absolute, `.`, `~`,
    `..`), must stay inside the roots; anything else that reads as `owner/name` is passed on as a Hub id.
    """
    raw = (text or "").strip()
    if looks_like_hub_id(raw) and not any((root / raw).exists() for root in roots):
        return raw
    return str(resolve_inside(raw, roots, subject="model folder"))


def load_auth(auth_file: str | None, env_value: str | None) -> list[tuple[str, str]] | None:
    """Read `user:password` pairs from a file (one per line, `#` comments) or one pair from the environment."""
    if auth_file:
        path = Path(auth_file).expanduser()
        if not path.is_file():
            raise ValueError(f"--auth-file {auth_file} not found; create it with `user:password` lines.")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        pairs = [_parse_pair(line, f"{auth_file}") for line in lines if line and not line.startswith("#")]
        if not pairs:
            raise ValueError(f"--auth-file {auth_file} has no `user:password` line.")
        return pairs
    if env_value:
        return [_parse_pair(env_value.strip(), "FINETUNE_AUTH")]
    return None


def _parse_pair(line: str, source: str) -> tuple[str, str]:
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        # The line may contain a password, so it is not echoed.
        raise ValueError(f"{source}: expected `user:password` with both parts non-empty.")
    return user, password


def check_upload_size(path: str | Path, max_bytes: int) -> int:
    """Return the file's size in bytes, or raise `UploadRejected` when it exceeds `max_bytes`."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise UploadRejected(
            f"The upload is {size / 2**20:.1f} MiB, above the limit of {max_bytes / 2**20:g} MiB; "
            "nothing was stored. Upload a smaller file or restart the app with a larger --max-upload-mb."
        )
    return size


def store_upload(source: str | Path, upload_dir: Path, max_bytes: int) -> Path:
    """Check an uploaded file and copy it (a zip: extract it) into a fresh folder under `upload_dir`.

    Size and kind are checked before anything is written; a zip's total uncompressed size counts against the
    same limit (a guard against zip bombs) and members that would land outside the folder are rejected.
    Returns the stored file, or the extracted image folder for a zip.
    """
    source = Path(source)
    suffix = source.suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise UploadRejected(
            f"Uploads must be one of {', '.join(UPLOAD_SUFFIXES)}, got {source.name!r}. "
            "Zip an image folder (one sub-folder per class) or upload a table."
        )
    check_upload_size(source, max_bytes)
    if suffix == ".zip":
        members = _checked_zip_members(source, max_bytes)
    target_dir = upload_dir / uuid.uuid4().hex[:12]
    target_dir.mkdir(parents=True, exist_ok=False)
    if suffix != ".zip":
        target = target_dir / _safe_name(source.name)
        shutil.copyfile(source, target)
        logger.info("stored upload %s (%d bytes)", target, target.stat().st_size)
        return target
    with zipfile.ZipFile(source) as archive:
        archive.extractall(target_dir, members=members)
    root = _single_top_folder(target_dir)
    logger.info("extracted image folder upload to %s", root)
    return root


def _checked_zip_members(source: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile:
        raise UploadRejected(f"{source.name!r} is not a valid zip file.") from None
    with archive:
        members = archive.infolist()
        total = sum(member.file_size for member in members)
        if total > max_bytes:
            raise UploadRejected(
                f"The zip expands to {total / 2**20:.1f} MiB, above the limit of {max_bytes / 2**20:g} MiB; "
                "nothing was stored."
            )
        for member in members:
            parts = Path(member.filename).parts
            if member.filename.startswith(("/", "\\")) or ".." in parts:
                raise UploadRejected(f"The zip member {member.filename!r} points outside the archive; nothing was stored.")
        return members


def _single_top_folder(folder: Path) -> Path:
    # A zip of `pets/` holds `pets/cat/...`; the image folder is then `pets`, not the extraction folder.
    entries = [entry for entry in folder.iterdir() if entry.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]", "_", Path(name).name)
    return cleaned or "upload"
