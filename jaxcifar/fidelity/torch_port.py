"""An independent PyTorch port of cifar.torch's recipe: the yardstick for jaxcifar's numerics.

It shares with the JAX side only the preprocessed arrays and the config's fields: its layouts are written from
the original's models/*.lua and its learning rates from train.lua and optim.sgd, so a mistake in the JAX side's
layout or schedule shows as a difference; everything random is its own (torch7 initialization drawn with torch's generator, the epoch's
order from `randperm`, BatchFlip's half, dropout masks), and so is every kernel. Optional:
`pip install torch`.

Recipe, as train.lua and torch7 run it: VGG-BN-Drop or NIN (BatchNorm eps 1e-3 after
convolutions, 1e-5 in the classifier, momentum 0.1, running variance unbiased), MSR-normal
convolution weights, zero conv biases, `nn.Linear`'s U(+-1/sqrt(fan_in)) for weight and bias,
BatchNorm weight U(0, 1); torch7 `optim.sgd` (weight decay on every parameter, the first
gradient copied into the momentum buffer, dampening = momentum unless set), the rate at every
step from `learning_rates`; label smoothing as the config says.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as tnn


# models/vgg_bn_drop.lua, in order: ConvBNReLU(in, out) with the Dropout added after it (None: none), and "pool" for
# MaxPooling(2,2,2,2):ceil(); then View(512) and the classifier (Dropout(0.5), Linear(512,512),
# BatchNormalization(512), ReLU, Dropout(0.5), Linear(512,10)).
VGG_BLOCKS = (
    (3, 64, 0.3), (64, 64, None), "pool",
    (64, 128, 0.4), (128, 128, None), "pool",
    (128, 256, 0.4), (256, 256, 0.4), (256, 256, None), "pool",
    (256, 512, 0.4), (512, 512, 0.4), (512, 512, None), "pool",
    (512, 512, 0.4), (512, 512, 0.4), (512, 512, None), "pool",
)
# models/nin.lua, in order: Block(in, out, k, k, 1, 1, pad, pad), "max" for SpatialMaxPooling(3,3,2,2):ceil() and
# "avg" for SpatialAveragePooling(3,3,2,2):ceil(), each followed by Dropout() (0.5); the last Block's 10 planes are
# the classes; then SpatialAveragePooling(8,8,1,1):ceil() and View(10).
NIN_BLOCKS = (
    (3, 192, 5, 2), (192, 160, 1, 0), (160, 96, 1, 0), "max",
    (96, 192, 5, 2), (192, 192, 1, 0), (192, 192, 1, 0), "avg",
    (192, 192, 3, 1), (192, 192, 1, 0), (192, 10, 1, 0),
)
MODELS = ("vgg_bn_drop", "nin")


def planes(n: int, width: float) -> int:
    """A layer's planes at the width multiplier (the recipes' 1; reduced widths for fidelity runs), at least one."""
    return max(1, int(round(n * width)))


def build_model(name: str, width: float = 1.0, num_classes: int = 10, batch_norm: bool = True,
                dropout: bool = True) -> tnn.Sequential:
    """cifar.torch's models/vgg_bn_drop.lua or models/nin.lua (NCHW), torch7-initialized."""
    if name == "vgg_bn_drop":
        return tnn.Sequential(*_vgg_layers(width, num_classes, batch_norm, dropout))
    if name == "nin":
        return tnn.Sequential(*_nin_layers(width, num_classes, batch_norm, dropout))
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def _block(cin, cout, k, pad, std, batch_norm):
    conv = tnn.Conv2d(cin, cout, k, 1, pad)
    tnn.init.normal_(conv.weight, 0.0, std)
    tnn.init.zeros_(conv.bias)
    layers = [conv]
    if batch_norm:
        layers.append(_bn(tnn.BatchNorm2d(cout, eps=1e-3)))
    return layers + [tnn.ReLU(inplace=True)]


def _vgg_layers(width, num_classes, batch_norm, dropout) -> list:
    layers, cin = [], 3
    for block in VGG_BLOCKS:
        if block == "pool":
            layers.append(tnn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        _, out, rate = block
        cout = planes(out, width)
        layers += _block(cin, cout, 3, 1, math.sqrt(2.0 / (9 * cout)), batch_norm)  # MSRinit: n = kW*kH*nOut
        if rate is not None and dropout:
            layers.append(tnn.Dropout(rate))
        cin = cout
    hidden = planes(512, width)
    drop = [tnn.Dropout(0.5)] if dropout else []
    layers += [tnn.Flatten(), *drop, _linear(cin, hidden)]
    if batch_norm:
        layers.append(_bn(tnn.BatchNorm1d(hidden, eps=1e-5)))
    return layers + [tnn.ReLU(inplace=True), *([tnn.Dropout(0.5)] if dropout else []), _linear(hidden, num_classes)]


def _nin_layers(width, num_classes, batch_norm, dropout) -> list:
    layers, cin = [], 3
    for i, block in enumerate(NIN_BLOCKS):
        if block in ("max", "avg"):
            layers.append((tnn.MaxPool2d if block == "max" else tnn.AvgPool2d)(3, 2, ceil_mode=True))
            if dropout:
                layers.append(tnn.Dropout(0.5))
            continue
        _, out, k, pad = block
        cout = num_classes if i == len(NIN_BLOCKS) - 1 else planes(out, width)
        layers += _block(cin, cout, k, pad, 0.05, batch_norm)
        cin = cout
    return layers + [tnn.AvgPool2d(8, 1, ceil_mode=True), tnn.Flatten()]


def _bn(bn):
    tnn.init.uniform_(bn.weight, 0.0, 1.0)
    tnn.init.zeros_(bn.bias)
    return bn


def _linear(fan_in: int, out: int) -> tnn.Linear:
    lin = tnn.Linear(fan_in, out)
    bound = 1.0 / math.sqrt(fan_in)
    tnn.init.uniform_(lin.weight, -bound, bound)
    tnn.init.uniform_(lin.bias, -bound, bound)
    return lin


ONECYCLE_WARMUP = 0.15  # configs/vgg_fast.py: a linear warm-up over 15 % of the steps


def learning_rates(config, steps_per_epoch: int) -> np.ndarray:
    """The rate of every update of the run, from the config's fields: train.lua halves `learningRate` at the start
    of every `epoch_step`-th epoch, and torch7's optim.sgd divides it by 1 + evalCounter * learningRateDecay; the
    cosine and one-cycle schedules span the run."""
    o = config.optimizer
    total = steps_per_epoch * config.num_epochs
    count = np.arange(total, dtype=np.float64)  # evalCounter before each update
    progress = np.clip(count / total, 0.0, 1.0)
    if o.schedule == "torch_step":
        base = o.learning_rate * 0.5 ** ((count // steps_per_epoch + 1) // o.epoch_step)
    elif o.schedule == "cosine":
        base = o.learning_rate * 0.5 * (1 + np.cos(np.pi * progress))
    elif o.schedule == "onecycle":
        w = ONECYCLE_WARMUP
        base = o.learning_rate * np.where(progress < w, progress / w, (1 - progress) / (1 - w))
    else:
        raise ValueError(f"unknown schedule {o.schedule!r}")
    return base / (1 + count * o.learning_rate_decay)


class TorchRun:
    """One training run of `config` in PyTorch on preprocessed NHWC float32 arrays."""

    def __init__(self, config, train_images: np.ndarray, train_labels: np.ndarray, seed: int, stream=None):
        """`stream`, for bisection: an object with `order(epoch)` -> (steps, batch) indices and `flips(step)` ->
        (batch,) bools, replacing this port's own data order and BatchFlip draws (dropout stays its own)."""
        torch.manual_seed(seed)
        self.stream = stream
        self.config = config
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.model = build_model(config.model, config.width, config.num_classes, config.batch_norm, config.dropout)
        o = config.optimizer
        damp = o.momentum if o.dampening is None else o.dampening
        # torch.optim.SGD is torch7's optim.sgd: decay added to the gradient, the first gradient copied.
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=o.momentum, dampening=damp,
                                   weight_decay=o.weight_decay)
        self.loss_fn = tnn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.images = torch.from_numpy(np.ascontiguousarray(train_images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(train_labels.astype(np.int64))
        self.flip = config.flip
        # augment.AUGMENTS, mirrored: "crop_flip" pads by 4 zeros and keeps a random window of each image
        self.crop_padding = {"flip": 0, "crop_flip": 4}[config.augment]
        self.steps_per_epoch = len(train_labels) // config.batch_size
        self.lr = learning_rates(config, self.steps_per_epoch)
        self.step = 0

    def _flip_mask(self, batch: int) -> torch.Tensor:
        if self.flip == "batchflip":  # train.lua's BatchFlip: randperm(bs):le(bs/2) ... exactly half
            return torch.randperm(batch, generator=self.generator) < batch // 2
        if self.flip == "independent":
            return torch.rand(batch, generator=self.generator) < 0.5
        return torch.zeros(batch, dtype=torch.bool)

    def crop_offsets(self, batch: int) -> torch.Tensor:
        if self.stream is not None:
            return torch.tensor(np.asarray(self.stream.crops(self.step), np.int64))
        return torch.randint(0, 2 * self.crop_padding + 1, (batch, 2), generator=self.generator)

    def augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Random crops (when the recipe has them), then flips: jaxcifar.nn.augment's recipe, NCHW."""
        b, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = tnn.functional.pad(x, (p, p, p, p))
            at = self.crop_offsets(b)
            x = torch.stack([padded[i, :, r:r + h, c:c + w] for i, (r, c) in enumerate(at.tolist())])
        mask = self._flip_mask(b) if self.stream is None else torch.tensor(np.asarray(self.stream.flips(self.step)))
        return torch.where(mask[:, None, None, None], x.flip(3), x)

    def train_epoch(self) -> dict:
        """One epoch in train mode; (mean loss, accuracy %) of the training forwards, as train.lua reports."""
        self.model.train()
        b = self.config.batch_size
        if self.stream is None:
            order = torch.randperm(len(self.labels), generator=self.generator)[: self.steps_per_epoch * b]
            order = order.view(self.steps_per_epoch, b)
        else:
            order = torch.tensor(np.asarray(self.stream.order(self.step // self.steps_per_epoch + 1), np.int64))
        loss_sum, correct = 0.0, 0
        for idx in order:
            x, y = self.augment_batch(self.images[idx]), self.labels[idx]
            for group in self.opt.param_groups:
                group["lr"] = float(self.lr[self.step])
            self.opt.zero_grad(set_to_none=True)
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
            loss.backward()
            self.opt.step()
            self.step += 1
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == y).sum())
        return {"loss": loss_sum / self.steps_per_epoch, "accuracy": 100.0 * correct / (self.steps_per_epoch * b)}

    def load_flax(self, params: dict, batch_stats: dict) -> None:
        load_flax(self.model, params, batch_stats)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs to continue bit-identically, as plain arrays (saved as npz, no pickle):
        weights and BatchNorm buffers, momentum buffers, the step, and both random generators (this port's
        order and flips, torch's global one for dropout)."""
        out = {f"model/{k}": v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
        for i, p in enumerate(self.model.parameters()):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum/{i}"] = buf.detach().numpy().copy()
        out["step"] = np.array(self.step, np.int64)
        out["rng/generator"] = self.generator.get_state().numpy().copy()
        out["rng/global"] = torch.get_rng_state().numpy().copy()
        return out

    def load_state_arrays(self, arrays) -> None:
        """The inverse of `state_arrays` (on a Run built with the same config and seed)."""
        load_model_arrays(self.model, arrays)
        for i, p in enumerate(self.model.parameters()):
            key = f"momentum/{i}"
            if key in arrays:
                self.opt.state[p]["momentum_buffer"] = torch.from_numpy(np.array(arrays[key]))
        self.step = int(arrays["step"])
        self.generator.set_state(torch.from_numpy(np.array(arrays["rng/generator"])))
        torch.set_rng_state(torch.from_numpy(np.array(arrays["rng/global"])))

    @torch.no_grad()
    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
        """Eval-mode (running BatchNorm statistics, no dropout) accuracy in %."""
        self.model.eval()
        correct = 0
        for s in range(0, len(labels), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch].transpose(0, 3, 1, 2)))
            correct += int((self.model(x).argmax(1).numpy() == labels[s:s + batch]).sum())
        return 100.0 * correct / len(labels)

    @torch.no_grad()
    def recompute_bn_accuracy(self, images: np.ndarray, labels: np.ndarray, num_batches: int, seed: int = 0) -> float:
        """Eval accuracy with BatchNorm statistics re-estimated from `num_batches` training batches, dropout off.

        The model's own statistics are restored afterwards.
        """
        bns = [m for m in self.model.modules() if isinstance(m, tnn.modules.batchnorm._BatchNorm)]
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in bns]
        b = self.config.batch_size
        idx = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed))[: num_batches * b]
        self.model.eval()
        for m in bns:  # cumulative average of the batches' statistics
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for chunk in idx.view(num_batches, b):
            self.model(self.images[chunk])
        acc = self.accuracy(images, labels)
        for m, (mean, var, momentum) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.momentum = momentum
        return acc



def load_model_arrays(model: tnn.Module, arrays) -> None:
    """The weights and BatchNorm buffers of `Run.state_arrays` into `model` (built with the same config)."""
    state = {k[len("model/"):]: torch.from_numpy(np.array(arrays[k])) for k in arrays if k.startswith("model/")}
    model.load_state_dict(state, strict=True)


@torch.no_grad()
def load_flax(model: tnn.Sequential, params: dict, batch_stats: dict) -> None:
    """Copies a jaxcifar model's variables (same architecture and width) into this one."""
    layers = [m for m in model.modules()
              if isinstance(m, (tnn.Conv2d, tnn.Linear, tnn.modules.batchnorm._BatchNorm))]
    flax_layers = flax_layer_order(params, batch_stats)
    if len(flax_layers) != len(layers):
        raise ValueError(f"{len(flax_layers)} flax layers for {len(layers)} torch layers: not the same model")
    for (p, st), layer in zip(flax_layers, layers):
        if isinstance(layer, tnn.modules.batchnorm._BatchNorm):
            layer.weight.copy_(torch.tensor(np.asarray(p["scale"])))
            layer.bias.copy_(torch.tensor(np.asarray(p["bias"])))
            layer.running_mean.copy_(torch.tensor(np.asarray(st["mean"])))
            layer.running_var.copy_(torch.tensor(np.asarray(st["var"])))
        else:
            kernel = np.asarray(p["kernel"])  # HWIO -> OIHW; (in, out) -> (out, in)
            w = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            layer.bias.copy_(torch.tensor(np.asarray(p["bias"])))


def flax_layer_order(params: dict, batch_stats: dict) -> list[tuple[dict, dict]]:
    """(params, batch_stats) of each weighted flax layer in forward order (jax sorts dict keys by name)."""
    def index(name):
        return int(name.rpartition("_")[2])

    out = []
    for block in sorted((k for k in params if k.startswith("ConvBNReLU_")), key=index):
        out.append((params[block]["Conv_0"], {}))
        if "TorchBatchNorm_0" in params[block]:
            out.append((params[block]["TorchBatchNorm_0"], batch_stats[block]["TorchBatchNorm_0"]))
    # the classifier: Dense_0, TorchBatchNorm_0, Dense_1 (a Dense precedes the BatchNorm of the same index)
    head = sorted((k for k in params if not k.startswith("ConvBNReLU_")),
                  key=lambda k: (index(k), not k.startswith("Dense_")))
    out += [(params[k], batch_stats.get(k, {})) for k in head]
    return out
