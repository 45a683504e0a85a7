"""Load: the full 96-point grid on the tiny model in one PostgreSQL study, by one worker and by
four worker processes at once; wall time, and that each study holds exactly 96 trials.

    YOUR_AI_TEST_POSTGRES=postgresql+psycopg://... python benchmarks/scale_out.py [overrides...]
    (or: eval "$(scripts/postgres.sh start /tmp/pg)" first)
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, record, sweep_command, table  # noqa: E402


def run(url: str, workers: int, overrides: list[str]) -> tuple[float, str]:

    name = f"load-{workers}-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="your_ai-load-"))
    args = sweep_command(tmp, url, "mode=full", f"sweep.study_name={name}", *overrides)
    tick = time.perf_counter()
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - tick
    assert codes == [0] * workers, codes
    return wall, name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    url = os.environ.get("YOUR_AI_TEST_POSTGRES")
    if not url:
        sys.exit("set YOUR_AI_TEST_POSTGRES (scripts/postgres.sh start <dir> prints it)")
    import optuna

    from your_ai import study
    from your_ai.record import grid_point

    rows = []
    for workers in (1, 4):
        wall, name = run(url, workers, args.overrides)
        st = optuna.load_study(study_name=name, storage=url)
        states = {}
        for t in st.trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        points = {
            grid_point(t.params) for t in st.trials if t.state.name in ("COMPLETE", "PRUNED")
        }
        pids = {t.system_attrs.get("your_ai:worker", {}).get("pid") for t in st.trials}
        best = study.ranked_complete(st)[0]  # the sweep's answer, ties broken by throughput
        rows.append(
            [
                workers,
                f"{wall:.1f}",
                len(st.trials),
                len(points),
                states,
                len(pids),
                tuple(best.params.values()),
            ]
        )
    body = (
        "full grid (96 points) on the tiny model, one PostgreSQL 15 server on loopback\n\n"
        + table(
            [
                "workers",
                "wall s",
                "trials",
                "grid points measured",
                "states",
                "processes that measured",
                "winner",
            ],
            rows,
        )
    )
    record(
        "Scale-out: one study in PostgreSQL, 1 and 4 workers",
        command_line(),
        body,
        where=Path(args.output) if args.output else None,
    )


if __name__ == "__main__":
    main()
