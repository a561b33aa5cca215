"""The seed's benchmark table for today's backends: `python -m jaxcifar.bench [--compare-torch] [--json PATH]`.

For each model at batch 128: forward (eval mode), backward, forward+backward and the full
train step (forward + backward + torch7-SGD update, input gather and flips included),
each the median of `--runs` timed calls after warm-up, compile time reported apart;
images/s, achieved GFLOP/s from an analytic FLOP count, and the fraction of this device's
matmul peak measured in the same run. `--compare-torch` times the same models in PyTorch
(eager, channels_last, same threads and batch) and prints JAX/PyTorch ratios.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from jaxcifar import errors
from jaxcifar.run import machine
from jaxcifar.tools.flops import matmul_peak_gflops, train_flops
from jaxcifar.tools.timing import PHASES, time_passes, timed
from jaxcifar.tools.torch_bench import bench_torch, torch_device

MODELS = ("vgg_bn_drop", "nin")


# ---------------------------------------------------------------------------
# JAX


def _bench_trainer(model_name: str, batch: int, dtype: str, epoch_steps: int, overrides: dict | None = None,
                   replicas: int = 1, width: float = 1.0):
    """A Trainer of `replicas` seeds on random images: `epoch_steps` batches of `batch` per epoch."""
    from jaxcifar import config as config_lib
    from jaxcifar.data import fake_data
    from jaxcifar.run.trainer import Trainer

    c = config_lib.base_config()
    c.model, c.batch_size, c.dtype, c.width = model_name, batch, dtype, width
    for k, v in (overrides or {}).items():
        c[k] = v
    if replicas > 1:
        c.seeds = ",".join(map(str, range(replicas)))
    dataset = fake_data.random_preprocessed(batch * max(epoch_steps, 1), num_test=batch)
    return Trainer(c, dataset), dataset.train_images, dataset.train_labels


def time_training(trainer, runs: int, count: int | None = None) -> dict:
    """Seconds per update of every replica, `count` updates per call (default: as training runs them), and the
    first call's extra seconds (compilation)."""
    import jax

    state, epoch_metrics = trainer.init_state(), trainer.zero_metrics()
    order = trainer.epoch_order(state.key_data, 1)
    count = count or min(trainer.plan.steps_per_call, trainer.plan.steps_per_epoch)
    holder = {"state": state, "epoch_metrics": epoch_metrics}

    def steps():
        holder["state"], holder["epoch_metrics"] = trainer.run_steps(holder["state"], holder["epoch_metrics"], order,
                                                                     count)
        jax.block_until_ready(holder["epoch_metrics"])

    first, call_s = timed(steps, runs)
    step_s = call_s / count
    return {"steps_per_call": count, "step_loop": trainer.choices["step_loop"], "replicas": trainer.plan.replicas,
            "seconds_per_step": step_s, "compile_seconds": first - call_s,
            "images_per_s": trainer.plan.replicas * trainer.config.batch_size / step_s}


# Each alternative of backends.STEP_CHOICES, timed against the backend's defaults by `--step-variants`.
STEP_VARIANTS = {
    "defaults": {},
    "1 step per call": {"steps_per_call": 1, "step_loop": "unroll"},
    "4 unrolled steps per call": {"steps_per_call": 4, "step_loop": "unroll"},
    "whole epoch, lax.scan": {"steps_per_call": 1_000_000, "step_loop": "scan"},
    "conv_impl=xla": {"conv_impl": "xla"},
    "conv_impl=small": {"conv_impl": "small"},
    "pool_grad=xla": {"pool_grad": "xla"},
    "bn_grad=autodiff": {"bn_grad": "autodiff"},
    "dropout_bits=32": {"dropout_bits": 32},
}


def bench_variants(model_name: str, batch: int, runs: int, dtype: str, epoch_steps: int, names=None,
                   width: float = 1.0) -> dict:
    """Train-step time of the STEP_VARIANTS entries `names` (default all); `fastest` names the quickest settings."""
    out = {}
    for name, overrides in STEP_VARIANTS.items():
        if names and name not in names and name != "defaults":
            continue
        trainer, _, _ = _bench_trainer(model_name, batch, dtype, epoch_steps, overrides, width=width)
        out[name] = {"overrides": overrides, **time_training(trainer, runs)}
    return {"variants": out, "fastest": fastest_overrides(out)}


MARGIN = 0.97  # an alternative replaces a default only when at least 3 % faster: timing noise never flips a choice


def fastest_overrides(variants: dict) -> dict:
    """The config overrides of the faster alternative per field (the loop as one choice), against the defaults."""
    base = variants["defaults"]["seconds_per_step"]
    loops = [v for v in variants.values() if "step_loop" in v["overrides"]]
    best = {}
    loop = min(loops, key=lambda v: v["seconds_per_step"], default=None)
    if loop is not None and loop["seconds_per_step"] < MARGIN * base:
        best.update(loop["overrides"])
    for v in variants.values():
        o = v["overrides"]
        if len(o) == 1 and "step_loop" not in o and v["seconds_per_step"] < MARGIN * base:
            field = next(iter(o))
            rival = [w for w in variants.values() if field in w["overrides"] and w is not v]
            if all(v["seconds_per_step"] <= w["seconds_per_step"] for w in rival):
                best.update(o)
    return best


def bench_replicas(model_name: str, batch: int, runs: int, dtype: str, epoch_steps: int, counts,
                   width: float = 1.0) -> dict:
    """Images/s summed over K seeds trained at once, batch `batch` each, for each K in `counts`."""
    return {str(k): time_training(_bench_trainer(model_name, batch, dtype, epoch_steps, replicas=k, width=width)[0],
                                  runs) for k in counts}


def bench_jax(model_name: str, batch: int, runs: int, dtype: str = "float32", conv_impl: str = "auto",
              epoch_steps: int = 8, steps_per_call: int | None = None, width: float = 1.0) -> dict:
    """Seconds of each pass and of a train step (as training calls it, and one per call), compile times, the
    achieved GFLOP/s, and the training loop's own share of an epoch."""
    overrides = {"conv_impl": conv_impl}
    if steps_per_call is not None:
        overrides["steps_per_call"] = steps_per_call
    trainer, images, labels = _bench_trainer(model_name, batch, dtype, epoch_steps, overrides, width=width)
    seconds, compile_s = time_passes(*_jax_passes(trainer, images[:batch], labels[:batch]), runs)
    # "train step": one update as training runs it, `steps_per_call` of them per compiled call.
    calls = time_training(trainer, runs)
    per_call = calls["steps_per_call"]
    single = time_training(trainer, runs, count=1) if per_call > 1 else calls
    seconds["train step"], compile_s["train step"] = calls["seconds_per_step"], calls["compile_seconds"]
    flops_per_image = train_flops(trainer.model)
    return {
        "seconds": seconds, "compile_seconds": compile_s, "steps_per_call": per_call,
        "train_step_one_per_call": {"seconds": single["seconds_per_step"], "compile_seconds": single["compile_seconds"]},
        "images_per_s": batch / seconds["train step"],
        "train_gflops_per_image": flops_per_image / 1e9,
        "achieved_gflops": flops_per_image * batch / seconds["train step"] / 1e9,
        "epoch_loop": time_epoch_loop(trainer),
    }


def _jax_passes(trainer, images, labels):
    """Zero-argument callables, each blocking until done: eval forward, training forward, forward and backward."""
    import jax

    from jaxcifar.nn import step as step_lib

    state, model = step_lib.replica(trainer.init_state(), 0), trainer.model
    x, y, key = jax.device_put(images), jax.device_put(labels), jax.random.key(1)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    jit = functools.partial(jax.jit, compiler_options=trainer.compiler_options)
    loss_fn = functools.partial(step_lib.training_loss, batch_stats=state.batch_stats, images=x, labels=y,
                                dropout_key=key, model=model, recipe=trainer.recipe)

    forward = jit(lambda v: model.apply(v, x, train=False))
    forward_train = jit(lambda p: loss_fn(p)[0])
    forward_backward = jit(lambda p: jax.value_and_grad(loss_fn, has_aux=True)(p))
    return (lambda: jax.block_until_ready(forward(variables)),
            lambda: jax.block_until_ready(forward_train(state.params)),
            lambda: jax.block_until_ready(forward_backward(state.params)))


def time_epoch_loop(trainer) -> dict:
    """The training loop's own cost (epoch order, progress syncs, metric fetches): a short epoch through
    `train_epoch` against the same steps called back to back, alternated so that the machine's drift hits
    both alike; the fastest of each is compared. Shapes are compiled already (time_training ran)."""
    import jax

    loop_s, bare_s = [], []
    for _ in range(2):
        fresh = trainer.init_state()  # step 0: the whole of epoch 1 runs
        jax.block_until_ready(fresh)
        t0 = time.perf_counter()
        trainer.train_epoch(fresh, 1, progress=lambda done, loss: None)
        loop_s.append(time.perf_counter() - t0)
        fresh, epoch_metrics = trainer.init_state(), trainer.zero_metrics()
        order = trainer.epoch_order(fresh.key_data, 1)
        jax.block_until_ready((fresh, epoch_metrics, order))
        t0 = time.perf_counter()
        for count in trainer.plan.calls(0):  # the calls train_epoch makes
            fresh, epoch_metrics = trainer.run_steps(fresh, epoch_metrics, order, count)
        jax.block_until_ready(epoch_metrics)
        bare_s.append(time.perf_counter() - t0)
    epoch_s, steps_s = min(loop_s), min(bare_s)
    return {"steps": trainer.plan.steps_per_epoch, "seconds": epoch_s, "bare_steps_seconds": steps_s,
            "fraction_outside_steps": max(epoch_s - steps_s, 0.0) / epoch_s}


# ---------------------------------------------------------------------------


def format_table(result: dict) -> str:
    lines = []
    for name, r in result["models"].items():
        jx = r["jax"]["seconds"]
        th = r.get("torch", {}).get("seconds")
        head = f"{name} (batch {result['batch']}, {result['dtype']}), seconds"
        lines.append(head)
        lines.append(f"{'':<18}{'JAX':>10}" + (f"{'PyTorch':>10}{'JAX/PyTorch':>13}" if th else ""))
        for phase in PHASES:
            row = f"{phase:<18}{jx[phase]:>10.3f}"
            if th:
                ratio = jx[phase] / th[phase] if th[phase] > 0 else float("nan")
                row += f"{th[phase]:>10.3f}{ratio:>13.2f}"
            lines.append(row)
        j = r["jax"]
        lines.append(f"train step: {j['images_per_s']:.0f} images/s, {j['achieved_gflops']:.1f} GFLOP/s "
                     f"({j['train_gflops_per_image']:.2f} GFLOP/image) = {100 * j['fraction_of_matmul_peak']:.1f} % "
                     f"of the measured matmul peak; compile {j['compile_seconds']['train step']:.1f} s")
        if j.get("steps_per_call", 1) > 1:
            one = j["train_step_one_per_call"]["seconds"]
            lines.append(f"train step: {j['steps_per_call']} per compiled call, as training runs them; "
                         f"one per call: {one:.3f} s")
        loop = j["epoch_loop"]
        lines.append(f"training loop: {loop['steps']} steps in {loop['seconds']:.2f} s vs {loop['bare_steps_seconds']:.2f} s "
                     f"back to back: {100 * loop['fraction_outside_steps']:.1f} % of it outside the train step")
        for k, rep in r.get("replicas", {}).items():
            lines.append(f"{k} seeds at once: {rep['seconds_per_step']:.4f} s per step, "
                         f"{rep['images_per_s']:,.0f} images/s summed")
        variants = r.get("step_variants")
        if variants:
            for vname, v in variants["variants"].items():
                lines.append(f"step variant {vname:<28} {v['seconds_per_step']:.4f} s per step "
                             f"(compile {v['compile_seconds']:.1f} s)")
            lines.append(f"fastest overrides: {variants['fastest'] or 'the defaults'}")
        lines.append("")
    lines.append(f"matmul peak ({result['dtype']}): {result['matmul_peak_gflops']:.0f} GFLOP/s on "
                 f"{result['machine']['device']} ({result['machine']['cpu']}, {result['machine']['cpu_count']} cores)")
    return "\n".join(lines)


def run(models=MODELS, batch: int = 128, runs: int = 5, compare_torch: bool = False, dtype: str = "float32",
        threads: int | None = None, conv_impl: str = "auto", epoch_steps: int = 8,
        steps_per_call: int | None = None, replicas=(), step_variants=False, width: float = 1.0) -> dict:
    import jax

    threads = threads or os.cpu_count()
    result = {"batch": batch, "width": width, "runs": runs, "dtype": dtype, "threads": threads,
              "machine": machine.machine_info(), "matmul_peak_gflops": matmul_peak_gflops(dtype), "models": {}}
    for name in models:
        entry = {"jax": bench_jax(name, batch, runs, dtype, conv_impl, epoch_steps, steps_per_call, width)}
        entry["jax"]["fraction_of_matmul_peak"] = entry["jax"]["achieved_gflops"] / result["matmul_peak_gflops"]
        if replicas:
            entry["replicas"] = bench_replicas(name, batch, runs, dtype, epoch_steps, replicas, width)
        if step_variants:
            names = None if step_variants is True else step_variants
            entry["step_variants"] = bench_variants(name, batch, runs, dtype, epoch_steps, names, width)
        if compare_torch:
            entry["torch"] = bench_torch(name, batch, runs, threads, torch_device(jax.default_backend()), dtype)
            entry["jax_over_torch"] = {p: entry["jax"]["seconds"][p] / entry["torch"]["seconds"][p] for p in PHASES
                                       if entry["torch"]["seconds"][p] > 0}
            result["torch_version"] = entry["torch"]["version"]
        result["models"][name] = entry
    return result


def checked_arguments(args) -> tuple[list[str], list[int], list[str] | bool]:
    """(models, replica counts, step variants or True for all) of the command line, or a JaxcifarError naming the
    first bad one; --json's folder is made here (a folder that cannot be made would lose the results at the end)."""
    from jaxcifar.config import MAX_WIDTH

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise errors.JaxcifarError(f"unknown model(s) {unknown} (choose from {MODELS})")
    optional = [v for v in (args.steps_per_call, args.threads) if v is not None]
    if min(args.batch, args.runs, args.epoch_steps, *optional) <= 0:
        raise errors.JaxcifarError("--batch, --runs, --epoch-steps, --steps-per-call and --threads must be positive")
    if not 0 < args.width <= MAX_WIDTH:
        raise errors.JaxcifarError(f"--width {args.width} must be a positive number up to {MAX_WIDTH}")
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise errors.JaxcifarError(f"--json {args.json}: cannot make its folder ({e.strerror or e}); give another "
                                       "path") from None
    if args.compare_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise errors.JaxcifarError("--compare-torch needs PyTorch: pip install torch") from None
    try:
        replicas = [int(k) for k in args.replicas.split(",") if k.strip()]
    except ValueError:
        replicas = [0]
    if any(k <= 0 for k in replicas):
        raise errors.JaxcifarError(f"--replicas {args.replicas!r}: give positive integers, e.g. 1,4,8")
    variants = [] if not args.step_variants else True if args.step_variants == "all" else \
        [v.strip() for v in args.step_variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in STEP_VARIANTS] if isinstance(variants, list) else []
    if unknown:
        raise errors.JaxcifarError(f"--step-variants: unknown {unknown}; choose from {', '.join(STEP_VARIANTS)}")
    return models, replicas, variants


def main(argv=None) -> int:
    from jaxcifar.nn import layers

    p = argparse.ArgumentParser(prog="python -m jaxcifar.bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: vgg_bn_drop,nin")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (the recipe's: 1)")
    p.add_argument("--runs", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--conv-impl", choices=("auto", *layers.CONV_IMPLS), default="auto")
    p.add_argument("--compare-torch", action="store_true", help="also time PyTorch (pip install torch)")
    p.add_argument("--threads", type=int, help="PyTorch threads (default: all cores, as XLA uses)")
    p.add_argument("--epoch-steps", type=int, default=8, help="steps of the timed training-loop epoch")
    p.add_argument("--steps-per-call", type=int, help="train steps per compiled call (default: the config's)")
    p.add_argument("--replicas", default="", help="comma-separated seed counts K trained at once, e.g. 1,4,8: "
                   "images/s summed over the K runs (batch --batch each)")
    p.add_argument("--step-variants", nargs="?", const="all", default="",
                   help="time every alternative of the step (backends.STEP_CHOICES), or those named (comma-separated "
                        f"from: {', '.join(STEP_VARIANTS)}), against the defaults, and name the fastest")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        models, replicas, variants = checked_arguments(args)
    except errors.JaxcifarError as e:  # before any timing: not after minutes of it
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(models, args.batch, args.runs, args.compare_torch, args.dtype, args.threads, args.conv_impl,
                 args.epoch_steps, args.steps_per_call, replicas, variants, args.width)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"bench: results written to {args.json}")
    return 0


if __name__ == "__main__":
    from jaxcifar import cli

    cli.run_command(main)
