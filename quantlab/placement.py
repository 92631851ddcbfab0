"""Where a build may go, and how it is put there: nothing quantlab deletes or replaces is something it did not make.

- `check_target`: the build folder must not be, hold, or sit inside the source model's folder, the
  measurements folder or another build; an existing folder is replaced (`--force`) only when it is a
  quantlab build (its quantlab_build.json says so) holding no file the build did not write.
- `move_into_place`: the finished hidden folder is renamed to the target; a build it replaces is first
  renamed aside (`.NAME.old-PID-RANDOM`), then deleted.
- `recover_interrupted_replace`: a process killed between those renames leaves the target missing and
  the old build aside; the next command that touches the target puts it back (or, when the new build
  made it into place, deletes the old one), and says so.
- `remove_stale_partials`: the hidden folders of builds whose process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from quantlab.checksums import build_files, read_checksums
from quantlab.schema.build import (CHECKSUMS_NAME, GGUF_MANIFEST_NAME, MANIFEST_NAME, is_gguf_build,
                                   read_gguf_manifest, read_manifest)
from quantlab.errors import QuantlabError

PARTIAL = ".partial-"
OLD = ".old-"


def check_target(target: Path, force: bool, protected: dict[str, Path | None]) -> None:
    """Raise QuantlabError unless `target` may receive a build. `protected`: description -> folder that the
    build must neither overlap (be, hold, or sit inside) nor replace, e.g. the source and measurements."""
    where = _real(target)
    for what, folder in protected.items():
        if folder is None:
            continue
        other = _real(folder)
        if where == other or other in where.parents:
            raise QuantlabError(f"{target}: inside {what} ({folder}); a build goes in a folder of its own, "
                                "e.g. builds/NAME")
        if where in other.parents:
            raise QuantlabError(f"{target}: holds {what} ({folder}); a build there would replace it")
    enclosing = next((a for a in where.parents if (a / MANIFEST_NAME).is_file() or (a / GGUF_MANIFEST_NAME).is_file()),
                     None)
    if enclosing is not None:
        raise QuantlabError(f"{target}: inside the quantlab build {enclosing}; a build goes in a folder of its own")
    if target.exists() or target.is_symlink():
        check_replaceable(target)  # first: --force is suggested only where it would be taken
        if not force:
            raise QuantlabError(f"{target}: already exists; pass --force to replace it, or --out to build elsewhere")


def check_replaceable(target: Path) -> None:
    """`--force` replaces a folder only when quantlab built it and it holds nothing else."""
    refuse = ("; --force replaces only a folder that quantlab built. Remove or rename it yourself, "
              "or build elsewhere with --out")
    if target.is_symlink():
        raise QuantlabError(f"{target}: a symbolic link, not a build folder{refuse}")
    if not target.is_dir():
        raise QuantlabError(f"{target}: a file, not a build folder{refuse}")
    try:
        if is_gguf_build(target):
            read_gguf_manifest(target)
        else:
            read_manifest(target)
    except QuantlabError as exc:
        raise QuantlabError(f"{exc}{refuse}") from None
    try:
        listed = set(read_checksums(target))
        present = build_files(target)
    except (OSError, ValueError) as exc:
        raise QuantlabError(f"{target}: an incomplete quantlab build (its {CHECKSUMS_NAME}: {exc}){refuse}") from None
    foreign = [name for name in present if name not in listed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise QuantlabError(f"{target}: holds {len(foreign)} file(s) the build did not write ({shown}); move them out "
                            "first, --force would delete them")


@contextmanager
def building(target: Path, force: bool):
    """A hidden folder beside `target` to build in (stale ones of dead processes removed first), renamed to
    `target` when the block ends normally, deleted when it does not: an interrupted build leaves nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = target.parent / f".{target.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, target: Path, force: bool) -> None:
    if target.exists() or target.is_symlink():
        if not force:
            raise QuantlabError(f"{target}: appeared while building; the new build is discarded")
        check_replaceable(target)  # again: the folder may have changed while the build ran
        old = target.parent / f".{target.name}{OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)  # a kill between these renames: recover_interrupted_replace puts `old` back
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)


def recover_interrupted_replace(target: Path, echo=None) -> list[str]:
    """Put back (or clean up) what an interrupted `--force` replace left beside `target`; the messages, also echoed."""
    echo = echo or (lambda line: print(f"quantlab: {line}", file=sys.stderr))
    target = Path(target)
    messages = []
    for old in sorted(_leftovers(target), key=_mtime, reverse=True):
        if not (target.exists() or target.is_symlink()):
            old.rename(target)
            messages.append(f"{target}: restored the previous build from {old.name}, left by a `quantlab build "
                            "--force` that was interrupted while replacing it")
        else:
            shutil.rmtree(old, ignore_errors=True)
            messages.append(f"{target}: removed {old.name}, the previous build left aside by an interrupted "
                            "`quantlab build --force` (the new build had been put in place)")
        echo(messages[-1])
    return messages


def _leftovers(target: Path) -> list[Path]:
    """`.NAME.old-PID-RANDOM` folders beside `target` whose process is gone."""
    try:
        candidates = list(target.parent.glob(f".{glob_escape(target.name)}{OLD}*"))
    except OSError:
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}{re.escape(OLD)}(\d+)-[0-9a-f]{{8}}")
    found = []
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not alive(int(match.group(1))):
            found.append(path)
    return found


def remove_stale_partials(target: Path) -> None:
    """Hidden folders of builds of the same target whose process is gone (killed, power cut)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}{re.escape(PARTIAL)}(\d+)-")
    for path in target.parent.glob(f".{glob_escape(target.name)}{PARTIAL}*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _real(path: Path) -> Path:
    """The absolute path with symbolic links resolved, as far as they resolve."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return Path(os.path.abspath(path))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
