"""The run's progress lines: the ETA leaves out the epoch that paid this process's compilation."""

import re

from jaxcifar.run import runlog


def eta_seconds(line: str) -> float:
    match = re.search(r"run ETA ([\d.]+) (s|min)", line)
    assert match, line
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_eta_leaves_out_the_compiling_epoch_once_a_later_one_has_a_time():
    history = [{"epoch_time_s": 59.0}, {"epoch_time_s": 6.8}]
    assert eta_seconds(runlog.run_eta(history, 10, compiled_in=0)) == 68
    # Without knowing which epoch compiled, the mean of the last epochs counts it (the old, pessimistic ETA).
    assert eta_seconds(runlog.run_eta(history, 10)) > 300


def test_eta_uses_the_compiling_epoch_while_it_is_the_only_one():
    assert eta_seconds(runlog.run_eta([{"epoch_time_s": 59.0}], 1, compiled_in=0)) == 59


def test_eta_after_a_resume_keeps_the_epochs_of_earlier_processes():
    history = [{"epoch_time_s": 7.0}, {"epoch_time_s": 7.0}, {"epoch_time_s": 60.0}, {"epoch_time_s": 7.0}]
    assert eta_seconds(runlog.run_eta(history, 2, compiled_in=2)) == 14
    assert runlog.run_eta(history, 0, compiled_in=2) == ""


def test_a_run_that_did_not_finish_says_what_its_workdir_has_saved(tmp_path):
    import json

    records = [{"epoch": e, "step": 6 * e, "test_accuracy": 10.0 * e} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = runlog.RunSummary(tmp_path, 6)
    summary.follow(list(records))
    assert "; saved: nothing;" in summary.line("failed")  # no checkpoint is complete
    for step in (6, 12):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "18.orbax-checkpoint-tmp-1").mkdir()  # a save not finished: not counted
    line = summary.line("stopped by SIGINT at step 18, saved (the same command resumes)")
    assert ": 3 of 6 epochs, last test accuracy 30.00 % (epoch 3)" in line and "; saved: epoch 2 (step 12);" in line
    (tmp_path / "checkpoints" / "14").mkdir()
    assert "; saved: step 14, during epoch 3;" in summary.line("failed")
    finished = summary.line("finished")
    assert "final test accuracy" in finished and "saved:" not in finished


def test_the_summary_is_said_over_a_metrics_file_a_full_disk_cut_short(tmp_path):
    import json

    (tmp_path / "checkpoints" / "12").mkdir(parents=True)
    whole = json.dumps({"epoch": 2, "step": 12, "test_accuracy": 20.0})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 6}) + "\n" + whole + "\n" + whole[:30])
    assert runlog.saved_in(tmp_path) == "epoch 2 (step 12)"
