"""The Hydra job's log holds what the console showed; a refused command leaves no run dir."""

import io

from your_ai import joblog


def test_the_log_gets_each_line_as_the_console_finally_showed_it():
    console, log = io.StringIO(), io.StringIO()
    tee = joblog.Tee(console, log)
    # A progress bar redrawn with carriage returns, cleared for a line, then drawn once more.
    drawn = ("\rtrain 1/5", "\rtrain 2/5", "\r         \r", "step 2: loss 5.7\n", "\rtrain 5/5")
    for text in drawn:
        tee.write(text)
    assert log.getvalue() == "step 2: loss 5.7\n"
    tee.end()
    assert log.getvalue() == "step 2: loss 5.7\ntrain 5/5\n"
    assert console.getvalue().endswith("step 2: loss 5.7\n\rtrain 5/5")
    assert tee.isatty() is False  # the console answers for itself (tqdm asks it)


def job(run_dir, fresh=True):
    return joblog.Job(run_dir, run_dir / "train.log", ".hydra", fresh)


def test_only_a_run_directory_holding_nothing_but_hydras_files_is_removed(tmp_path):
    refused = tmp_path / "refused"
    (refused / ".hydra").mkdir(parents=True)
    (refused / ".hydra" / "config.yaml").write_text("{}\n")
    (refused / "train.log").write_text("error: training.batch_size=0 must be >= 1\n")
    joblog.remove_if_unused(job(refused))
    assert not refused.exists()

    holding = tmp_path / "resumed"  # a run in it: kept
    (holding / ".hydra").mkdir(parents=True)
    (holding / "checkpoints").mkdir()
    joblog.remove_if_unused(job(holding))
    assert (holding / "checkpoints").is_dir()

    earlier = tmp_path / "earlier"  # its log was not empty as the job began: an earlier run's
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / "train.log").write_text("your_ai train | ...\n")
    joblog.remove_if_unused(job(earlier, fresh=False))
    assert (earlier / "train.log").exists()
