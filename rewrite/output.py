"""Output folders: checked before any work, built in a hidden sibling, moved into place only when complete.

- One run per folder at a time: an exclusive `flock` on a sibling lock file (released by the kernel
  when the process dies, so a killed run never blocks the next one).
- A run writes into `.<name>.rewrite-tmp-*` beside the folder; an interrupted run leaves only that
  hidden folder, never a half-written `model.pt2` that looks like a result.
- The folder's manifest (`.rewrite-manifest.json`) lists the files a run made. `force` replaces exactly
  those as a whole (no stale `model.onnx` survives beside a new `model.pt2`), never a file the tool did
  not write, and never a protected path (the model file the user gave).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


from rewrite.errors import RewriteError

MANIFEST = ".rewrite-manifest.json"
# Every name a run may write: a foreign file with one of these names makes --force refuse up front.
PRODUCTS = ("model.pt2", "model.pt", "model.onnx", "model.onnx.data", "model.aoti.pt2",
            "report.md", "report.json", "recipe.json", "config.json", "generation_config.json", "model.safetensors",
            "rewritten.safetensors", "rewrite-layers.json", "model.safetensors.index.json")


class OutputFolder:
    def __init__(self, path: str | Path, force: bool = False, protect: tuple[Path, ...] = ()):
        self.path = Path(path).absolute()
        self.force = force
        self.protect = tuple(Path(p).resolve() for p in protect)
        self.check()

    def check(self) -> None:
        """Every reason the run could not write its output, found before any work starts."""
        self._check_location()
        self._check_apart()
        if not (self.path.is_dir() and any(self.path.iterdir())):
            return
        if not self.force:
            raise RewriteError(f"output folder {str(self.path)!r} already holds files: choose another -o, or add "
                               "--force to replace what an earlier rewrite run wrote there")
        for protected in self.protect:
            if protected.parent == self.path.resolve():
                raise RewriteError(f"the model file {str(protected)!r} is inside the output folder: --force could "
                                   "replace it; choose another -o")
        ours = set(_manifest(self.path))
        pictures = sorted(p.name for p in self.path.glob("report-*.png"))  # their names follow the passes run
        foreign = [n for n in [*PRODUCTS, *pictures] if (self.path / n).exists() and n not in ours]
        if foreign:
            raise RewriteError(f"{str(self.path / foreign[0])!r} was not written by rewrite, and --force never "
                               "replaces such files: choose another -o")

    def _check_apart(self) -> None:
        """A model folder (a checkpoint) and the output folder never overlap: neither may hold the other."""
        out = self.path.resolve()
        for folder in (p for p in self.protect if p.is_dir()):
            how = ("is" if out == folder else "lies inside" if folder in out.parents else
                   "holds" if out in folder.parents else None)
            if how:
                raise RewriteError(f"output folder {str(self.path)!r} {how} the model folder {str(folder)!r}: the "
                                   "output must not mix with your files; choose an -o outside it")

    def _check_location(self) -> None:
        for folder in (self.path, *self.path.parents):
            if folder.exists() and not folder.is_dir():
                what = "is a file" if folder == self.path else f"lies below the file {str(folder)!r}"
                raise RewriteError(f"output path {str(self.path)!r} {what}: give a folder with -o")
            if folder.exists():
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise RewriteError(f"cannot write in {str(folder)!r} (permission denied): choose another -o")
                return

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """Lock, yield an empty hidden folder to write into, and move its files into place on success."""
        created = _make_parents(self.path.parent)
        try:
            with _locked(self.path):
                self.check()  # again, now that no other run can change the folder
                stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.rewrite-tmp-", dir=self.path.parent))
                stage.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the output folder's mode
                try:
                    yield stage
                    self._commit(stage)
                except Exception as exc:
                    if _storage_full(exc):
                        raise RewriteError(f"writing the output to {str(self.path)!r} failed ({_storage_full(exc)}): "
                                           "free space or choose another -o, and run again; nothing was left "
                                           "there") from None
                    raise
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
        except BaseException:
            _remove_empty(created)
            raise

    def final(self, staged: str | Path) -> str:
        """Where a file written under the stage will live once the run completes."""
        return str(self.path / Path(staged).name) if staged else ""

    def _commit(self, stage: Path) -> None:
        names = sorted(p.name for p in stage.iterdir())
        _write_manifest(stage, names)
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            if self.path.exists():
                self.path.rmdir()
            os.rename(stage, self.path)  # atomic: the folder appears complete or not at all
            return
        old = _manifest(self.path)
        _write_manifest(self.path, sorted(set(old) | set(names)), complete=False)  # covers both while swapping
        for name in old:
            if name not in names:
                (self.path / name).unlink(missing_ok=True)
        for name in names:
            if name != MANIFEST:
                os.replace(stage / name, self.path / name)
        _write_manifest(self.path, names)


FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file grew past the size limit",
        errno.EDQUOT: "the disk quota is used up"}


def _storage_full(exc: BaseException) -> str | None:
    """Why a write failed for want of room (an OSError, or a library's error quoting one), else None."""
    if isinstance(exc, OSError) and exc.errno in FULL:
        return FULL[exc.errno]
    text = str(exc)
    return next((why for code, why in FULL.items() if os.strerror(code) in text or f"os error {code})" in text), None)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.parent / f".{path.name}.rewrite-lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RewriteError(f"another rewrite run is writing {str(path)!r}: wait for it or choose another -o") \
                from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _manifest(folder: Path) -> list[str]:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f for f in files if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")]


def _write_manifest(folder: Path, names: list[str], complete: bool = True) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"written_by": "rewrite", "complete": complete,
                               "files": [n for n in names if n != MANIFEST]}, indent=2))
    os.replace(tmp, folder / MANIFEST)


def _make_parents(folder: Path) -> list[Path]:
    """Create missing parent folders; return them so a failed run can remove them again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()
