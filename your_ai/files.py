"""Atomic writes and directory publishing that keep the usual file mode.

tempfile.mkstemp creates its file 0600 and mkdtemp its directory 0700, and a rename keeps the
mode: profiles, adapters and checkpoints written that way could be read by their owner only.
Here temporary files and directories are created with 0666 / 0777 less the umask, as `open`
and `mkdir` create any other.
"""

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from your_ai.errors import UserError

# The file system is full (or the user's quota is): nothing a retry would change.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20


class NoSpace(UserError):
    """A write the file system had no room for."""


def no_space(path: Path) -> NoSpace:
    """One line for a write the disk had no room for; what was there before is kept."""
    kept = "the previous file is kept" if path.exists() else "nothing was written"
    return NoSpace(f"{path}: no space left on the device; {kept}, nothing half-written")


def out_of_space(path: Path, err: BaseException) -> bool:
    """Whether a failed write failed for room. Python says so (ENOSPC, EDQUOT); MLX's writers
    raise a RuntimeError without an errno ("[write] Unable to write ..."), so for those the file
    system is asked what is left (before the partial file is removed)."""
    if isinstance(err, NoSpace):
        return True
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    if isinstance(err, OSError | RuntimeError):
        try:
            return shutil.disk_usage(path.parent).free < NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


def _beside(path: Path, create: Callable[[Path], None]) -> Path:
    """A new name beside `path`, created exclusively by `create` (hidden, same suffix: MLX
    appends `.safetensors` to a name without it)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _new_file(tmp: Path) -> None:
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write the new content into; it is renamed over `path`
    when the block ends, or removed if the block raises: a kill leaves the old file or the new,
    never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _beside(path, _new_file)
    except OSError as err:
        if out_of_space(path, err):
            raise no_space(path) from None
        raise
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        full = out_of_space(path, err)
        tmp.unlink(missing_ok=True)
        if full:
            raise no_space(path) from None
        raise


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, then rename."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def publish_dir(path: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Create `path` by writing into a staging directory beside it, then renaming it into place.

    A rename is atomic: readers see the whole directory or none. An existing `path` is removed
    first with `replace=True`; otherwise it is kept (another process that won the race to
    build it wrote the same thing).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = _beside(path, lambda tmp: tmp.mkdir(0o777))
    except OSError as err:
        if out_of_space(path, err):
            raise no_space(path) from None
        raise
    try:
        write(staging)
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(staging, path)
    except (OSError, RuntimeError, NoSpace) as err:
        # A file inside that found no room names the staging directory: name the target.
        if out_of_space(path, err):
            raise no_space(path) from None
        if not isinstance(err, OSError) or replace or not path.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
