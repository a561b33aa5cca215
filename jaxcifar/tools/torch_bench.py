"""The benchmark's PyTorch side (the `torch` extra): the same networks (the fidelity port's), eager, channels_last,
on the device JAX runs on, timed as the JAX side is."""

from __future__ import annotations

from jaxcifar.tools.timing import time_passes, timed


def torch_device(jax_platform: str) -> str:
    """PyTorch runs where JAX runs: CUDA when JAX is on a GPU, else the CPU."""
    import torch

    if jax_platform == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("JAX runs on a GPU but this PyTorch has no CUDA; install a CUDA build of torch "
                               "or drop --compare-torch")
        return "cuda"
    return "cpu"


def bench_torch(model_name: str, batch: int, runs: int, threads: int, device: str = "cpu",
                dtype: str = "float32") -> dict:
    """PyTorch's eager step on `device`; on CUDA with cudnn.benchmark, each timed call ending in a synchronize."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from jaxcifar.fidelity import torch_port

    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as XLA's default precision
    model = torch_port.build_model(model_name).to(device=device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    *passes, step = torch_passes(model, x, y, device, dtype)
    seconds, _ = time_passes(*passes, runs)
    _, seconds["train step"] = timed(step, runs)
    return {"seconds": seconds, "images_per_s": batch / seconds["train step"], "version": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype}


def torch_passes(model, x, y, device: str, dtype: str):
    """Zero-argument callables, each synchronized: eval forward, training forward, forward and backward, SGD step."""
    import contextlib

    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    # bf16 as jaxcifar does it: convolutions and matmuls in bf16, parameters and BatchNorm in fp32.
    autocast = ((lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if dtype == "bfloat16"
                else contextlib.nullcontext)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(train: bool):
        model.train(train)
        with torch.no_grad(), autocast():
            out = model(x)
            if train:
                loss_fn(out, y)
        sync()

    def backward(update: bool):
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        loss.backward()
        if update:
            opt.step()
        sync()

    return (lambda: forward(False), lambda: forward(True), lambda: backward(False), lambda: backward(True))
