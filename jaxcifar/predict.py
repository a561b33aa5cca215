"""Classify image files with a trained run (the original's example_classify.lua).

    python -m jaxcifar.predict --workdir W [--best] [--all | --json] IMAGE...

Each image is read with Pillow, turned upright as its EXIF orientation says, converted to RGB, resized to 32x32 (bilinear, like
torch's image.scale), preprocessed with the statistics stored in the checkpoint, and classified:
one line per image with its most probable class, all 10 probabilities with --all (the original's
table) or --json. The images are read before the model is loaded; a file that cannot be read
(missing, not an image, a decompression bomb) is reported and the others are still classified.
Exit code 1 if any file failed, 2 if the model could not be loaded or gives no probabilities (NaN).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()

import argparse
import json
import sys

import numpy as np

from jaxcifar.data import archive, preprocess
from jaxcifar import errors, evaluate
from jaxcifar.nn import scoring
from jaxcifar.run import workdir as workdir_lib


def load_image(path: str) -> np.ndarray:
    """uint8 (32, 32, 3) RGB; raises ValueError with the reason for anything Pillow cannot decode."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow refuses images over 2x MAX_IMAGE_PIXELS and only warns between 1x and 2x; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            # A phone photo is stored as the sensor saw it, with its orientation in EXIF: turned upright first
            # (it was classified sideways).
            im = _eight_bit(ImageOps.exif_transpose(im)).convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"refused: {e}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image ({e})") from None


def _eight_bit(im):
    """`im` itself, or an 8-bit grayscale image for Pillow's 16-bit integer and float modes, which its own
    conversion clips (a 16-bit PNG comes out near-white) or zeroes (a float TIFF in [0, 1] comes out black)."""
    from PIL import Image

    if im.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return im
    values = np.asarray(im, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"a {im.mode} image with values that are not finite; refused")
    low, high = float(values.min()), float(values.max())
    if im.mode == "F" and low >= 0 and high <= 1:
        scale = 255.0  # a float image in [0, 1]
    elif im.mode == "F" and low >= 0 and high <= 255:
        scale = 1.0
    elif im.mode != "F" and low >= 0 and high <= 65535:
        scale = 255.0 / 65535.0  # 16 bits per sample
    else:
        raise ValueError(f"a {im.mode} image with values from {low:g} to {high:g}: no known range to scale to 8 bits; "
                         "save it as an 8-bit image")
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), mode="L")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def read_images(paths: list[str]):
    """(images {path: uint8 (32, 32, 3)}, errors {path: reason}), in the order given."""
    images, errors_ = {}, {}
    for path in paths:
        try:
            images[path] = load_image(path)
        except ValueError as e:
            errors_[path] = str(e)
    return images, errors_


def classify_images(trained: evaluate.TrainedModel, images: dict) -> dict:
    """{path: {class: probability}} for uint8 images {path: (32, 32, 3)}."""
    if not images:
        return {}
    x = preprocess.apply_stats(np.stack(list(images.values())), trained.stats)
    logits = scoring.eval_logits(trained.model, trained.variables, x, trained.config.num_classes, min(len(x), 64))
    probs = softmax(logits.astype(np.float64))
    return {path: {name: float(v) for name, v in zip(archive.CLASS_NAMES, p)} for path, p in zip(images, probs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxcifar.predict", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int)
    which.add_argument("--best", action="store_true")
    p.add_argument("--seed", type=int, help="with a run of several seeds: use this seed's model (default: the first)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true", help="print every class's probability, not only the top one")
    shown.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    evaluate.quiet_libraries()
    images, failed = read_images(args.images)  # before the model: a bad path is reported at once
    for path, reason in failed.items():
        print(f"error: {path}: {reason}", file=sys.stderr)
    results = {}
    try:
        workdir_lib.existing_workdir(args.workdir)  # said even when no image could be read: two mistakes, both named
        if images:
            trained = evaluate.load_trained(args.workdir, args.step, args.best, args.seed)
            results = classify_images(trained, images)
            check_probabilities(results, args.workdir)
    except errors.JaxcifarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"probabilities": results, "errors": failed}, indent=1))
    else:
        print_results(results, args.all)
        print(f"{len(results)} image{'s' if len(results) != 1 else ''} classified"
              + (f", {len(failed)} could not be read" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def check_probabilities(results: dict, workdir: str) -> None:
    """Raises CheckpointError when the model gives NaN probabilities (a diverged or damaged save), naming the images."""
    bad = [path for path, probs in results.items() if not all(np.isfinite(v) for v in probs.values())]
    if bad:
        raise errors.CheckpointError(f"the model in {workdir} gives no probabilities (NaN) for {len(bad)} of "
                                f"{len(results)} images, e.g. {bad[0]}: its weights are not finite; use an earlier "
                                "checkpoint (--step) or train again")


def print_results(results: dict, every_class: bool) -> None:
    """'PATH: cat (87.31 %)' per image; with `every_class`, the original's table of all ten after it."""
    width = max((len(path) for path in results), default=0)
    for path, probs in results.items():
        top = max(probs, key=probs.get)
        print(f"{path + ':':<{width + 1}} {top} ({100 * probs[top]:.2f} %)")
        if every_class:
            for name, v in probs.items():
                print(f"  {name:<10}: {100 * v:5.2f}%")


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
