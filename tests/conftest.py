"""Shared fixtures: configs composed with Hydra's compose API, every output under tmp_path."""

import copy
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import your_ai
from your_ai import preload
from your_ai.errors import exit_on_user_error

ROOT = your_ai.PROJECT_ROOT
# The commands run MLX with OpenBLAS and tcmalloc preloaded (your_ai/preload.py: the workers
# start with them, the trainer restarts itself with them), and MLX's bundled BLAS makes CPU steps
# several times slower. The steps tests run in this process get them too: pytest starts again
# with them, and gives the commands it runs the environment it was itself started with.
PRELOADED = "YOUR_AI_TEST_PRELOADED"  # holds LD_PRELOAD as it was before
# One OpenBLAS thread per process: the two xdist workers and the commands they start share the
# cores, and OpenBLAS threads waiting for work on the tiny model's small matrices cost more CPU
# than they save (the quick sweep command: 13.5 s of CPU against 19.2 s with its default).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_configure(config):
    if PRELOADED in os.environ and xdist_controller(config):
        # pytest-xdist's workers start from this environment: they inherit the preloads and
        # PRELOADED, and restore LD_PRELOAD for the commands they run themselves.
        return
    if PRELOADED in os.environ:
        before = os.environ.pop(PRELOADED)
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    started_as_pytest = sys.orig_argv[1:3] == ["-m", "pytest"] or Path(sys.argv[0]).name in (
        "pytest",
        "py.test",
    )
    extra = preload.preload_env()
    if not extra or not started_as_pytest:
        return
    config.pluginmanager.getplugin("capturemanager").stop_global_capturing()
    sys.stdout.flush(), sys.stderr.flush()
    env = {**os.environ, **extra, PRELOADED: os.environ.get("LD_PRELOAD", "")}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def xdist_controller(config) -> bool:
    """This process hands the tests to pytest-xdist's workers (`-n 2`) and runs none itself."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(
        config, "workerinput"
    )


# With pytest-xdist's `--dist loadgroup` every test that uses one of these fixtures runs in the
# same worker: the finished sweeps that these session fixtures hold are computed once, and
# the tests that open the directories above their tmp_path to the postgres user (`traversable`)
# never restore them under each other.
SHARED_FIXTURES = (
    "small_sweep",
    "limited_sweep",
    "lengths",
    "mlx_lm_sweep",
    "spread_limit",
    "traversable",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))


# A small grid over the tiny model: 2 x 2 x 2 points, a few steps each.
SMALL_GRID = [
    "sweep.grid.batch_size=[1,2]",
    "sweep.grid.rank=[4,8]",
    "sweep.grid.num_layers=[2,4]",
    "sweep.steps=4",
    "sweep.warmup_steps=1",
    "sweep.early_stop=false",
]


def isolated(tmp: Path, storage: str | None = None) -> list[str]:
    """Overrides that keep a run's storage, profiles and outputs under `tmp`, Hydra's run and
    multirun directories included (one per command, as Hydra's own default names them)."""
    return [
        f"sweep.storage={storage or f'sqlite:///{tmp}/optuna.db'}",
        f"paths.sweeps={tmp}/sweeps",
        f"paths.profiles={tmp}/profiles",
        f"paths.output_dir={tmp}/run",
        "sweep.report=false",
        f"hydra.run.dir={tmp}/outputs/${{hydra.job.name}}/${{now:%H-%M-%S_%f}}",
        f"hydra.sweep.dir={tmp}/multirun/${{now:%H-%M-%S_%f}}",
    ]


def limit_in_a_gap(peaks_mb: dict, gap_mb: float = 5) -> float:
    """A memory limit (MB) in a gap between measured peaks, near the middle, so run-to-run noise
    cannot move a configuration across it."""
    ordered = sorted(peaks_mb.values())
    gaps = [i for i in range(len(ordered) - 1) if ordered[i + 1] - ordered[i] > gap_mb]
    cut = min(gaps, key=lambda i: abs(i - len(ordered) / 2))
    return (ordered[cut] + ordered[cut + 1]) / 2


def compose_config(overrides: list[str] | None = None, config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


# Config groups: an override naming one (`model=tiny-q4`) needs Hydra to compose.
GROUPS = {p.name for p in your_ai.CONF_DIR.iterdir() if p.is_dir()}
# Hydra's directories for a command: the composed config does not hold them.
HYDRA_DIRS = {"hydra.run.dir", "hydra.sweep.dir"}


def _plain(override: Override) -> bool:
    key = override.key_or_group
    return (
        override.type == OverrideType.CHANGE  # not +key, ++key, ~key
        and not override.is_sweep_override()
        and override.package is None
        and key not in GROUPS
        and "/" not in key
        and (not key.startswith("hydra.") or key in HYDRA_DIRS)
    )


def with_overrides(base: DictConfig, overrides: list[str]) -> DictConfig:
    """`base` (config.yaml composed without overrides) with `overrides`, as compose gives them.

    Plain `key=value` overrides are applied to a copy as Hydra applies them once the defaults
    are composed (OmegaConf.update, merging, on the struct config); Hydra's run and sweep
    directories are left out, as compose leaves them out of its config. Anything else (a config
    group, `+key`, `~key`, other `hydra.` keys) and any override Hydra would refuse (a key the
    config lacks) goes to compose, which composes it or raises Hydra's own error.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if not all(_plain(o) for o in parsed):
        return compose_config(list(overrides))
    cfg = copy.deepcopy(base)
    for override in parsed:
        if override.key_or_group in HYDRA_DIRS:
            continue
        try:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        except OmegaConfBaseException:
            return compose_config(list(overrides))
    return cfg


@pytest.fixture(scope="session")
def base_cfg() -> DictConfig:
    """conf/config.yaml and its defaults, composed once per session; never changed: tests take
    copies (`with_overrides`, `make_cfg`)."""
    return compose_config()


@pytest.fixture
def make_cfg(tmp_path, base_cfg):
    def make(*overrides: str, tmp: Path | None = None):
        return with_overrides(base_cfg, [*isolated(tmp or tmp_path), *overrides])

    return make


def wait_until(predicate, timeout: float = 300, interval: float = 0.05, what: str = "it"):
    """Poll `predicate` every `interval` seconds until it returns something true, and return
    that; fail once `timeout` seconds have passed without."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# Where the commands write (profiles, Hydra's run and multirun directories, studies): with every
# output under tmp_path, a test run adds nothing there, nor at the checkout's top level, except
# the embedded models, built under models/ on first use.
WRITTEN_BY_COMMANDS = ("conf/profile", "outputs", "multirun", "sweeps")
MAY_BE_BUILT = ("models/",)


def checkout_state() -> set[str]:
    """The untracked and ignored paths git lists in WRITTEN_BY_COMMANDS (each file) and at the
    checkout's top level."""

    def listed(*args: str) -> set[str]:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}

    inside = listed("--untracked-files=all", "--", *WRITTEN_BY_COMMANDS)
    top = {p for p in listed("--untracked-files=normal") if "/" not in p.rstrip("/")}
    return {p for p in inside | top if not p.startswith(MAY_BE_BUILT)}


@pytest.fixture(scope="session", autouse=True)
def checkout_left_alone():
    """Fails the session if a test wrote into the checkout (see WRITTEN_BY_COMMANDS)."""
    try:
        before = checkout_state()
    except (OSError, subprocess.CalledProcessError):
        yield  # not a git checkout: nothing to compare against
        return
    yield
    added = sorted(checkout_state() - before)
    if added:
        pytest.fail(f"the tests wrote into the checkout: {', '.join(added)}", pytrace=False)


def refused(body, cfg: DictConfig, capsys) -> str:
    """What a command whose body is `body` (sweep.run, train.run) prints as it refuses `cfg`,
    run in this process through the wrapper every command has: status 2 and one line, the
    last line of its stderr, returned."""
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(body)(cfg)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def command_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_command(argv: list[str], timeout: float = 600, env: dict | None = None):
    """Run a command line as a user types it, from the checkout, capturing its output."""
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env=env or command_env(), timeout=timeout
    )


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, base_cfg):
    """One finished sweep of the small grid, no memory limit: (cfg, summary)."""
    from your_ai import sweep

    tmp = tmp_path_factory.mktemp("small-sweep")
    cfg = with_overrides(base_cfg, [*isolated(tmp), *SMALL_GRID, "sweep.study_name=small"])
    return cfg, sweep.run(cfg)


# Batch 1 and batch 4 lie megabytes apart on the tiny model, far beyond run-to-run noise,
# so a limit between them prunes the same points every time.
LIMITED_GRID = [
    "sweep.grid.batch_size=[1,4]",
    "sweep.grid.rank=[4,8]",
    "sweep.grid.num_layers=[2,4]",
    "sweep.steps=4",
    "sweep.warmup_steps=1",
]


def grid_point(t) -> tuple[int, int, int]:
    """A trial's (batch size, rank, layers)."""
    from your_ai import record

    return tuple(t.params[record.AXES[a]] for a in ("batch_size", "rank", "num_layers"))


@pytest.fixture(scope="session")
def limited_sweep(tmp_path_factory, base_cfg):
    """Two studies of LIMITED_GRID in one storage, no margin: `free` (no limit, to learn the
    peaks) and `limited`, whose limit lies between the heaviest batch-1 and the lightest batch-4
    peak, exporting its profile and writing its report. The sweep's pruning and the report are
    both checked on it."""
    from your_ai import study, sweep

    tmp = tmp_path_factory.mktemp("limited-sweep")
    base = [*isolated(tmp), *LIMITED_GRID, "sweep.margin=0"]
    free = sweep.run(with_overrides(base_cfg, [*base, "sweep.study_name=free"]), out=io.StringIO())
    measured = {
        grid_point(t): t.user_attrs["peak_memory_gb_with_margin"]
        for t in study.measured_grid_trials(free["study"])
    }
    light = max(v for p, v in measured.items() if p[0] == 1)
    heavy = min(v for p, v in measured.items() if p[0] == 4)
    limit = round((light + heavy) / 2, 3)
    assert light < limit < heavy, f"no limit separates batch 1 from batch 4: {measured}"
    cfg = with_overrides(
        base_cfg,
        [
            *base,
            "sweep.study_name=limited",
            f"sweep.max_memory_gb={limit}",
            "sweep.export=true",
            "sweep.report=true",
        ],
    )
    printed = io.StringIO()
    limited = sweep.run(cfg, out=printed)
    return SimpleNamespace(
        tmp=tmp,
        cfg=cfg,
        free=free["study"],
        limited=limited["study"],
        best=limited["best"],
        limit=limit,
        peaks=measured,
        printed=printed.getvalue(),
    )
