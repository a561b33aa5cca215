import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcifar.data import cache, fake_data, preprocess
from jaxcifar import errors, train
from jaxcifar.nn import metrics
from jaxcifar.run import plan as plan_lib, trees
from jaxcifar.run.trainer import Trainer
from conftest import REPO, tiny_config


def test_a_few_steps_overfit_a_tiny_batch(prepared):
    c = tiny_config(prepared, batch_size=16, dropout=False, flip="none", width=0.25)
    c.optimizer.learning_rate, c.optimizer.weight_decay = 0.5, 0.0
    trainer = Trainer(c, fake_data.random_preprocessed(16))
    state = trainer.init_state()
    losses = []
    for epoch in range(1, 41):
        state, epoch_metrics, finished = trainer.train_epoch(state, epoch)
        (loss,), (conf,) = trainer.epoch_summary(epoch_metrics)
        assert finished
        losses.append(loss)
    assert losses[-1] < 0.1 * losses[0]
    assert metrics.summarize(conf)["accuracy"] == 100.0
    eval_conf, _ = trainer.score_test_set(state.params, state.batch_stats)
    assert eval_conf.sum() == 16


def test_a_steps_randomness_is_a_function_of_seed_and_step(prepared):
    # One image in every row: each batch holds the same pixels and labels, so the step number can
    # change an update only through the step's flip and dropout draws.
    image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    images = np.broadcast_to(image, (32, 32, 32, 3)).copy()
    labels = np.full(32, 3, np.int32)
    stats = preprocess.NormalizationStats("yuv", (0.0, 0.0), (1.0, 1.0))
    dataset = cache.Preprocessed(images, labels, images, labels, stats, "none")

    trainers = {}

    def update(step, rng_seed=None, **overrides):
        key = tuple(sorted(overrides.items()))
        if key not in trainers:
            trainers[key] = Trainer(tiny_config(prepared, batch_size=16, steps_per_call=1, **overrides), dataset)
        trainer = trainers[key]
        state = trainer.init_state()  # the same parameters and optimizer state every time
        state = state.replace(step=trainer.place(np.full(1, step, np.int32)))
        if rng_seed is not None:
            state = state.replace(key_data=trainer.place(jax.random.key_data(jax.random.key(rng_seed))[None]))
        order = trainer.epoch_order(state.key_data, 1)
        state, _ = trainer.run_steps(state, trainer.zero_metrics(), order, 1)
        return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])

    # No flips, no dropout: nothing random is left, and the step number changes nothing.
    np.testing.assert_array_equal(update(0, flip="none", dropout=False), update(5, flip="none", dropout=False))
    # Each draw alone makes steps differ; the same (seed, step) repeats exactly.
    for random_part in ({"flip": "none"}, {"dropout": False}):
        at_5 = update(5, **random_part)
        np.testing.assert_array_equal(at_5, update(5, **random_part))
        assert not np.array_equal(at_5, update(6, **random_part))
        assert not np.array_equal(at_5, update(5, rng_seed=1, **random_part))


def test_an_epoch_runs_every_full_batch_once_and_drops_the_remainder(prepared):
    c = tiny_config(prepared, batch_size=16)
    trainer = Trainer(c, fake_data.random_preprocessed(100))  # 6 batches of 16, 4 examples left over
    state = trainer.init_state()
    seen = set()
    for epoch in (1, 2, 3):
        state, epoch_metrics, finished = trainer.train_epoch(state, epoch)
        assert finished and int(state.step[0]) == 6 * epoch
        assert trainer.epoch_summary(epoch_metrics)[1].sum() == 96  # every trained image counted once
        order = np.asarray(trainer.epoch_order(state.key_data, epoch))
        assert order.shape == (1, 6, 16) and len(set(order.ravel().tolist())) == 96
        seen |= set(order.ravel().tolist())
    assert len(seen) > 96  # the dropped remainder changes from epoch to epoch


def test_scanned_steps_train_like_unrolled_steps(prepared):
    """step_loop="scan" (one lax.scan per call) is the unrolled program's function."""
    dataset = fake_data.random_preprocessed(48)  # 3 steps of 16: one call each way
    runs = {}
    for loop in ("unroll", "scan"):
        trainer = Trainer(tiny_config(prepared, batch_size=16, steps_per_call=3, step_loop=loop), dataset)
        state = trainer.init_state()
        start = trees.flat_vector(state.params)
        state, epoch_metrics, finished = trainer.train_epoch(state, 1)
        assert finished and int(state.step[0]) == 3
        runs[loop] = (trees.flat_vector(state.params), float(epoch_metrics["loss_sum"][0]))
    (unrolled, loss_u), (scanned, loss_s) = runs["unroll"], runs["scan"]
    # Measured (Sapphire Rapids, native and AVX2): losses identical, parameters 1.1e-6 of the distance
    # travelled apart (the loop body is compiled apart from its neighbours). A skipped, repeated or
    # reordered step moves them by O(1) of it.
    assert abs(loss_s - loss_u) <= 1e-5 * abs(loss_u)
    assert np.linalg.norm(scanned - unrolled) <= 1e-4 * np.linalg.norm(unrolled - start)


def test_several_steps_per_call_train_like_single_steps_and_resume_exactly(prepared):
    dataset = fake_data.random_preprocessed(128)  # 8 steps of 16: calls of 3, 3, 1, 1
    trainers = {}  # one per steps_per_call: the stopped run reuses the uninterrupted run's programs

    def run(steps_per_call, stop_after_first_call=False):
        """(initial params, [(step, params, cumulative loss) after each call], state, epoch summary)."""
        if steps_per_call not in trainers:
            c = tiny_config(prepared, batch_size=16, width=0.25, steps_per_call=steps_per_call)
            trainers[steps_per_call] = Trainer(c, dataset)
        trainer = trainers[steps_per_call]
        state = trainer.init_state()
        start = trees.flat_vector(state.params)
        order = trainer.epoch_order(state.key_data, 1)
        epoch_metrics = trainer.zero_metrics()
        if stop_after_first_call:
            state, epoch_metrics, finished = trainer.train_epoch(state, 1, epoch_metrics, should_stop=lambda boundary: True)
            assert not finished and int(state.step[0]) == 3  # honoured at the first log boundary (step 2 of 2)
            state, epoch_metrics, finished = trainer.train_epoch(state, 1, epoch_metrics)
            assert finished
            return start, None, state, trainer.epoch_summary(epoch_metrics)
        after_calls = []
        for count in plan_lib.call_plan(0, trainer.plan.steps_per_epoch, steps_per_call):
            state, epoch_metrics = trainer.run_steps(state, epoch_metrics, order, count)
            after_calls.append((int(state.step[0]), trees.flat_vector(state.params), float(epoch_metrics["loss_sum"][0])))
        return start, after_calls, state, trainer.epoch_summary(epoch_metrics)

    start, single_calls, _, (_, single_conf) = run(1)
    _, grouped_calls, grouped, (grouped_loss, grouped_conf) = run(3)
    single_at = {step: (params, loss) for step, params, loss in single_calls}
    assert [step for step, _, _ in grouped_calls] == [3, 6, 7, 8]

    # Exact: a run stopped between calls and resumed is the uninterrupted run, bit for bit.
    _, _, resumed, (resumed_loss, resumed_conf) = run(3, stop_after_first_call=True)
    for a, b in zip(jax.tree_util.tree_leaves(grouped), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed_loss == grouped_loss
    np.testing.assert_array_equal(resumed_conf, grouped_conf)

    # One 3-step program against the same 3 steps as single calls: the same arithmetic, fused and
    # scheduled differently, so it differs by rounding alone. Measured ||delta|| / ||distance travelled||
    # 3.4e-8 (AVX-512 and AVX2, 1 or 2 threads); 1e-5 leaves room and still catches a changed step.
    def off_course(step, params):
        reference = single_at[step][0]
        return np.linalg.norm(params - reference) / np.linalg.norm(reference - start)

    step, params, _ = grouped_calls[0]
    assert off_course(step, params) <= 1e-5
    # Over the epoch, rounding differences grow: at batch 16 a near-tie in a max-pool window or a ReLU
    # can route a gradient elsewhere (measured: 9.7e-5 of the distance travelled after 8 steps with 2
    # threads, 1.5e-7 with 1). What must hold is the training itself: the loss accumulated up to every
    # call boundary agrees to 1e-4 relative (measured at most 2.4e-7; one skipped or repeated step
    # changes it by over 1e-2), and the parameters stay within 1e-2 of the distance travelled.
    for step, params, loss in grouped_calls:
        assert abs(loss - single_at[step][1]) <= 1e-4 * abs(single_at[step][1]), step
        assert off_course(step, params) <= 1e-2, step
    # The training confusion counts every image once; a near-tie may move one prediction.
    assert single_conf.sum() == grouped_conf.sum() == 128
    assert np.abs(single_conf - grouped_conf).sum() <= 2


def test_divergence_stops_with_a_clear_message(prepared, tmp_path):
    c = tiny_config(prepared)
    c.optimizer.learning_rate = 1e30
    with pytest.raises(errors.TrainingDiverged, match="loss became nan|loss became inf"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


@pytest.mark.parametrize("override,message", [
    ("--config.model=resnet", "model='resnet'"),
    ("--config.batch_size=0", "batch_size=0 must be a positive integer"),
    ("--config.flip=sideways", "flip='sideways'"),
    ("--config.num_classes=5", "num_classes=5; CIFAR-10 has 10 classes"),
    ("--config.num_classes=11", "num_classes=11; CIFAR-10 has 10 classes"),
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
    assert "==> epoch 1/2 [batch 32, lr 0.5]\n" in r.stdout  # no time yet to tell the run's end from
    assert "==> epoch 2/2 [batch 32, lr 0.5]; 1 epoch to go, run ETA " in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    acc = records[-1]["test_accuracy"]
    best = max(records, key=lambda rec: rec["test_accuracy"])
    assert last.startswith(f"jaxcifar: finished: 2 of 2 epochs, final test accuracy {acc:.2f} % (epoch 2), best "
                           f"{best['test_accuracy']:.2f} % (epoch {best['epoch']}); "), last
    assert last.endswith(f"; report {workdir / 'report.html'}; checkpoints {workdir / 'checkpoints'}"), last


# ---------------------------------------------------------------------------
# Command-line mistakes and finished runs


def _train_cli(args, tmp_path, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "jaxcifar.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"),
                                                PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("case", ["empty workdir", "override without config", "no get_config"])
def test_more_command_line_mistakes_are_one_line_and_write_nothing(tmp_path, case):
    (tmp_path / "noget.py").write_text("from jaxcifar.config import base_config\n\ndef config():\n    return base_config()\n")
    args, expected = {
        "empty workdir": (["--config", str(REPO / "configs/tiny.py"), "--workdir", ""], "--workdir is empty"),
        "override without config": (["--workdir", "w", "--config.data.archive=x.tar.gz"],
                                    "--config.data.archive is given without --config"),
        "no get_config": (["--config", str(tmp_path / "noget.py"), "--workdir", "w"], "defines no get_config()"),
    }[case]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = _train_cli(args, tmp_path, cwd=cwd)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr
    assert list(cwd.iterdir()) == []  # nothing written into the current folder


def test_reading_tools_refuse_an_empty_workdir(tmp_path, capsys, monkeypatch):
    from jaxcifar import evaluate, predict
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--workdir", ""]) == 2
    assert "--workdir is empty" in capsys.readouterr().err
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert predict.main(["--workdir", "", str(tmp_path / "x.png")]) == 2
    assert "--workdir is empty" in capsys.readouterr().err


def test_a_finished_run_asked_for_fewer_epochs_says_so(prepared, tmp_path, capsys):
    train.train_and_evaluate(tiny_config(prepared, num_epochs=2, **{"optimizer.schedule": "torch_step"}), str(tmp_path))
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(prepared, num_epochs=1, **{"optimizer.schedule": "torch_step"}), str(tmp_path))
    out = capsys.readouterr().out
    assert "nothing to train: the run in" in out and "already trained 2 epochs, past num_epochs=1" in out


def test_stopping_is_asked_after_every_call_and_boundaries_are_marked(prepared):
    c = tiny_config(prepared, log_every_steps=3, steps_per_call=1)  # 6 steps an epoch: boundaries after 3 and 6
    trainer = Trainer(c, fake_data.random_preprocessed(192))
    asked = []
    state, _, finished = trainer.train_epoch(trainer.init_state(), 1, should_stop=lambda b: asked.append(b) or False)
    # After steps 1-5 (the epoch's end is not a place to stop mid-epoch); only step 3's answer may need all
    # processes, which ask there together.
    assert finished and asked == [False, False, True, False, False]
    assert trainer.dispatched_step == 6


def test_the_progress_bar_hears_from_the_loop_between_log_boundaries(prepared, monkeypatch):
    from jaxcifar.run import trainer as trainer_lib

    c = tiny_config(prepared, log_every_steps=1000, steps_per_call=1)  # no log boundary before the epoch's end
    trainer = Trainer(c, fake_data.random_preprocessed(192))
    monkeypatch.setattr(trainer_lib, "PROGRESS_EVERY_S", 0.0)  # due after every call
    shown = []
    trainer.train_epoch(trainer.init_state(), 1, progress=lambda done, loss: shown.append(done))
    assert shown == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(trainer_lib, "PROGRESS_EVERY_S", 3600.0)
    shown.clear()
    trainer.train_epoch(trainer.init_state(), 1, progress=lambda done, loss: shown.append(done))
    assert shown == [6]  # boundaries only


@pytest.mark.parametrize("where", ["config", "environment"])
def test_none_turns_the_compile_cache_off_from_the_config_or_the_environment(where, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a "none" taken for a path would be created here
    monkeypatch.setenv("JAXCIFAR_COMPILE_CACHE", "none" if where == "environment" else str(tmp_path / "xla"))
    before = jax.config.jax_compilation_cache_dir
    train.enable_compile_cache("none" if where == "config" else "")
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "none").exists()
    monkeypatch.setenv("JAXCIFAR_COMPILE_CACHE", str(tmp_path / "xla"))
    try:
        train.enable_compile_cache("")  # and a path is still taken
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
