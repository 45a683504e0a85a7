"""optuna-dashboard over a finished sweep: every trial and its measurements, and the study page."""

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

from tests.conftest import command_env, wait_until

CHROMIUM = Path("/usr/bin/chromium")
MEASUREMENTS = (
    "peak_memory_mb",
    "peak_memory_gb_with_margin",
    "tokens_per_sec",
    "step_time_s",
    "score",
    "memory_pruned",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def dashboard(small_sweep, tmp_path_factory):
    """The dashboard command users type, serving the small sweep's storage: (URL, summary)."""
    cfg, summary = small_sweep
    url = str(cfg.sweep.storage)
    executable = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert executable, "optuna-dashboard is not installed beside this Python"
    port = free_port()
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [executable, url, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=command_env(),
        )
    base = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        assert proc.poll() is None, f"optuna-dashboard exited: {log.read_text()[-2000:]}"
        try:
            get_json(f"{base}/api/studies")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_until(answering, timeout=60, interval=0.1, what=f"an answer from {base} ({log})")
        yield base, summary
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def study_id(base: str, name: str) -> int:
    studies = get_json(f"{base}/api/studies")["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


def test_api_serves_every_trial_with_its_measurements(dashboard):
    base, summary = dashboard
    st = summary["study"]
    detail = get_json(f"{base}/api/studies/{study_id(base, st.study_name)}")
    served = {t["number"]: t for t in detail["trials"]}
    trials = optuna.load_study(study_name=st.study_name, storage=st._storage).trials
    assert sorted(served) == [t.number for t in trials]
    for t in trials:
        attrs = {a["key"]: a["value"] for a in served[t.number]["user_attrs"]}
        # The dashboard sends every value as text: numbers as str(), the rest as JSON.
        assert attrs == {
            k: v if isinstance(v, str) else str(v) if isinstance(v, int | float) else json.dumps(v)
            for k, v in t.user_attrs.items()
        }
        assert served[t.number]["state"] == t.state.name.capitalize()
        if t.state == TrialState.COMPLETE:
            assert set(MEASUREMENTS) <= set(attrs), t.number
        params = {p["name"]: p["param_external_value"] for p in served[t.number]["params"]}
        assert params == {name: str(value) for name, value in t.params.items()}
    settings = {a["key"]: a["value"] for a in detail["user_attrs"]}
    assert json.loads(settings["settings"]) == st.user_attrs["settings"]
    assert [t["number"] for t in detail["best_trials"]] == [summary["best"].number]


@pytest.mark.slow
def test_study_page_renders(dashboard, tmp_path):
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: `.ci/run` installs it (apt-get install -y chromium)"
    )
    base, summary = dashboard
    st = summary["study"]
    shot = tmp_path / "study.png"
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"--screenshot={shot}",
            "--window-size=1400,1000",
            "--virtual-time-budget=10000",
            f"{base}/dashboard/studies/{study_id(base, st.study_name)}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1000)
    # A page that rendered has charts and text; a blank or error page has a few colours.
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200, len(colours)
