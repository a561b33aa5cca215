"""evaluate.py: scripted evaluation of a saved run (`trained_run`, conftest.py), its options and its errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcifar import evaluate
from conftest import REPO, damage_every_data_file, with_devices


def history(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_evaluate_reproduces_the_logged_accuracy(trained_run, prepared, capsys, tmp_path):
    out_json = tmp_path / "eval.json"
    rc = evaluate.main(["--workdir", str(trained_run), "--json", str(out_json), "--data-dir", prepared[0],
                        "--cache-dir", prepared[1]])
    assert rc == 0
    result = json.loads(out_json.read_text())
    last = history(trained_run)[-1]
    assert result["step"] == last["step"] and result["images"] == 50
    assert result["accuracy"] == pytest.approx(last["test_accuracy"])
    assert result["confusion"] == last["test_confusion"]
    assert result["loss"] == pytest.approx(last["test_loss"], rel=1e-6)  # the same evaluation as training's
    out = capsys.readouterr().out
    assert "ConfusionMatrix:" in out and "global correct" in out


def test_evaluate_best_and_step(trained_run, prepared, tmp_path):
    from jaxcifar.run import checkpoint

    steps_before = checkpoint.Checkpointer(trained_run).steps()
    h = history(trained_run)
    best = next(r for r in h if r["test_accuracy"] == max(x["test_accuracy"] for x in h))
    for args, want in ((["--best"], best), (["--step", str(h[0]["step"])], h[0])):
        out = tmp_path / "e.json"
        assert evaluate.main(["--workdir", str(trained_run), "--json", str(out), "--data-dir", prepared[0],
                              "--cache-dir", prepared[1], *args]) == 0
        result = json.loads(out.read_text())
        assert result["step"] == want["step"] and result["accuracy"] == pytest.approx(want["test_accuracy"])
    assert checkpoint.Checkpointer(trained_run).steps() == steps_before  # evaluation never moves checkpoints


def test_evaluate_errors_are_one_line(trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [(["--workdir", str(tmp_path / "absent")], "does not exist"),
             (["--workdir", str(tmp_path / "empty")], "no checkpoints in"),
             (["--workdir", str(trained_run), "--step", "99999"], "no checkpoint at step 99999")]
    for args, message in cases:
        assert evaluate.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0


def test_recomputed_batch_norm_statistics_are_batch_averages_without_dropout():
    import jax
    from jax import lax

    from jaxcifar.nn import models

    model = models.create_model("vgg_bn_drop", width=1 / 16)
    images = np.random.default_rng(0).normal(size=(48, 32, 32, 3)).astype(np.float32)
    variables = model.init({"params": jax.random.key(0)}, images[:1], train=False)
    two = evaluate.recompute_batch_stats(model, variables, images, 2, 16, seed=3)
    order = np.random.default_rng(3).permutation(48)[:32].reshape(2, 16)
    conv = variables["params"]["ConvBNReLU_0"]["Conv_0"]
    first_layer = []
    for rows in order:
        y = lax.conv_general_dilated(images[np.sort(rows)], conv["kernel"], (1, 1), [(1, 1), (1, 1)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
        y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
        first_layer.append((y.mean(0), y.var(0, ddof=1)))
    got = two["batch_stats"]["ConvBNReLU_0"]["TorchBatchNorm_0"]
    np.testing.assert_allclose(got["mean"], np.mean([m for m, _ in first_layer], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], np.mean([v for _, v in first_layer], 0), rtol=1e-4)
    # No random draw enters (dropout is off): the same images give the same statistics.
    again = evaluate.recompute_batch_stats(model, variables, images, 2, 16, seed=3)
    for a, b in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="use at most 3"):
        evaluate.recompute_batch_stats(model, variables, images, 4, 16)


def test_evaluate_with_recomputed_statistics_says_so(trained_run, prepared, capsys, tmp_path):
    out_json = tmp_path / "eval.json"
    assert evaluate.main(["--workdir", str(trained_run), "--recompute-bn-stats", "2", "--json", str(out_json),
                          "--data-dir", prepared[0], "--cache-dir", prepared[1]]) == 0
    result = json.loads(out_json.read_text())
    assert result["recomputed_bn_batches"] == 2 and sum(map(sum, result["confusion"])) == 50
    assert "re-estimated from 2 training batches without dropout" in capsys.readouterr().out
    assert evaluate.main(["--workdir", str(trained_run), "--recompute-bn-stats", "-1"]) == 2


def test_evaluate_on_another_device_count(trained_run, prepared):
    env = dict(os.environ, XLA_FLAGS=with_devices(4))
    r = subprocess.run([sys.executable, "-m", "jaxcifar.evaluate", "--workdir", str(trained_run), "--data-dir",
                        prepared[0], "--cache-dir", prepared[1]], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"accuracy: {history(trained_run)[-1]['test_accuracy']:.2f} %" in r.stdout


def test_evaluate_names_what_to_use_instead_and_checks_its_inputs_first(trained_run, tmp_path, capsys):
    from jaxcifar.run import checkpoint
    workdir = tmp_path / "w"
    shutil.copytree(trained_run, workdir)
    (best,) = checkpoint.Checkpointer(workdir, read_only=True).steps(best=True)
    damage_every_data_file(workdir / "best" / str(best))
    assert evaluate.main(["--workdir", str(workdir), "--best"]) == 2
    err = capsys.readouterr().err
    latest = checkpoint.Checkpointer(workdir, read_only=True).steps()
    assert "no other checkpoint" not in err and f"drop --best to use the latest in checkpoints/, or pass --step with " \
                                                  f"one of {latest}" in err, err
    (tmp_path / "file").write_text("")
    assert evaluate.main(["--workdir", str(tmp_path / "file")]) == 2
    assert "is a file, not a training run's folder" in capsys.readouterr().err
    # an unwritable --json is refused before the evaluation runs
    assert evaluate.main(["--workdir", str(trained_run), "--json", str(tmp_path / "absent" / "e.json")]) == 2
    captured = capsys.readouterr()
    assert "--json" in captured.err and "does not exist" in captured.err and "accuracy" not in captured.out


def test_evaluate_on_an_empty_folder_writes_nothing(tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    assert "no checkpoints in" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_save_rotated_away_while_it_is_read_is_not_damage(trained_run, tmp_path, monkeypatch):
    import shutil

    from jaxcifar.run import checkpoint
    workdir = tmp_path / "w"
    shutil.copytree(trained_run, workdir)
    steps = checkpoint.Checkpointer(workdir, read_only=True).steps()
    real_restore = checkpoint.Checkpointer.restore
    calls = []

    def restore_while_rotated(self, *args, **kwargs):  # the training run beside deletes the save mid-read
        calls.append(kwargs.get("step"))
        if len(calls) == 1:
            shutil.rmtree(workdir / "checkpoints" / str(steps[-1]))
        return real_restore(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore_while_rotated)
    (trained,) = evaluate.load_all_seeds(workdir)
    assert calls == [steps[-1], steps[-2]] and trained.step == steps[-2]  # read again, as the newest there is


def test_best_with_no_best_save_says_what_to_read_instead(trained_run, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(trained_run, workdir)
    shutil.rmtree(workdir / "best")
    (workdir / "best").mkdir()
    assert evaluate.main(["--workdir", str(workdir), "--best"]) == 2
    err = capsys.readouterr().err
    assert "no best checkpoints in" in err and "drop --best to read the latest" in err and "train first" not in err
