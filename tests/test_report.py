"""report.py: the self-contained HTML report, its rendering, and the TensorBoard scalars."""

import base64
import html.parser
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

from jaxcifar.data import archive
from jaxcifar.run import report
from conftest import import_torch


def history(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


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
    curves, heatmap = parser.images
    for src in (curves, heatmap):
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.size[0] > 300
    assert "ConfusionMatrix:" in page and "learningRate" in page and "total" in page and "parameters" in page
    assert Image.open(trained_run / "accuracy.png").format == "PNG"
    assert "http" not in page.split("<body>")[1]  # nothing to fetch: opens offline


def test_report_shows_the_network_in_order_and_what_auto_resolved_to(trained_run):
    page = (trained_run / "report.html").read_text()
    model = page.split("<h4>Model</h4>")[1]
    layers = [line.split()[0] for line in model.split("<pre>")[1].split("</pre>")[0].splitlines()]
    convs = [name for name in layers if name.endswith("/Conv_0")]
    assert convs == [f"ConvBNReLU_{i}/Conv_0" for i in range(13)]  # 0, 1, 2, ..., 12: not 0, 1, 10, 11, 12, 2
    assert layers[-5:] == ["Dense_0", "TorchBatchNorm_0", "Dense_1", "total", "batch_stats"]  # the classifier in order
    assert "<td>conv_impl</td><td>auto -&gt; small</td>" in page  # the tiny config leaves it to the backend (cpu)
    assert "<td>model</td><td>vgg_bn_drop</td>" in page
    latest = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"<td>trained on</td><td>{latest['machine']}</td>" in page and "1 x cpu (" in latest["machine"]


def test_confusion_heatmap_shows_each_rows_share(tmp_path):
    confusion = np.zeros((10, 10), int)
    confusion[np.arange(10), np.arange(10)] = 9
    confusion[3, 5] = 91  # most cats called dogs
    img = np.asarray(Image.open(io.BytesIO(report.plot_confusion(confusion, archive.CLASS_NAMES))).convert("L"))
    assert img.shape[1] > 300 and img.std() > 10


def test_report_escapes_text_and_is_replaced_atomically(trained_run, tmp_path):
    h = history(trained_run)
    cfg = {"model": "<script>alert(1)</script>", "data": {"archive": "/a & b/<x>.tar.gz"}}
    target = tmp_path / "report.html"
    target.write_text("old")
    inode = target.stat().st_ino
    report.write_report(tmp_path, h, cfg, {"learningRate": 1.0}, "layer <b>", archive.CLASS_NAMES)
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


def test_scalars_are_written_without_importing_torch(tmp_path):
    # tensorboardX imports an installed torch for a type annotation (1.6 s of every training start).
    import_torch()  # torch installed: the case that matters
    code = ("import sys; from jaxcifar.run import report; w = report.ScalarWriter(sys.argv[1]); w.write(1, {'a': 2.0});"
            " w.close(); print('torch' in sys.modules); import torch; print(torch.zeros(1).shape)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["False", "torch.Size([1])"]  # not imported, and still importable
    (events,) = tmp_path.glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    reader = EventAccumulator(str(events))
    reader.Reload()
    assert [(e.step, e.value) for e in reader.Scalars("a")] == [(1, 2.0)]
