"""`quantlab publish BUILD --repo-id OWNER/NAME`: upload a verified build to the Hugging Face Hub.

Never part of `build` or any make target: it runs only when asked, after the checksums pass. The
Hub login is huggingface_hub's own (HF_TOKEN or `hf auth login`); quantlab never reads it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from quantlab.checksums import build_files, check_checksums
from quantlab.schema.build import read_manifest
from quantlab.placement import recover_interrupted_replace
from quantlab.errors import QuantlabError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def publish_build(
    folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False, echo: Callable[[str], None] = print
) -> str | None:
    folder = Path(folder)
    if not _REPO_ID.match(repo_id or ""):
        raise QuantlabError(f"--repo-id {repo_id!r}: expected OWNER/NAME, e.g. my-user/Qwen3.6-27B-bnb-nf4")
    recover_interrupted_replace(folder, lambda line: echo(f"note: {line}"))
    manifest = read_manifest(folder)
    problems, good = check_checksums(folder)
    if problems:
        raise QuantlabError(f"{folder}: not published, the checksums fail: " + "; ".join(problems[:5]))
    if manifest.base.source == "synthetic":
        raise QuantlabError(f"{folder}: built from synthetic weights; not published")
    files = build_files(folder) + ["SHA256SUMS"]
    echo(f"{folder}: {len(files)} file(s), checksums ok, {manifest.method.label} of {manifest.base.name}")
    if dry_run:
        for name in files:
            echo(f"  would upload {name}")
        echo(f"dry run: nothing uploaded to {repo_id}")
        return None
    if hub_offline():
        raise QuantlabError(
            f"cannot publish to {repo_id}: HF_HUB_OFFLINE is set, so the Hugging Face Hub is not reachable. "
            "Unset it on a machine with network (and log in with `hf auth login` or HF_TOKEN), then run "
            f"quantlab publish {folder} --repo-id {repo_id}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model",
            commit_message=f"quantlab {manifest.quantlab}: {manifest.method.label} of {manifest.base.name}",
        )
    except HfHubHTTPError as exc:
        raise QuantlabError(f"cannot publish to {repo_id}: the Hub refused ({_first_line(exc)})") from None
    except Exception as exc:  # connection errors: their classes depend on huggingface_hub's HTTP backend
        raise QuantlabError(
            f"cannot publish to {repo_id}: the Hugging Face Hub is not reachable from here ({type(exc).__name__}: "
            f"{_first_line(exc)}). Run it on a machine with network."
        ) from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    echo(f"published {folder} to {url}")
    return url


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
