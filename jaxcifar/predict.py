"""Classify image files with a trained run (the original's example_classify.lua).

    python -m jaxcifar.predict --workdir W [--best] [--json] IMAGE...

Each image is read with Pillow, converted to RGB, resized to 32x32 (bilinear, like
torch's image.scale), preprocessed with the statistics stored in the checkpoint, and the
10 class probabilities are printed. A file that cannot be read is reported and skipped;
the exit code is 1 if any file failed, 2 if the model could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxcifar import checkpoint, data, evaluate, preprocess


def load_image(path: str) -> np.ndarray:
    """uint8 (32, 32, 3) RGB; raises ValueError with the reason for anything Pillow cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image ({e})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def classify(trained: evaluate.TrainedModel, paths: list[str]):
    """(results, errors): {path: {class: probability}} for readable files, {path: reason} for the rest."""
    images, ok, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path))
            ok.append(path)
        except ValueError as e:
            errors[path] = str(e)
    results = {}
    if images:
        x = preprocess.apply_stats(np.stack(images), trained.stats)
        probs = softmax(evaluate.predict_logits(trained, x, batch_size=min(len(x), 64)).astype(np.float64))
        for path, p in zip(ok, probs):
            results[path] = {name: float(v) for name, v in zip(data.CLASS_NAMES, p)}
    return results, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxcifar.predict", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int)
    which.add_argument("--best", action="store_true")
    p.add_argument("--seed", type=int, help="with a run of several seeds: use this seed's model (default: the first)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    try:
        trained = evaluate.load_trained(args.workdir, args.step, args.best, args.seed)
    except (checkpoint.CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, errors = classify(trained, args.images)
    for path, reason in errors.items():
        print(f"error: {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"probabilities": results, "errors": errors}, indent=1))
    else:
        for path, probs in results.items():
            print(f"Probabilities for {path}")
            for name, v in probs.items():
                print(f"{name:<10}: {100 * v:5.2f}%")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
