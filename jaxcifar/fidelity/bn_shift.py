"""How far each BatchNorm layer's running statistics sit from what its input is in eval mode, in finished fidelity
runs of either side, with the weight norms: the measured property behind the eval-mode gap G (issue 21).

    python scripts/bn_shift.py results/fidelity/*-w0.25-s*.json --out results/bn-shift/w0.25.json

Each run's last state (its fidelity workdir: orbax on the JAX side, state.npz on the PyTorch side) is loaded into
the PyTorch port's network, which computes the same eval-mode function (the test accuracy it gives is printed
beside the one the run recorded). Over the 10,000 test images in eval mode, per BatchNorm layer and channel:
  variance ratio   the variance of the layer's input / its running variance
  second moment    E[(input - running mean)^2] / (running variance + eps): the variance of what the layer
                   normalises, which batch statistics make 1 in training
each summarised per layer by its geometric mean over channels (per run), the second moment also by the root mean
square of its log over channels (the shift channel by channel), and the Frobenius norm of each
convolution's and linear layer's weight. Per side: mean and standard error over seeds; jax - torch in standard
errors, as `fidelity.py --gaps` compares G.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from jaxcifar import errors
from jaxcifar.fidelity import comparison
from jaxcifar.fidelity.runs import default_workdir, require_torch


def load_state(result: dict, workdir: Path):
    """The PyTorch port's network holding the run's last saved state; refuses a run that has not finished."""
    import numpy as np

    from jaxcifar.run import checkpoint
    from jaxcifar.nn import step as step_lib
    from jaxcifar.fidelity import torch_port

    c = result["config"]
    model = torch_port.build_model(c["model"], c["width"], c["num_classes"], c["batch_norm"], c["dropout"])
    if result["side"] == "jax":
        tree, meta, _ = checkpoint.read_saved(workdir)
        one = {k: step_lib.replica(tree["train_state"][k], 0) for k in ("params", "batch_stats")}
        torch_port.load_flax(model, one["params"], one["batch_stats"])
        rows = meta["history"]
    else:
        with np.load(workdir / "state.npz", allow_pickle=False) as arrays:
            rows = json.loads(str(arrays["meta"]))["rows"]
            torch_port.load_model_arrays(model, arrays)
    if len(rows) != result["num_epochs"]:
        raise SystemExit(f"error: {workdir} holds epoch {len(rows)} of {result['num_epochs']}: finish the run "
                         "first (the same fidelity.py command resumes it)")
    return model.eval()


def layer_moments(model, images, labels, batch: int = 500) -> tuple[list[dict], float]:
    """Per BatchNorm layer (in order): running mean and variance, and its input's mean and variance over
    `images` in eval mode (float64 sums); and the eval-mode accuracy in %."""
    import numpy as np
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    sums = [None] * len(bns)

    def hook(i):
        def record(_, inputs):
            x = inputs[0].double()
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # channels first, then everything else
            s = torch.stack([x.sum(1), (x * x).sum(1), torch.full_like(x[:, 0], x.shape[1])])
            sums[i] = s if sums[i] is None else sums[i] + s
        return record

    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(bns)]
    correct = 0
    try:
        with torch.no_grad():
            for s in range(0, len(labels), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch].transpose(0, 3, 1, 2)))
                correct += int((model(x).argmax(1).numpy() == labels[s:s + batch]).sum())
    finally:
        for h in handles:
            h.remove()
    layers = []
    for bn, (total, squares, n) in zip(bns, (s.numpy() for s in sums)):
        mean = total / n
        layers.append({"running_mean": bn.running_mean.double().numpy(), "running_var": bn.running_var.double().numpy(),
                       "mean": mean, "var": squares / n - mean * mean, "eps": bn.eps})
    return layers, 100.0 * correct / len(labels)


def shift_summary(layers: list[dict]) -> dict[str, list[float]]:
    """Per layer: geometric means over channels of the variance ratio and of the second moment (a shift all
    channels share), and the root mean square over channels of log(second moment) (the shift channel by channel,
    which a later layer cannot undo by one rescaling)."""
    import numpy as np

    def log(values):
        return np.log(np.maximum(values, 1e-12))

    second = [(m["var"] + (m["mean"] - m["running_mean"]) ** 2) / (m["running_var"] + m["eps"]) for m in layers]
    return {"variance_ratio": [float(np.exp(np.mean(log(m["var"] / m["running_var"])))) for m in layers],
            "second_moment": [float(np.exp(np.mean(log(s)))) for s in second],
            "rms_log_second_moment": [float(np.sqrt(np.mean(log(s) ** 2))) for s in second]}


def weight_norms(model) -> list[float]:
    import torch

    return [float(m.weight.detach().double().norm()) for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def measure(paths: list[str], workdirs: list[Path], images, labels, window: tuple[int, int]) -> list[dict]:
    runs = []
    for path, workdir in zip(paths, workdirs):
        result = json.loads(Path(path).read_text())
        model = load_state(result, workdir)
        layers, accuracy = layer_moments(model, images, labels)
        recorded = result["epochs"][-1]["test_accuracy"]
        print(f"{path}: eval test accuracy {accuracy:.2f} here, {recorded:.2f} recorded", file=sys.stderr)
        runs.append({"json": str(path), "side": result["side"], "variant": result["variant"], "seed": result["seed"],
                     "width": result["width"], "num_epochs": result["num_epochs"], "gap_window": list(window),
                     "gap": comparison.window_gap(result["epochs"], window), "test_accuracy": accuracy,
                     "recorded_test_accuracy": recorded, **shift_summary(layers), "weight_norm": weight_norms(model)})
    return runs


def mean_shift(run: dict) -> float:
    """A run's channel-by-channel shift (rms log second moment) averaged over its BatchNorm layers."""
    return sum(run["rms_log_second_moment"]) / len(run["rms_log_second_moment"])


def per_run(runs: list[dict]) -> str:
    """A markdown table: each run's G, eval test accuracy and its shift averaged over the layers."""
    lines = ["| side | seed | G | eval test accuracy | log second moment, mean over layers "
             "| channel-by-channel shift (rms log), mean over layers |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["side"], r["seed"])):
        lo, hi = r["gap_window"]
        mean_log = sum(math.log(v) for v in r["second_moment"]) / len(r["second_moment"])
        lines.append(f"| {r['side']} | {r['seed']} | {r['gap']:.2f} (epochs {lo}-{hi}) | {r['test_accuracy']:.2f} "
                     f"| {mean_log:+.3f} | {mean_shift(r):.3f} |")
    return "\n".join(lines)


KEYS = ("second_moment", "rms_log_second_moment", "weight_norm")


def layer_differences(runs: list[dict]) -> list[tuple[int, str, list, float, float | None]]:
    """Per layer and quantity: (layer index, quantity, [jax values, torch values], jax - torch, its s.e.)."""
    sides = [[r for r in runs if r["side"] == side] for side in ("jax", "torch")]
    out = []
    for layer in range(max(len(sides[0][0][k]) for k in KEYS)):
        for key in KEYS:
            if layer < len(sides[0][0][key]):
                values = [[r[key][layer] for r in rs] for rs in sides]
                out.append((layer, key, values, *comparison.side_difference(*values)))
    return out


def side_comparison(runs: list[dict]) -> str:
    """A markdown table, one row per convolution or linear layer (with the BatchNorm after it, if any): per
    quantity each side's mean ± s.e. over seeds and jax - torch in standard errors."""
    head = " | ".join(f"{k.replace('_', ' ')}: jax | torch | in s.e." for k in KEYS)
    lines = [f"| layer | {head} |", "|---|" + "---|" * 3 * len(KEYS)]
    cells: dict[int, dict[str, list[str]]] = {}
    for layer, key, values, diff, se in layer_differences(runs):
        cells.setdefault(layer, {})[key] = ([comparison.format_mean_se(*comparison.mean_se(v)) for v in values]
                                            + [f"{diff / se:+.1f}" if se else "-"])
    for layer, row in sorted(cells.items()):
        lines.append(f"| {layer + 1} | " + " | ".join(" | ".join(row.get(k, [""] * 3)) for k in KEYS) + " |")
    return "\n".join(lines)


def findings(runs: list[dict]) -> str:
    """Two sentences: how each run's mean channel-by-channel shift goes with its eval test accuracy and with G (over
    every run, either side), and how many per-layer differences lie beyond 2 s.e. against how many chance gives."""
    rms = [mean_shift(r) for r in runs]

    def r_with(key):
        try:
            return f"{statistics.correlation(rms, [r[key] for r in runs]):+.2f}"
        except statistics.StatisticsError:  # under two runs, or a constant
            return "undefined"

    text = (f"Over the {len(runs)} runs, either side: correlation of the mean channel-by-channel shift with the eval "
            f"test accuracy r = {r_with('test_accuracy')}, with G r = {r_with('gap')}.")
    both = {r["side"] for r in runs} == {"jax", "torch"}
    differences = [(diff, se) for *_, diff, se in layer_differences(runs) if se] if both else []
    if differences:
        beyond = sum(comparison.beyond_criterion(diff, se) for diff, se in differences)
        chance = math.erfc(comparison.SIGNIFICANT_SE / math.sqrt(2)) * len(differences)  # two normal tails
        text += (f" Per-layer differences jax - torch beyond {comparison.SIGNIFICANT_SE:g} standard errors: {beyond} "
                 f"of {len(differences)}; as many independent differences with nothing behind them would put about "
                 f"{chance:.1f} there by chance.")
    return text


def tables(runs: list[dict]) -> str:
    """The per-run table, the per-layer comparison where both sides have runs, and what they show."""
    both = {r["side"] for r in runs} == {"jax", "torch"}
    return per_run(runs) + ("\n\n" + side_comparison(runs) if both else "") + "\n\n" + findings(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bn_shift.py", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="JSON", help="fidelity results whose workdirs hold their last state")
    p.add_argument("--out", help="write the per-run figures here (JSON)")
    p.add_argument("--window", default="5-10", help="the epochs G averages over, as fidelity.py --gaps")
    p.add_argument("--workdir", action="append", default=[],
                   help="a run's workdir, once per JSON in order (default: fidelity.py's for its --out)")
    args = p.parse_args(argv)
    if args.workdir and len(args.workdir) != len(args.runs):
        p.error(f"{len(args.workdir)} --workdir for {len(args.runs)} runs: give one per run, or none")
    workdirs = [Path(w) for w in args.workdir] or [default_workdir(Path(r)) for r in args.runs]
    try:
        window = comparison.parse_window(args.window)
        comparison.check_run_files(args.runs, (*comparison.RUN_FIELDS, "config"))
        require_torch()  # either side's run is measured in the port's network
    except errors.JaxcifarError as e:
        raise SystemExit(f"error: {e}") from None
    import ml_collections

    from jaxcifar.data import cache

    first = json.loads(Path(args.runs[0]).read_text())
    dataset = cache.load_dataset(ml_collections.ConfigDict(first["config"]), log=lambda m: print(m, file=sys.stderr))
    runs = measure(args.runs, workdirs, dataset.test_images, dataset.test_labels, window)
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs}, indent=1))
    print(tables(runs))
    return 0
