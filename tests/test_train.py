import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcifar import data, metrics, preprocess, train

REPO = Path(__file__).resolve().parents[1]


def load_config_file(path):
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(prepared, **overrides):
    """configs/tiny.py on the prepared fake dataset, 1 epoch unless overridden."""
    data_dir, cache_dir, _ = prepared
    c = load_config_file(REPO / "configs/tiny.py")
    c.num_epochs, c.log_every_steps = 1, 2
    c.data.data_dir, c.data.cache_dir = data_dir, cache_dir
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def small_dataset(n=16):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    labels = (np.arange(n) % 10).astype(np.int32)
    stats = preprocess.NormalizationStats("yuv", (0.0, 0.0), (1.0, 1.0))
    return data.Preprocessed(images, labels, images, labels, stats, "none")


def test_a_few_steps_overfit_a_tiny_batch(prepared):
    c = tiny_config(prepared, batch_size=16, dropout=False, flip="none", width=0.25)
    c.optimizer.learning_rate, c.optimizer.weight_decay = 0.5, 0.0
    trainer = train.Trainer(c, small_dataset(16))
    state = trainer.init_state()
    losses = []
    for epoch in range(1, 41):
        state, acc, finished = trainer.train_epoch(state, epoch)
        loss, conf = trainer.epoch_summary(acc)
        assert finished
        losses.append(loss)
    assert losses[-1] < 0.1 * losses[0]
    assert metrics.summarize(conf)["accuracy"] == 100.0
    eval_conf, _ = trainer.evaluate(state.params, state.batch_stats)
    assert eval_conf.sum() == 16


def test_step_randomness_depends_only_on_seed_and_step(prepared):
    c = tiny_config(prepared)
    trainer = train.Trainer(c, small_dataset(64))
    s = trainer.init_state()
    k1 = train.step_keys(s)
    k2 = train.step_keys(trainer.init_state())
    np.testing.assert_array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    k3 = train.step_keys(s.replace(step=s.step + 1))
    assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k3))


def test_call_plan_groups_steps_by_their_place_in_the_epoch():
    assert train.call_plan(0, 10, 4) == [4, 4, 1, 1]
    assert train.call_plan(4, 10, 4) == [4, 1, 1]  # a resume at a call boundary continues the same grouping
    assert train.call_plan(5, 10, 4) == [1, 1, 1, 1, 1]
    assert train.call_plan(2, 12, 4) == [1, 1, 4, 4]
    assert train.call_plan(0, 5, 1) == [1] * 5
    assert train.call_plan(7, 7, 4) == []


def test_several_steps_per_call_train_like_single_steps_and_resume_exactly(prepared):
    dataset = small_dataset(128)  # 8 steps of 16: calls of 3, 3, 1, 1

    def run(steps_per_call, stop_after_first_call=False):
        c = tiny_config(prepared, batch_size=16, width=0.25, steps_per_call=steps_per_call)
        trainer = train.Trainer(c, dataset)
        state, acc = trainer.init_state(), None
        calls = []
        if stop_after_first_call:
            state, acc, finished = trainer.train_epoch(state, 1, should_stop=lambda: True)
            assert not finished
            calls.append(int(state.step))
        state, acc, finished = trainer.train_epoch(state, 1, acc)
        assert finished and int(state.step) == 8
        return state, trainer.epoch_summary(acc), calls

    single, (single_loss, single_conf), _ = run(1)
    grouped, (grouped_loss, grouped_conf), _ = run(3)
    for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(grouped.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert abs(single_loss - grouped_loss) <= 1e-4 * abs(single_loss)
    np.testing.assert_array_equal(single_conf, grouped_conf)
    resumed, (resumed_loss, _), calls = run(3, stop_after_first_call=True)
    assert calls == [3]  # the stop flag is honoured between calls
    for a, b in zip(jax.tree_util.tree_leaves(grouped), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed_loss == grouped_loss


def test_divergence_stops_with_a_clear_message(prepared, tmp_path):
    c = tiny_config(prepared)
    c.optimizer.learning_rate = 1e30
    with pytest.raises(train.TrainingDiverged, match="loss became nan|loss became inf"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


@pytest.mark.parametrize("override,message", [
    ("--config.model=resnet", "model='resnet'"),
    ("--config.batch_size=0", "batch_size=0 must be a positive integer"),
    ("--config.flip=sideways", "flip='sideways'"),
])
def test_cli_rejects_bad_config_before_compiling(tmp_path, override, message):
    r = subprocess.run([sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"),
                        "--workdir", str(tmp_path / "w"), override], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_tiny_config_runs_end_to_end_through_the_cli(tmp_path, fake_archive):
    archive, md5_file = fake_archive
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), JAXCIFAR_CACHE_DIR=str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "jaxcifar.train", "--config", str(REPO / "configs/tiny.py"),
                        "--workdir", str(workdir), f"--config.data.archive={archive}",
                        f"--config.data.md5_file={md5_file}"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in records] == [1, 2]
    for rec in records:
        assert np.isfinite(rec["train_loss"]) and 0 <= rec["test_accuracy"] <= 100
        assert sum(map(sum, rec["test_confusion"])) == 50  # every test image, once
        assert rec["train_images_per_s"] > 0
    log = (workdir / "log.txt").read_text()
    assert "ConfusionMatrix:" in log and "average rowUcol correct (VOC measure)" in log and "global correct" in log
    assert "Train accuracy" in log and "Test accuracy" in log
    csv = (workdir / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,step,learning_rate") and len(csv) == 3
