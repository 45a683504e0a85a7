"""Atomic writes and directory publishing that keep the usual file mode.

tempfile.mkstemp creates its file 0600 and mkdtemp its directory 0700, and a rename keeps the
mode: profiles, adapters and checkpoints written that way could be read by their owner only.
Here temporary files and directories are created with 0666 / 0777 less the umask, as `open`
and `mkdir` create any other.
"""

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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
    tmp = _beside(path, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    staging = _beside(path, lambda tmp: tmp.mkdir(0o777))
    try:
        write(staging)
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(staging, path)
    except OSError:
        if replace or not path.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
