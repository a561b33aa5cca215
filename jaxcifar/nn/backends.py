"""The train step's build on each backend, in one place: the table of step choices (resolving a config's "auto"
fields), and the compiler options of every `jax.jit` of the models. Every alternative computes the same function
(tests/test_models.py, tests/test_train.py); only speed differs.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

STEP_LOOPS = ("unroll", "scan")

# How the train step is built on each backend: the one place where a backend changes the program.
# cpu (Xeon Sapphire Rapids / EPYC Zen 4, 2 cores, jax 0.10; bench in results/bench-cpu.json):
#   steps_per_call 4, unroll: XLA:CPU zero-fills a call's temporaries page by page on every call; 4 steps per
#     call pay that once. Under lax.scan its convolution gradients leave Eigen for a naive loop: 25-50x slower.
#   conv_impl small: XLA:CPU's convolution is ~40x slower than a matmul on 2x2 maps and for 1x1 kernels.
#   pool_grad first_max: torch's tie rule on unit-stride views; a gradient splitting ties (jnp.max) cost VGG's
#     32x32 pooling 7x the time. `bench --step-variants` (VGG, batch 8, one run each, Sapphire Rapids):
#     default 0.157 s/step, pool_grad=xla 0.166, bn_grad=autodiff 0.196, conv_impl=xla 0.595, whole-epoch scan 3.7.
#   bn_grad closed_form: 3-6 % of a step (less memory traffic than autodiff's chain).
#   dropout_bits 16: random bits are dropout's largest cost on CPU; 16-bit draws halve them.
# gpu: PROVISIONAL, the CPU's choices except where the reason is XLA:CPU's alone. With them, one H200 (jax 0.11.2,
#   VGG, batch 128, fp32; results/bench-gpu.json) takes 2.97 ms a step, the loop around the steps 39 % of an epoch.
#   The alternatives are not timed there yet: `python -m jaxcifar.bench --step-variants` times each (scripts/gpu_run.sh
#   runs the benchmark only as a tail, after the table's runs); replace these entries with what it measures.
STEP_CHOICES = {
    "cpu": {"steps_per_call": 4, "step_loop": "unroll", "conv_impl": "small", "pool_grad": "first_max",
            "bn_grad": "closed_form", "dropout_bits": 16},
    "gpu": {"steps_per_call": 4, "step_loop": "unroll", "conv_impl": "xla", "pool_grad": "first_max",
            "bn_grad": "closed_form", "dropout_bits": 16},
}
STEP_FIELDS = tuple(STEP_CHOICES["cpu"])


def step_choices(config, backend: str | None = None) -> dict:
    """The config's step fields with 0 / "auto" replaced by `backend`'s (default: JAX's) entry of STEP_CHOICES."""
    if backend is None:
        backend = jax.default_backend()
    table = STEP_CHOICES[backend_row(backend)]
    return {k: table[k] if config[k] in (0, "auto") else config[k] for k in STEP_FIELDS}


def backend_row(backend: str) -> str:
    """The STEP_CHOICES row of a JAX backend name ("cpu", "gpu", "cuda", "rocm", ...)."""
    return "cpu" if backend == "cpu" else "gpu"


# XLA:CPU hands convolutions to YNNPACK by default, whose kernels run this project's layers
# 2-3x slower than XLA's own (Eigen) convolutions, weight gradients above all (3x3, 64->64 on
# 32x32 maps: 268 vs 91 ms). Dots and reductions stay with YNNPACK, which is faster for them.
CPU_LIBRARY_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.cache
def compiler_options(backend: str | None = None) -> dict | None:
    """Options for every `jax.jit` of the models: on CPU, convolutions compiled by XLA, not YNNPACK."""
    if (backend or jax.default_backend()) != "cpu":
        return None
    options = {"xla_cpu_experimental_ynn_fusion_type": CPU_LIBRARY_FUSIONS}
    try:  # a jaxlib without this option keeps its defaults: slower, still correct
        jax.jit(lambda a: a + 1, compiler_options=options)(jnp.zeros(()))
    except jax.errors.JaxRuntimeError as e:
        warnings.warn(f"XLA:CPU convolution backend left at its default ({e}); training will be slower")
        return None
    return options
