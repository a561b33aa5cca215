"""The seed recipe as an ml_collections config, and the checks run before anything compiles."""

from __future__ import annotations

import ml_collections

from jaxcifar import models, optim, preprocess

FLIP_MODES = ("batchflip", "independent", "none")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    """cifar.torch's train.lua defaults: VGG-BN-Drop, batch 128, 300 epochs, lr 1 halved every 25."""
    c = ml_collections.ConfigDict()
    c.model = "vgg_bn_drop"  # or "nin"
    c.width = 1.0  # channel multiplier (small values for fast tests)
    c.batch_norm = True
    c.dropout = True
    c.conv_impl = "auto"  # "auto": convolutions on tiny maps as matmuls on CPU; "xla"; "matmul"
    c.dtype = "float32"  # "bfloat16": convolutions and matmuls in bf16, parameters and BN statistics fp32
    c.num_classes = 10

    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 300
    c.seed = 0
    c.flip = "batchflip"  # train.lua's BatchFlip: exactly half of each batch mirrored
    c.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1.0
    c.optimizer.momentum = 0.9
    c.optimizer.dampening = -1.0  # negative: torch's default, the momentum
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
    c.steps_per_call = 4  # train steps per compiled call (XLA:CPU re-allocates a call's buffers each time)
    c.log_every_steps = 20  # progress bar and NaN check cadence (each one syncs with the device)
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 3
    return c


def nin_config() -> ml_collections.ConfigDict:
    """cifar.torch's models/nin.lua with the same training recipe."""
    c = base_config()
    c.model = "nin"
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and the fix for a config that cannot train."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"bad config: {msg}")

    need(c.model in models.MODEL_NAMES, f"model={c.model!r}; choose one of {', '.join(models.MODEL_NAMES)}")
    need(c.width > 0, f"width={c.width} must be positive")
    need(c.conv_impl in models.CONV_IMPLS, f"conv_impl={c.conv_impl!r}; choose one of {', '.join(models.CONV_IMPLS)}")
    need(c.dtype in DTYPES, f"dtype={c.dtype!r}; choose one of {', '.join(DTYPES)}")
    for field in ("batch_size", "eval_batch_size", "num_epochs", "num_classes", "steps_per_call", "log_every_steps",
                  "checkpoint_every_epochs", "keep_checkpoints"):
        need(int(c[field]) == c[field] and c[field] > 0, f"{field}={c[field]} must be a positive integer")
    need(c.flip in FLIP_MODES, f"flip={c.flip!r}; choose one of {', '.join(FLIP_MODES)}")
    need(0 <= c.label_smoothing < 1, f"label_smoothing={c.label_smoothing} must be in [0, 1)")
    o = c.optimizer
    need(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be positive")
    need(0 <= o.momentum < 1, f"optimizer.momentum={o.momentum} must be in [0, 1)")
    need(o.weight_decay >= 0 and o.learning_rate_decay >= 0, "optimizer weight_decay and learning_rate_decay must be >= 0")
    need(int(o.epoch_step) == o.epoch_step and o.epoch_step > 0, f"optimizer.epoch_step={o.epoch_step} must be a positive integer")
    need(o.schedule in optim.SCHEDULES, f"optimizer.schedule={o.schedule!r}; choose one of {', '.join(optim.SCHEDULES)}")
    need(c.data.preprocess in preprocess.NORMALIZERS,
         f"data.preprocess={c.data.preprocess!r}; choose one of {', '.join(preprocess.NORMALIZERS)}")
