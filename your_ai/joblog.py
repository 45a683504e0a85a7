"""A Hydra job's run directory: its log holds what the console showed, and a command refused
before it did anything leaves none behind.

The commands print to the console rather than log, so Hydra's `<run dir>/<job>.log` would stay
empty: while a command runs, each line it prints is also written there.
"""

import logging
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


@dataclass
class Job:
    run_dir: Path
    log: Path | None  # the file Hydra's job logging writes, if it is configured to write one
    hydra_subdir: str | None  # Hydra's own files in run_dir (`.hydra`)
    fresh: bool  # the log was empty as the job began: no earlier run wrote into run_dir


def current() -> Job | None:
    """The Hydra job this process is running, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    logs = [
        Path(h.baseFilename)
        for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler)
    ]
    log = logs[0] if logs else None
    fresh = log is None or not log.exists() or log.stat().st_size == 0
    return Job(Path(hydra_cfg.runtime.output_dir), log, hydra_cfg.output_subdir, fresh)


def shown(line: str) -> str:
    """What a terminal shows of a line once a progress bar's carriage returns have redrawn it."""
    return line.rsplit("\r", 1)[-1]


class Tee:
    """A console stream that also writes each line it completes to the log."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log, self.line = stream, log, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *lines, rest = (self.line + text).split("\n")
        for line in lines:
            self.log.write(shown(line) + "\n")
        self.line = shown(rest)  # a bar redrawn for hours is kept as its last drawing only
        return written

    def end(self) -> None:
        if self.line.strip():
            self.log.write(self.line + "\n")
        self.line = ""

    def __getattr__(self, name: str):
        # isatty, fileno, encoding, flush: tqdm asks the console itself
        return getattr(self.stream, name)


@contextmanager
def console_to_log(job: Job | None) -> Iterator[None]:
    """Write what sys.stdout and sys.stderr show to the job's log as well."""
    if job is None or job.log is None:
        yield
        return
    with open(job.log, "a", encoding="utf-8", errors="backslashreplace", buffering=1) as log:
        tees = Tee(sys.stdout, log), Tee(sys.stderr, log)
        sys.stdout, sys.stderr = tees
        try:
            yield
        except Exception:
            log.write(traceback.format_exc())  # Hydra prints it to the console after the job
            raise
        finally:
            sys.stdout, sys.stderr = tees[0].stream, tees[1].stream
            for tee in tees:
                tee.end()


def remove_if_unused(job: Job | None) -> None:
    """Remove the run directory Hydra made for a refused command, if it holds only Hydra's own
    files and this job's log; a directory with anything else (a run to resume) is kept."""
    if job is None or not job.fresh or not job.run_dir.is_dir():
        return
    own = {job.hydra_subdir}
    if job.log is not None and job.log.parent.resolve() == job.run_dir.resolve():
        own.add(job.log.name)
    if set(os.listdir(job.run_dir)) <= own:
        shutil.rmtree(job.run_dir, ignore_errors=True)
