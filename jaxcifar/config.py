"""The seed recipe as an ml_collections config, and the checks run before anything compiles."""

from __future__ import annotations

import math
import os

import ml_collections

from jaxcifar.nn import augment, backends, layers, models, optim
from jaxcifar.data import preprocess
from jaxcifar.errors import ConfigError

DTYPES = ("float32", "bfloat16")
MAX_WIDTH = 16  # the channel multiplier: 16 times the original VGG is already ~4 billion parameters
MIN_WIDTH = 1 / 64  # below it the narrowest layer (64 channels) would round to none: it was trained with 1 silently


def seed_list(config) -> list[int]:
    """The seeds of the runs trained together: `seeds` if set, else [`seed`]."""
    text = str(config.get("seeds", "") or "").strip()
    if not text:
        check_seeds([int(config["seed"])], "seed")
        return [int(config["seed"])]
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",")]  # an empty entry ("1,,2") is a mistake too
    except ValueError:
        raise ConfigError(f"bad config: seeds={text!r}; give comma-separated integers, e.g. --config.seeds=0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"bad config: seeds={text!r} must list at least one seed, each once")
    check_seeds(seeds, "seeds")
    return seeds


def check_seeds(seeds: list[int], field: str) -> None:
    """A seed is a random key's 32 bits: jax.random.key takes nothing larger (an OverflowError, mid-start)."""
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ConfigError(f"bad config: {field}={bad[0]} is out of range; a seed is an integer from 0 to {2**32 - 1}")


def load_config_file(path) -> ml_collections.ConfigDict:
    """get_config() of a recipe file such as configs/vgg_fast.py (the command line's --config loads it itself)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def base_config() -> ml_collections.ConfigDict:
    """cifar.torch's train.lua defaults: VGG-BN-Drop, batch 128, 300 epochs, lr 1 halved every 25."""
    c = ml_collections.ConfigDict()
    c.model = "vgg_bn_drop"  # or "nin"
    c.width = 1.0  # channel multiplier (small values for fast tests)
    c.batch_norm = True
    c.dropout = True
    c.conv_impl = "auto"  # "xla", "matmul", "small" (matmuls on maps <= 2x2 and 1x1 kernels); "auto": backends.STEP_CHOICES
    c.dtype = "float32"  # "bfloat16": convolutions and matmuls in bf16, parameters and BN statistics fp32
    c.num_classes = 10

    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 300
    c.seed = 0
    c.seeds = ""  # e.g. "0,1,2": that many independent runs trained at once in one program; empty: `seed` alone
    c.flip = "batchflip"  # train.lua's BatchFlip: exactly half of each batch mirrored
    c.augment = "flip"  # the recipe's flips only; "crop_flip": random crops of the image padded by 4 zeros, then flips
    c.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1.0
    c.optimizer.momentum = 0.9
    c.optimizer.dampening = ml_collections.config_dict.placeholder(float)  # None: torch's default, the momentum
    c.optimizer.weight_decay = 5e-4
    c.optimizer.learning_rate_decay = 1e-7
    c.optimizer.epoch_step = 25
    c.optimizer.schedule = "torch_step"  # or "cosine", "onecycle"

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # tfds data dir; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.cache_dir = ""  # preprocessed cache; empty: $JAXCIFAR_CACHE_DIR or ~/.cache/jaxcifar
    c.data.archive = ""  # cifar-10-binary.tar.gz for offline preparation
    c.data.md5_file = ""  # md5sum-style list for a non-official archive (tests)
    c.data.preprocess = "yuv"  # provider.lua's; "rgb": per-channel standardization

    c.compile_cache_dir = ""  # JAX's persistent compilation cache; empty: $JAXCIFAR_COMPILE_CACHE, $JAXCIFAR_CACHE_DIR/xla or ~/.cache/jaxcifar/xla; "none" disables
    # How the step is built; 0 / "auto" take the backend's entry of backends.STEP_CHOICES.
    c.steps_per_call = 0  # train steps per compiled call; more than an epoch's steps: one call per epoch
    c.step_loop = "auto"  # "unroll": steps traced one after another; "scan": lax.scan over them
    c.pool_grad = "auto"  # "first_max": custom VJP on phase-split views; "xla": autodiff of lax.reduce_window
    c.bn_grad = "auto"  # "closed_form": custom VJP; "autodiff": through the mean and variance
    c.dropout_bits = 0  # 16: two draws per 32-bit random word; 32: one
    c.log_every_steps = 20  # progress bar and NaN check cadence (each one syncs with the device)
    c.checkpoint_every_epochs = 1
    # > 0: save at the first epoch end this many seconds after the last save, in place of checkpoint_every_epochs
    # (a GPU slot: a 15-million-parameter save every 1.3 s epoch costs more than the epoch). The last epoch and a
    # stop (Ctrl-C, SIGTERM) save whatever these say.
    c.checkpoint_every_s = 0.0
    c.keep_checkpoints = 3
    c.save_best = True  # best/ keeps the save of the best test accuracy (one more save whenever it improves)
    c.report_every_epochs = 1  # report.html's cadence; 0: at the end and on a stop only
    c.results = ml_collections.ConfigDict()
    # A folder: the run's result file (as scripts/reproduce.py writes them, NAME-seedS-{cpu,gpu}.json) is rewritten
    # there after every epoch, so a run cut short is a partial row. Empty: none.
    c.results.dir = ""
    c.results.name = ""  # NAME; empty: the --config file's name
    return c


def _dotted_fields(c, prefix: str = "") -> list[str]:
    out = []
    for k, v in c.items():
        out += _dotted_fields(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
    return out


def fast_config() -> ml_collections.ConfigDict:
    """configs/vgg_fast.py's schedule: one-cycle learning rate up to the original's peak of 1, no
    learningRateDecay, label smoothing 0.1, 40 epochs."""
    c = base_config()
    c.num_epochs = 40
    c.optimizer.schedule = "onecycle"
    c.optimizer.learning_rate = 1.0
    c.optimizer.learning_rate_decay = 0.0
    c.label_smoothing = 0.1
    return c


def nin_config() -> ml_collections.ConfigDict:
    """cifar.torch's models/nin.lua with the same training recipe."""
    c = base_config()
    c.model = "nin"
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field and the fix for a config that cannot train."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"bad config: {msg}")

    need(isinstance(c, ml_collections.ConfigDict),
         f"get_config() returned a {type(c).__name__}, not an ml_collections.ConfigDict; build it from "
         "jaxcifar.config.base_config(), as configs/vgg.py does")
    missing = sorted(set(_dotted_fields(base_config())) - set(_dotted_fields(c)))
    need(not missing, f"it lacks the fields {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; build it "
                      "from jaxcifar.config.base_config(), as configs/vgg.py does")
    need(c.model in models.MODEL_NAMES, f"model={c.model!r}; choose one of {', '.join(models.MODEL_NAMES)}")
    need(math.isfinite(c.width) and MIN_WIDTH <= c.width <= MAX_WIDTH,
         f"width={c.width} must be from {MIN_WIDTH} (one channel in the narrowest layer) to {MAX_WIDTH}")
    need(c.conv_impl in ("auto", *layers.CONV_IMPLS),
         f"conv_impl={c.conv_impl!r}; choose one of auto, {', '.join(layers.CONV_IMPLS)}")
    need(c.step_loop in ("auto", *backends.STEP_LOOPS),
         f"step_loop={c.step_loop!r}; choose one of auto, {', '.join(backends.STEP_LOOPS)}")
    need(c.pool_grad in ("auto", *layers.POOL_GRADS),
         f"pool_grad={c.pool_grad!r}; choose one of auto, {', '.join(layers.POOL_GRADS)}")
    need(c.bn_grad in ("auto", *layers.BN_GRADS), f"bn_grad={c.bn_grad!r}; choose one of auto, {', '.join(layers.BN_GRADS)}")
    need(c.dropout_bits in (0, *layers.DROPOUT_BITS), f"dropout_bits={c.dropout_bits}; choose 16, 32 or 0 (the backend's)")
    need(int(c.steps_per_call) == c.steps_per_call and c.steps_per_call >= 0,
         f"steps_per_call={c.steps_per_call} must be a positive integer, or 0 for the backend's")
    seed_list(c)
    need(c.dtype in DTYPES, f"dtype={c.dtype!r}; choose one of {', '.join(DTYPES)}")
    for field in ("batch_size", "eval_batch_size", "num_epochs", "num_classes", "log_every_steps",
                  "checkpoint_every_epochs", "keep_checkpoints"):
        need(int(c[field]) == c[field] and c[field] > 0, f"{field}={c[field]} must be a positive integer")
    need(math.isfinite(c.checkpoint_every_s) and c.checkpoint_every_s >= 0,
         f"checkpoint_every_s={c.checkpoint_every_s} must be a number of seconds >= 0 (0: every "
         "checkpoint_every_epochs epochs)")
    need(int(c.report_every_epochs) == c.report_every_epochs and c.report_every_epochs >= 0,
         f"report_every_epochs={c.report_every_epochs} must be an integer >= 0 (0: at the end and on a stop only)")
    need(c.num_classes == 10, f"num_classes={c.num_classes}; CIFAR-10 has 10 classes, so it must be 10")
    need(c.flip in augment.FLIP_MODES, f"flip={c.flip!r}; choose one of {', '.join(augment.FLIP_MODES)}")
    need(c.augment in augment.AUGMENTS, f"augment={c.augment!r}; choose one of {', '.join(augment.AUGMENTS)}")
    need(0 <= c.label_smoothing < 1, f"label_smoothing={c.label_smoothing} must be in [0, 1)")
    o = c.optimizer
    need(math.isfinite(o.learning_rate) and o.learning_rate > 0,
         f"optimizer.learning_rate={o.learning_rate} must be a positive number")
    need(0 <= o.momentum < 1, f"optimizer.momentum={o.momentum} must be in [0, 1)")
    need(o.dampening is None or 0 <= o.dampening <= 1,
         f"optimizer.dampening={o.dampening} must be in [0, 1], or unset for torch's default (the momentum)")
    for field in ("weight_decay", "learning_rate_decay"):  # inf passed, and failed as NaN half a minute later
        need(math.isfinite(o[field]) and o[field] >= 0, f"optimizer.{field}={o[field]} must be a number >= 0")
    need(int(o.epoch_step) == o.epoch_step and o.epoch_step > 0, f"optimizer.epoch_step={o.epoch_step} must be a positive integer")
    need(o.schedule in optim.SCHEDULES, f"optimizer.schedule={o.schedule!r}; choose one of {', '.join(optim.SCHEDULES)}")
    cache_dir = str(c.compile_cache_dir)
    need(cache_dir in ("", "none") or not os.path.exists(cache_dir) or os.path.isdir(cache_dir),
         f"compile_cache_dir={cache_dir!r} is not a folder (JAX would ignore it silently); give a folder, or 'none' "
         "to compile afresh every start")
    need(c.data.preprocess in preprocess.NORMALIZERS,
         f"data.preprocess={c.data.preprocess!r}; choose one of {', '.join(preprocess.NORMALIZERS)}")
