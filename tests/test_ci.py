"""CI's script against the README that describes it; the throwaway PostgreSQL server it starts."""

import glob
import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"
POSTGRES_SH = ROOT / "scripts" / "postgres.sh"
# `.ci/run` names the README section that holds its test command in the comment above it.
CITED = re.compile(
    r'^# The test command \(README\.md, "(?P<section>[^"]+)"\):\n(?P<command>.+)$', re.M
)


def readme_sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", (ROOT / "README.md").read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def ci_test_command() -> tuple[str, str]:
    (match,) = CITED.finditer(CI_RUN.read_text())
    return match["section"], match["command"].strip()


def ci_install_command() -> str:
    (line,) = [
        line.strip()
        for line in CI_RUN.read_text().splitlines()
        if "scripts/install " in line and not line.lstrip().startswith("#")
    ]
    return line


def test_the_readme_section_ci_cites_exists():
    section, _ = ci_test_command()
    assert section in readme_sections(), f".ci/run cites README section {section!r}"


def test_the_readme_test_command_is_the_one_ci_runs():
    section, command = ci_test_command()
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"the test command\s+`([^`]+)`", readme)
    assert stated == [command]
    assert f"`{command}`" in readme_sections()[section]


def test_the_readme_install_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"installs\s+with\s+`([^`]*scripts/install[^`]*)`", readme)
    assert [" ".join(s.split()) for s in stated] == [ci_install_command()]


def test_ci_builds_and_removes_only_its_own():
    ci = "\n".join(
        line for line in CI_RUN.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    (venv,) = re.findall(r"YOUR_AI_VENV=(\S+) scripts/install", ci_install_command())
    _, command = ci_test_command()
    assert command.startswith(f"{venv}/bin/python ")
    assert venv != ".venv", "CI must not install into (and remove) a user's .venv"
    assert "pg_dir=$(mktemp -d " in ci
    assert set(re.findall(r"rm -rf ([^\s;&']+)", ci)) <= {venv, '"$pg_dir"'}
    install = (ROOT / "scripts" / "install").read_text()
    assert "venv=${YOUR_AI_VENV:-.venv}" in install
    assert ".venv/" not in install


@pytest.mark.parametrize("script", [".ci/run", "scripts/install", "scripts/postgres.sh"])
def test_the_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def servers_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(data_dir) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def traversable(tmp_path, tmp_path_factory):
    """As root the server runs as the postgres user, which must reach a directory under tmp_path
    (pytest makes its directories 0700): let others through them while the test runs."""
    if os.geteuid() != 0:
        yield
        return
    # pytest's own directory (pytest-of-<user>) and everything below it: with pytest-xdist the
    # base temp is one level deeper (pytest-<n>/popen-gw<k>).
    top = tmp_path_factory.getbasetemp().parent
    if top.name.startswith("pytest-") and not top.name.startswith("pytest-of-"):
        top = top.parent
    chain = [tmp_path, *(p for p in tmp_path.parents if p.is_relative_to(top))]
    modes = {p: p.stat().st_mode for p in chain}
    for p, mode in modes.items():
        p.chmod(mode | stat.S_IXOTH)
    yield
    for p, mode in modes.items():
        p.chmod(stat.S_IMODE(mode))


@pytest.mark.parametrize("given", ["new", "holding a file of its own"])
def test_postgres_start_then_stop_leaves_no_server_and_only_removes_its_own(
    tmp_path, traversable, given
):
    if not glob.glob("/usr/lib/postgresql/*/bin"):
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "beside.txt").write_text("not the server's")
    (outer / "pg.keep").mkdir()
    pg = outer / "pg"
    if given != "new":
        pg.mkdir()
        (pg / "mine.txt").write_text("the user's")
    before = sorted(p.relative_to(outer) for p in outer.rglob("*"))

    def run(action: str) -> str:
        done = subprocess.run(
            ["bash", str(POSTGRES_SH), action, str(pg)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    started = run("start")
    try:
        port = int(re.search(r"@127\.0\.0\.1:(\d+)/", started)[1])
        assert accepts(port)
        assert servers_of(pg / "data")
    finally:
        run("stop")
    assert not servers_of(pg / "data")
    assert not accepts(port)
    assert sorted(p.relative_to(outer) for p in outer.rglob("*")) == before
    assert pg.exists() == (given != "new")
