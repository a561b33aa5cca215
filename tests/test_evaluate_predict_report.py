import html.parser
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcifar import data, evaluate, predict, report, train
from test_train import REPO, tiny_config, with_devices
from test_reliability import png_header


@pytest.fixture(scope="module")
def trained_run(prepared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train.train_and_evaluate(tiny_config(prepared, num_epochs=3), str(workdir))
    return workdir


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
    from jaxcifar import checkpoint

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

    from jaxcifar import models

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


def test_predict_files_of_any_size_and_a_non_image(trained_run, prepared, tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, fmt) in enumerate([((32, 32), "PNG"), ((50, 70), "JPEG"), ((300, 200), "PNG"), ((8, 8), "JPEG")]):
        p = tmp_path / f"img{i}.{fmt.lower()}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p, format=fmt)
        paths.append(str(p))
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(gray)
    paths.append(str(gray))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)  # Pillow's decompression-bomb limit: refused, not fatal
    rc = predict.main(["--workdir", str(trained_run), "--json", *paths, str(bad), str(bomb)])
    captured = capsys.readouterr()
    assert rc == 1
    assert f"error: {bad}: not an image Pillow can read" in captured.err
    assert f"error: {bomb}: refused: Image size (400000000 pixels) exceeds limit" in captured.err
    assert "Traceback" not in captured.err
    out = json.loads(captured.out)
    assert set(out["probabilities"]) == set(paths) and list(out["errors"]) == [str(bad), str(bomb)]
    for probs in out["probabilities"].values():
        assert list(probs) == list(data.CLASS_NAMES) and sum(probs.values()) == pytest.approx(1.0)


def test_predict_agrees_with_the_dataset_pipeline(trained_run, prepared, tmp_path):
    raw = data.load_uint8(prepared[0])
    image = raw["test_images"][3]
    path = tmp_path / "test3.png"
    Image.fromarray(image).save(path)
    trained = evaluate.load_trained(trained_run)
    results, errors = predict.classify(trained, [str(path)])
    cached = data.load_preprocessed(prepared[0], prepared[1], md5s=prepared[2], log=lambda m: None)
    idx = next(i for i in range(len(raw["test_images"])) if np.array_equal(raw["test_images"][i], image))
    want = predict.softmax(evaluate.predict_logits(trained, cached.test_images[idx:idx + 1], 1).astype(np.float64))[0]
    np.testing.assert_allclose(list(results[str(path)].values()), want, rtol=1e-4, atol=1e-6)


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.title, self._in_title = [], [], "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_title = tag == "title"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, d):
        if self._in_title:
            self.title += d

    def handle_endtag(self, tag):
        self._in_title = False


def test_report_is_self_contained_html_with_a_decodable_plot(trained_run):
    page = (trained_run / "report.html").read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.title.endswith("epoch 3") and "table" in parser.tags and "pre" in parser.tags
    (src,) = parser.images
    assert src.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert img.format == "PNG" and img.size[0] > 300
    assert "ConfusionMatrix:" in page and "learningRate" in page and "total" in page and "parameters" in page
    assert Image.open(trained_run / "accuracy.png").format == "PNG"
    assert "http" not in page.split("<body>")[1]  # nothing to fetch: opens offline


def test_report_escapes_text_and_is_replaced_atomically(trained_run, tmp_path):
    h = history(trained_run)
    cfg = {"model": "<script>alert(1)</script>", "data": {"archive": "/a & b/<x>.tar.gz"}}
    target = tmp_path / "report.html"
    target.write_text("old")
    inode = target.stat().st_ino
    report.write_report(tmp_path, h, cfg, {"learningRate": 1.0}, "layer <b>", data.CLASS_NAMES)
    page = target.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "/a &amp; b/&lt;x&gt;.tar.gz" in page
    assert "layer &lt;b&gt;" in page
    assert target.stat().st_ino != inode  # a new file renamed over the old one, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "report.html"]


def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("JAXCIFAR_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (JAXCIFAR_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium not installed (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1200", "--enable-logging=stderr",
                        f"--screenshot={shot}", (trained_run / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "Not allowed to load" not in r.stderr
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and the plot, not a blank page


def test_tensorboard_reads_every_epochs_scalars(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (trained_run / "tensorboard").glob("events.out.tfevents.*")
    reader = EventAccumulator(str(events))
    reader.Reload()
    history = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert set(reader.Tags()["scalars"]) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy",
                                             "learning_rate", "train_images_per_s"}
    for tag in ("train_loss", "test_accuracy", "learning_rate"):
        got = [(e.step, e.value) for e in reader.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in history], tag


def test_evaluate_names_what_to_use_instead_and_checks_its_inputs_first(trained_run, tmp_path, capsys):
    from jaxcifar import checkpoint
    from test_reliability import damage_every_data_file
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
