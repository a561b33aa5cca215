"""predict.py: class probabilities for image files, checked against the dataset pipeline; its input errors."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxcifar.data import archive, cache, tfds_cifar10
from jaxcifar import evaluate, predict
from jaxcifar.nn import scoring
from conftest import png_header


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
        assert list(probs) == list(archive.CLASS_NAMES) and sum(probs.values()) == pytest.approx(1.0)


def test_predict_agrees_with_the_dataset_pipeline(trained_run, prepared, tmp_path):
    raw = tfds_cifar10.load_uint8(prepared[0])
    image = raw["test_images"][3]
    path = tmp_path / "test3.png"
    Image.fromarray(image).save(path)
    trained = evaluate.load_trained(trained_run)
    images, errors = predict.read_images([str(path)])
    results = predict.classify_images(trained, images)
    cached = cache.load_preprocessed(prepared[0], prepared[1], md5s=prepared[2], log=lambda m: None)
    idx = next(i for i in range(len(raw["test_images"])) if np.array_equal(raw["test_images"][i], image))
    logits = scoring.eval_logits(trained.model, trained.variables, cached.test_images[idx:idx + 1], 10, 1)
    want = predict.softmax(logits.astype(np.float64))[0]
    np.testing.assert_allclose(list(results[str(path)].values()), want, rtol=1e-4, atol=1e-6)


def test_predict_reads_its_inputs_before_loading_a_model(tmp_path, capsys):
    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    rc = predict.main(["--workdir", str(tmp_path / "no-such-run"), str(tmp_path / "missing.png"), str(bomb)])
    err = capsys.readouterr().err
    assert rc == 2  # the files' errors, found before the model would be loaded, and then the absent run's
    assert "missing.png: no such file" in err and "bomb.png: refused" in err and "Traceback" not in err
    assert err.index("bomb.png: refused") < err.index("workdir") and "no-such-run does not exist" in err


def test_predict_prints_one_line_per_image_and_the_table_on_request(trained_run, tmp_path, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    assert predict.main(["--workdir", str(trained_run), "--json", *paths]) == 0
    probs = json.loads(capsys.readouterr().out)["probabilities"]
    assert predict.main(["--workdir", str(trained_run), *paths]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3
    for line, path in zip(lines, paths):
        top = max(probs[path], key=probs[path].get)
        assert line.split() == [f"{path}:", top, f"({100 * probs[path][top]:.2f}", "%)"]
    assert captured.err.strip() == "3 images classified"
    assert predict.main(["--workdir", str(trained_run), "--all", paths[0]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 11 and [line.split(":")[0].strip() for line in lines[1:]] == list(archive.CLASS_NAMES)


def test_predict_refuses_nan_probabilities(trained_run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "im.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    monkeypatch.setattr(scoring, "eval_logits", lambda model, variables, x, classes, batch_size: np.full((len(x), 10), np.nan))
    assert predict.main(["--workdir", str(trained_run), str(path)]) == 2
    captured = capsys.readouterr()
    assert "gives no probabilities (NaN) for 1 of 1 images" in captured.err and "nan" not in captured.out.lower()


def test_predict_reads_16_bit_and_float_images_by_their_range(tmp_path):
    mid16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(mid16)  # half of 16 bits
    floats = tmp_path / "float.tiff"
    Image.fromarray(np.full((32, 32), 0.5, np.float32), mode="F").save(floats)  # half of [0, 1]
    for path in (mid16, floats):
        assert Image.open(path).mode in ("I", "I;16", "F")
        image = predict.load_image(str(path))
        assert image.shape == (32, 32, 3) and abs(float(image.mean()) - 127.5) <= 1, (path, image.mean())
    huge = tmp_path / "huge.tiff"
    Image.fromarray(np.full((32, 32), 1e6, np.float32), mode="F").save(huge)
    with pytest.raises(ValueError, match="no known range to scale to 8 bits"):
        predict.load_image(str(huge))


def test_predict_turns_an_image_upright_as_its_exif_orientation_says(tmp_path):
    # A phone photo: the pixels as the sensor saw them, EXIF orientation 6 ("rotate 90 degrees clockwise to view").
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    stored = np.rot90(upright, k=1)  # what a sensor turned a quarter the other way recorded
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100, subsampling=0)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    got = predict.load_image(str(tmp_path / "phone.jpg")).astype(int)
    assert np.abs(got - upright).mean() < 3  # JPEG's rounding at quality 100
    assert np.abs(got - stored).mean() > 30  # not as stored
    np.testing.assert_array_equal(predict.load_image(str(tmp_path / "plain.png")), stored)  # no EXIF: as stored
