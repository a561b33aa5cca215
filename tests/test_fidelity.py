"""jaxcifar.fidelity (scripts/fidelity.py's command): a run cut short resumes from its workdir to the rows of an uninterrupted run (both sides),
a workdir of another run is refused, several seeds run from one command, and G is summarised per group."""

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, import_torch
from jaxcifar.fidelity import bn_shift, command, tables


def _argv(prepared, side, out, workdir, *extra):
    data_dir, cache_dir, _, md5_file = prepared
    return ["--side", side, "--config", str(REPO / "configs/tiny.py"), "--width", "0.0625", "--epochs", "2",
            "--train-eval-images", "40", "--recompute-bn-batches", "2", "--threads", "2",
            "--set", f"data.data_dir={data_dir}", "--set", f"data.cache_dir={cache_dir}",
            "--set", f"data.md5_file={md5_file}", "--out", str(out), "--workdir", str(workdir), *extra]


def _rows(path):
    rows = json.loads(Path(path).read_text())["epochs"]
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in rows]


@pytest.mark.parametrize("side", ["jax", "torch"])
def test_a_run_stopped_and_resumed_matches_an_uninterrupted_one(side, prepared, tmp_path, capsys):
    if side == "torch":
        import_torch()
    whole = tmp_path / "whole.json"
    assert command.main(_argv(prepared, side, whole, tmp_path / "w-whole")) == 0
    last_line = capsys.readouterr().out.splitlines()[-1]  # the run ends on one line: its status, accuracy and file
    accuracy = json.loads(whole.read_text())["epochs"][-1]["test_accuracy"]
    assert last_line.startswith(f"[{side} s0 ") and last_line.endswith(f"at epoch 2; {whole}")
    assert f"] complete: test accuracy {accuracy:.2f} % (" in last_line
    split = tmp_path / "split.json"
    assert command.main(_argv(prepared, side, split, tmp_path / "w-split", "--stop-after", "1")) == 0
    assert [r["epoch"] for r in _rows(split)] == [1]
    assert (f"] stopped after epoch 1 of 2 (the same command resumes from {tmp_path / 'w-split'})"
            in capsys.readouterr().out.splitlines()[-1])
    # a row written after the last save (a kill between the two) is replaced by the resumed run's
    stale = json.loads(split.read_text())
    stale["epochs"].append(dict(stale["epochs"][0], epoch=2, train_loss=-1.0))
    split.write_text(json.dumps(stale))
    assert command.main(_argv(prepared, side, split, tmp_path / "w-split")) == 0
    want = _rows(whole)
    assert [r["epoch"] for r in want] == [1, 2]
    assert "test_accuracy_recomputed_bn" in want[-1] and all("gap" in r for r in want)
    assert _rows(split) == want  # bit-identical: every loss and accuracy equal

    # bn_shift reads the run's last state into the port's network: the eval-mode accuracy recorded, exactly where
    # the port recorded it, within one of the 50 test images where XLA did (a near-tie may round the other way)
    measured = tmp_path / "bn-shift.json"
    assert bn_shift.main([str(whole), "--workdir", str(tmp_path / "w-whole"), "--window", "1-2",
                          "--out", str(measured)]) == 0
    run, = json.loads(measured.read_text())["runs"]
    assert abs(run["test_accuracy"] - want[-1]["test_accuracy"]) <= (0 if side == "torch" else 2.0)
    assert run["side"] == side
    assert len(run["second_moment"]) == len(run["variance_ratio"]) == 14 and len(run["weight_norm"]) == 15

    # the same workdir under another seed is another run: refused, nothing written
    other = tmp_path / "other.json"
    with pytest.raises(SystemExit, match="holds the checkpoint of another run .*seed"):
        command.main(_argv(prepared, side, other, tmp_path / "w-whole", "--seed", "1"))
    assert not other.exists()


def test_seeds_run_one_process_each_and_gaps_summarise_them(prepared, tmp_path, monkeypatch, capsys):
    import_torch()  # the runner is the same for either side; the port's runs start fastest
    out = tmp_path / "torch-s{seed}.json"
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(tmp_path / "cache"))  # the runs' default workdirs
    argv = _argv(prepared, "torch", out, tmp_path / "unused", "--seeds", "0-1", "--jobs", "2")
    argv = command.drop_options(argv, ("--workdir",)) + ["--stop-after", "1"]
    assert command.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"fidelity: 2 of 2 runs ran without error ({out})"
    runs = [json.loads((tmp_path / f"torch-s{k}.json").read_text()) for k in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["epochs"][0]["train_loss"] != runs[1]["epochs"][0]["train_loss"]  # different seeds
    assert (tmp_path / "cache" / "fidelity" / "torch-s1" / "state.npz").is_file()

    paths = [str(tmp_path / f"torch-s{k}.json") for k in (0, 1)]
    summary = tables.gap_summary(paths, (1, 1))
    gaps = [runs[k]["epochs"][0]["train_accuracy"] - runs[k]["epochs"][0]["test_accuracy"] for k in (0, 1)]
    mean = sum(gaps) / 2
    se = abs(gaps[0] - gaps[1]) / 2  # two values: stdev / sqrt(2) = |a - b| / 2
    row = summary.splitlines()[-1]
    assert f"{gaps[0]:.1f} / {gaps[1]:.1f}" in row and f"{mean:.2f} ± {se:.2f}" in row
    assert "1 of 2" in row  # the runs stopped before their last epoch
    assert len(tables.gap_summary(paths, (2, 2)).splitlines()) == 2  # no run has reached epoch 2


def test_tables_name_a_file_that_is_not_a_run_and_a_bad_window(tmp_path):
    run = tmp_path / "jax-s0.json"
    run.write_text(json.dumps({"side": "jax", "width": 0.25, "variant": "recipe", "seed": 0, "num_epochs": 2,
                               "epochs": [{"epoch": e, "train_loss": 1.0, "train_accuracy": 60.0, "test_accuracy": 50.0,
                                           "train_images_eval_accuracy": 55.0} for e in (1, 2)]}))
    (tmp_path / "bench.json").write_text('{"rows": []}')
    (tmp_path / "cut.json").write_text('{"side": "ja')
    for option, files, message in (
            ("--table", ["missing.json"], "missing.json cannot be read as JSON .No such file"),
            ("--gaps", ["cut.json"], "cut.json cannot be read as JSON"),
            ("--table", ["bench.json"], "bench.json is not a fidelity run's JSON .it lacks side, width, variant"),
    ):
        with pytest.raises(SystemExit, match=f"^error: {tmp_path}/{message}.*give the files that scripts/fidelity.py"):
            command.main([option, str(run), *(str(tmp_path / f) for f in files)])
    for window in ("5-x", "3-2", "0"):
        with pytest.raises(SystemExit, match=f"^error: --window {window}: "):
            command.main(["--gaps", str(run), "--window", window])
    assert command.main(["--gaps", str(run), "--window", "1-2"]) == 0  # the good file alone
    with pytest.raises(SystemExit, match=f"^error: {run} is not a fidelity run's JSON .it lacks config."):
        bn_shift.main([str(run)])  # it rebuilds the run's dataset from its config, which this file lacks


def test_a_bad_recipe_or_override_is_one_line_before_any_data_loads(tmp_path, monkeypatch):
    out, workdir = tmp_path / "run.json", tmp_path / "w"
    base = ["--side", "torch", "--out", str(out), "--workdir", str(workdir), "--set", "data.data_dir=/nonexistent"]
    for extra, message in (
            (["--config", str(tmp_path / "nope.py")], "--config .*nope.py: no such file; give a recipe"),
            (["--config", str(REPO / "README.md")], "--config .*README.md: is not a Python file"),
            (["--width", "0"], "bad config: width=0.0 must be from 0.015625"),
            (["--set", "conv_impl"], "--set conv_impl: give FIELD=VALUE"),
            (["--set", "nogroup.x=1"], "--set nogroup.x=1: the config has no field 'nogroup.x'"),
            (["--set", "width.x=1"], "--set width.x=1: the config has no field 'width.x'"),
            (["--set", "batch_size=abc"], "--set batch_size=abc: batch_size is of type int and 'abc' is not"),
            (["--set", "batch_size=0"], "bad config: batch_size=0 must be a positive integer"),
    ):
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            command.main(base + extra)
    assert not out.exists() and not workdir.exists()
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch, an optional extra, were not installed
    with pytest.raises(SystemExit, match=r"^error: the PyTorch port needs PyTorch: pip install -e '\.\[torch\]'"):
        command.main(base)
    monkeypatch.undo()
    assert not out.exists() and not workdir.exists()
    # replica_drift takes its control change through the same checks, under its own option's name
    from jaxcifar.fidelity import replica_drift

    for extra, message in ((["--control", "bogus=1"], "--control bogus=1: the config has no field 'bogus'"),
                           (["--seeds", "a"], "--seeds a: give seeds as 2,3"), (["--steps", "0"], "--steps 0")):
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            replica_drift.main(["--out", str(out), "--threads", "2", *extra])
    assert not out.exists()


def test_seeds_need_a_placeholder_in_out():
    with pytest.raises(SystemExit, match=r"\{seed\}"):
        command.main(["--side", "jax", "--seeds", "0-1", "--out", "x.json"])


def test_parse_seeds():
    assert command.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]


def test_gaps_compare_the_sides_in_standard_errors(tmp_path):
    def run(side, seed, train_acc, test_acc, epochs=3, variant="recipe"):
        path = tmp_path / f"{side}-{variant}-s{seed}.json"
        path.write_text(json.dumps({"side": side, "variant": variant, "seed": seed, "width": 0.25, "num_epochs": epochs,
                                    "epochs": [{"epoch": e, "train_accuracy": train_acc + e, "test_accuracy": test_acc}
                                               for e in range(1, epochs + 1)]}))
        return str(path)

    # G over epochs 2-3 is train_acc + 2.5 - test_acc; the last test accuracy is test_acc
    jax = [run("jax", 0, 60, 50), run("jax", 1, 62, 54), run("jax", 2, 64, 52)]  # G 12.5, 10.5, 14.5; test 50, 54, 52
    torch = [run("torch", 0, 60, 55), run("torch", 1, 60, 57)]  # G 7.5, 5.5; test 55, 57
    lone = [run("torch", 0, 60, 55, variant="pool_grad=xla"), run("jax", 0, 60, 55, variant="pool_grad=xla")]
    table = tables.gap_summary(jax + torch + lone, (2, 3))
    rows = table.split("\n\n")
    assert "| jax | 0.25 | recipe | 3 | 3 | 12.5 / 10.5 / 14.5 | 12.50 ± 1.15 | 52.00 ± 1.15 |" in rows[0]
    assert "| torch | 0.25 | recipe | 3 | 2 | 7.5 / 5.5 | 6.50 ± 1.00 | 56.00 ± 1.00 |" in rows[0]
    # G: 12.5 - 6.5 = 6.0, s.e. sqrt(4/3 + 1) = 1.53 -> 3.9 s.e.; test: 52 - 56 = -4.0 -> -2.6 s.e.
    assert rows[1].splitlines()[2:] == [
        "| 0.25 | recipe | 3 | 3 / 2 | +6.00 ± 1.53 | +3.9 | -4.00 ± 1.53 | -2.6 | G, test accuracy |"]
    assert "\n\n" not in tables.gap_summary(jax + lone, (2, 3))  # no side to compare with: no second table
    # torch seed 2, G 12.5, test 56: G 12.5 - 8.5 = 4.0, s.e. sqrt(4/3 + 13/3) = 2.38 -> 1.7 s.e., within the
    # criterion; test 52 - 56 = -4.0, s.e. sqrt(4/3 + 1/3) = 1.29 -> -3.1 s.e., beyond it
    one = tables.gap_summary(jax + torch + [run("torch", 2, 66, 56)], (2, 3)).split("\n\n")[1]
    assert one.splitlines()[2].endswith("| +4.00 ± 2.38 | +1.7 | -4.00 ± 1.29 | -3.1 | test accuracy |")


def test_whole_schedule_runs_compare_their_final_accuracy_within_a_point(tmp_path):
    def run(side, seed, test, recomputed=None, done=4, width=0.5):
        last = {"epoch": done, "test_accuracy": test}
        if recomputed:
            last["test_accuracy_recomputed_bn"] = recomputed
        path = tmp_path / f"{side}-w{width}-s{seed}.json"
        path.write_text(json.dumps({"side": side, "variant": "recipe", "seed": seed, "width": width, "num_epochs": 4,
                                    "epochs": [{"epoch": e, "test_accuracy": 0.0} for e in range(1, done)] + [last]}))
        return str(path)

    paths = [run("jax", 0, 87.3, 88.8), run("jax", 1, 86.1, 88.0), run("torch", 0, 86.9, 88.4),
             run("torch", 1, 80.0, done=3), run("jax", 0, 60.0, width=0.25)]  # unfinished; no torch at 0.25
    rows = tables.final_accuracy_comparison(paths, 4).splitlines()
    # jax 86.7 (two seeds) - torch 86.9 (one finished) = -0.2; re-estimated 88.4 - 88.4 = 0.0
    assert rows[2:] == ["| 0.5 | recipe | 4 | 2 / 1 | 86.70 | 86.90 | -0.20 | +0.00 | no |"]
    far = tables.final_accuracy_comparison(paths[:2] + [run("torch", 0, 85.5)], 4).splitlines()
    assert far[2:] == ["| 0.5 | recipe | 4 | 2 / 1 | 86.70 | 85.50 | +1.20 |  | test |"]  # no torch re-estimate
    assert tables.final_accuracy_comparison(paths, 10) == ""  # no run of that schedule


def test_bn_shift_sees_the_mismatch_it_is_given():
    import numpy as np

    torch = import_torch()
    from jaxcifar.fidelity import torch_port
    torch.manual_seed(0)
    model = torch_port.build_model("vgg_bn_drop", 0.0625).eval()
    images = np.random.default_rng(0).standard_normal((64, 32, 32, 3)).astype(np.float32)
    labels = np.zeros(64, np.int64)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for i, bn in enumerate(bns):  # in order: each layer's running statistics made what its input is
            layers, _ = bn_shift.layer_moments(model, images, labels)
            bn.running_mean.copy_(torch.from_numpy(layers[i]["mean"]))
            bn.running_var.copy_(torch.from_numpy(layers[i]["var"]))
    layers = bn_shift.layer_moments(model, images, labels)[0]
    matched = bn_shift.shift_summary(layers)
    assert np.allclose(matched["variance_ratio"], 1, rtol=1e-4)
    # what is left is eps: var / (var + eps) per channel
    left = [np.log(m["var"] / (m["var"] + m["eps"])) for m in layers]
    assert np.allclose(matched["second_moment"], [np.exp(v.mean()) for v in left], rtol=1e-4)
    with torch.no_grad():
        bns[5].running_var.mul_(2.0)
    shifted = bn_shift.shift_summary(bn_shift.layer_moments(model, images, labels)[0])
    assert shifted["variance_ratio"][:5] == matched["variance_ratio"][:5]  # the layers before it see nothing new
    assert shifted["variance_ratio"][5] == pytest.approx(matched["variance_ratio"][5] / 2, rel=1e-4)
    var, eps = layers[5]["var"], layers[5]["eps"]
    assert shifted["rms_log_second_moment"][5] == pytest.approx(np.sqrt(np.mean(np.log(var / (2 * var + eps)) ** 2)),
                                                                rel=1e-4)


def test_bn_shift_findings_state_the_correlations_and_count_the_differences_beyond_two_se():
    def run(side, rms, test, gap, second_moment):  # one BatchNorm layer, one weight
        return {"side": side, "rms_log_second_moment": [rms], "test_accuracy": test, "gap": gap,
                "second_moment": [second_moment], "weight_norm": [5.0]}

    # test = 70 - 50 rms and G = 50 rms - 5 over the four runs: r = -1 and +1
    runs = [run("jax", 0.2, 60, 5, 0.6), run("jax", 0.4, 50, 15, 0.8),
            run("torch", 0.3, 55, 10, 0.95), run("torch", 0.5, 45, 20, 0.95)]
    text = bn_shift.findings(runs)
    assert "Over the 4 runs, either side: correlation of the mean channel-by-channel shift with the eval test " \
           "accuracy r = -1.00, with G r = +1.00." in text
    # second moment: -0.25 / 0.10 = -2.5 s.e. (beyond); rms log: -0.10 / 0.14 = -0.7 s.e.; the weight norms have
    # no spread, so no standard error: two differences, one beyond, 2 x 4.55 % = 0.1 expected by chance
    assert "Per-layer differences jax - torch beyond 2 standard errors: 1 of 2;" in text
    assert "about 0.1 there by chance" in text
    assert "per-layer" not in bn_shift.findings(runs[:2])  # one side: nothing to compare


@pytest.mark.parametrize("flags,message", [
    (["--train-eval-images", "0"], "--train-eval-images 0 must be at least 1"),
    (["--recompute-bn-batches", "0"], "--recompute-bn-batches 0 must be at least 1"),
    (["--recompute-at", "x"], "--recompute-at x: give 'last', 'all' or epochs such as 1,5,10"),
    (["--recompute-at", "7", "--epochs", "5"], "--recompute-at 7: every epoch must be from 1 to --epochs 5"),
    (["--seeds", "0-x"], "--seeds 0-x: give seeds as 0-7 or 0,2,5"),
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--stop-after", "0"], "--stop-after 0 must be at least 1"),
])
def test_run_flags_that_would_fail_mid_run_or_train_nothing_are_refused_first(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        command.main(["--side", "jax", "--out", str(tmp_path / "x.json"), *flags])
    assert not (tmp_path / "x.json").exists()


def test_a_save_of_another_tool_or_another_run_is_refused_by_name(tmp_path):
    from jaxcifar.run import resume
    from jaxcifar.errors import CheckpointError

    fidelity_run = {"tool": "fidelity", "side": "jax", "seed": 0}
    resume.check_identity(fidelity_run, dict(fidelity_run), tmp_path)  # its own save: accepted
    resume.check_identity(None, None, tmp_path)  # a training run's own
    with pytest.raises(CheckpointError, match="holds a `python -m jaxcifar.train` run's checkpoints"):
        resume.check_identity(None, fidelity_run, tmp_path)
    with pytest.raises(CheckpointError, match="holds a fidelity run's checkpoints"):
        resume.check_identity(fidelity_run, None, tmp_path)
    with pytest.raises(CheckpointError, match=r"another run \(differs in seed, side\)"):
        resume.check_identity(fidelity_run, dict(fidelity_run, seed=1, side="torch"), tmp_path)


def test_the_script_refuses_a_bad_flag_with_one_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "scripts/fidelity.py"), "--side", "torch", "--out",
                        str(tmp_path / "x.json"), "--epochs", "0"], capture_output=True, text=True, cwd=REPO)
    assert (r.returncode, r.stderr.strip(), r.stdout) == (2, "error: --epochs 0 must be at least 1", "")


def test_a_result_that_cannot_be_written_is_one_error_naming_it(tmp_path):
    from jaxcifar import errors

    out = tmp_path / "run.json"
    write = command.result_writer({"side": "jax"}, out, "jax s0")
    write([], None)
    assert json.loads(out.read_text()) == {"side": "jax", "epochs": []}
    blocked = tmp_path / "blocked.json"
    blocked.mkdir()  # a folder where the file should go: the write fails as it is put in place
    with pytest.raises(errors.JaxcifarError, match=f"^is a directory while writing {blocked}; .*, then run the same "
                                                   "command: it resumes from the last saved epoch$"):
        command.result_writer({"side": "jax"}, blocked, "jax s0")([{"epoch": 1}], None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.json", "run.json"]  # no temporary file left
