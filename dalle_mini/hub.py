"""Where checkpoints come from: the embedded assets, a local folder, or a Hugging Face hub repo.

Every `from_pretrained` in the package goes through `resolve_folder`, so the three sources
behave alike: the result is a local folder holding the files a loader needs, or a
`CheckpointError` that names what is missing and how to get it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

EMBEDDED_NAME = "embedded"
EMBEDDED_ROOT = Path(__file__).resolve().parent / "assets" / "embedded"


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, incomplete or does not match its config."""


def embedded_folder(component: str) -> Path:
    """The folder of one embedded component: "dallebart", "vqgan" or "clip"."""
    return EMBEDDED_ROOT / component


def _is_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def resolve_folder(
    name_or_folder: str | os.PathLike,
    *,
    component: str,
    required_files: Sequence[str],
    optional_files: Sequence[str] = (),
    revision: str | None = None,
) -> Path:
    """Returns a local folder that holds `required_files`.

    Args:
      name_or_folder: "embedded", a local folder, or a hub repo id such as
        "dalle-mini/dalle-mini".
      component: which embedded component "embedded" means ("dallebart", "vqgan", "clip").
      required_files: files the loader cannot do without; their absence is an error.
      optional_files: files fetched from the hub when present (tokenizer extras, ...).
      revision: hub branch, tag or commit; ignored for local folders.
    """
    name = os.fspath(name_or_folder)
    if name == EMBEDDED_NAME:
        folder = embedded_folder(component)
        if not folder.is_dir():
            raise CheckpointError(
                f"the embedded {component} model is missing from {folder}; reinstall the "
                "package or retrain it with `dalle-mini-train all`"
            )
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif not _is_repo_id(name):
        raise CheckpointError(
            f"{name!r} is not a folder; pass an existing checkpoint folder, a hub repo id "
            f"such as 'dalle-mini/dalle-mini', or {EMBEDDED_NAME!r}"
        )
    else:
        folder = _download(name, revision, [*required_files, *optional_files])
    missing = [f for f in required_files if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint folder {folder} lacks {', '.join(missing)}; a {component} checkpoint "
            f"needs {', '.join(required_files)}"
        )
    return folder


def _download(repo_id: str, revision: str | None, files: Sequence[str]) -> Path:
    """Fetches `files` of a hub repo into the normal Hugging Face cache (or finds them there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except HFValidationError as error:
        raise CheckpointError(
            f"{repo_id!r} is neither a local folder nor a valid hub repo id ({error})"
        ) from error
    except (LocalEntryNotFoundError, OSError) as error:
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise CheckpointError(
            f"could not get {where} from the Hugging Face hub and it is not in the local cache "
            f"({type(error).__name__}). Connect to the network once so it is cached, or download "
            f"it elsewhere with `hf download {repo_id} --local-dir DIR` and pass DIR. "
            f"Files needed: {', '.join(files)}"
        ) from error
