"""Fixtures and helpers shared by the test modules (which import the helpers from here, never from each other).

The fake dataset is prepared once per worker; one XLA compilation cache serves the whole session, subprocesses
included, so a program compiles once however many tests build it.
"""

import importlib.util
import os
import struct
import zlib
from pathlib import Path

# The suite compiles far more than it computes: XLA:CPU's backend at -O0 compiled a cold start of the tiny command
# line in 54 s instead of 107 s wall (73 -> 38 s CPU; measured with the machine loaded) and runs these small programs
# somewhat slower. Set before JAX starts; subprocesses inherit it. Every numerical comparison in the suite is
# between programs compiled the same way (the ISA flag of the AVX2 run is kept).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import numpy as np
import pytest

from jaxcifar.data import archive, fake_data, tfds_cifar10
from jaxcifar.run import trees
from jaxcifar.config import load_config_file

REPO = Path(__file__).resolve().parents[1]


# The files in the order xdist hands them to its two workers (pyproject: --dist loadfile --no-loadscope-reorder),
# longest first, so that the short ones fill the gaps at the end. xdist's own order (most tests first) started
# test_distributed.py, the longest file, among the last. Seconds per file in one run (AMD EPYC, 2 workers):
# distributed 174, train 200, train_resume 169, trainer_devices 91, models 89, trainer_replicas 88, fidelity 55,
# bench 51, signals 37, learning 32; files not named here follow in their own order.
FILE_ORDER = ("test_distributed.py", "test_train.py", "test_train_resume.py", "test_trainer_devices.py",
              "test_models.py", "test_trainer_replicas.py", "test_fidelity.py", "test_bench.py", "test_signals.py",
              "test_learning.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FILE_ORDER)))  # stable: a file keeps its own order


@pytest.fixture(scope="session")
def fake_archive(tmp_path_factory):
    """(archive, md5 file) of a small CIFAR-10-shaped archive: 5 x 40 train, 50 test images."""
    return fake_data.write_fake_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, fake_archive):
    """A tfds data dir with the fake archive prepared, and a cache dir; returns (data_dir, cache_dir, md5s, md5_file)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    md5s = archive.read_md5_file(fake_archive[1])
    tfds_cifar10.prepare(data_dir, str(fake_archive[0]), md5s)
    return data_dir, cache_dir, md5s, str(fake_archive[1])


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory):
    """The tiny config trained 3 epochs (for the reading tools: evaluate, predict, the report)."""
    from jaxcifar import train

    workdir = tmp_path_factory.mktemp("trained")
    train.train_and_evaluate(tiny_config(prepared, num_epochs=3), str(workdir))
    return workdir


@pytest.fixture(scope="session", autouse=True)
def _shared_compile_cache(tmp_path_factory):
    # One persistent XLA cache for the whole session, both xdist workers and every subprocess: each program
    # compiles once. (A worker's base temp is popen-gw<N> under the session's; the cache sits beside them.)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["JAXCIFAR_COMPILE_CACHE"] = str(shared / "xla")
    from jaxcifar import train

    train.enable_compile_cache("")  # tests that build a Trainer directly use it too


@pytest.fixture(autouse=True)
def _no_home_writes(tmp_path, monkeypatch):
    # Tests never touch the user's tfds folder or cache.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(tmp_path / "cache-default"))


# ---------------------------------------------------------------------------
# Configs and data


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(prepared, **overrides):
    """configs/tiny.py on the prepared fake dataset, 1 epoch unless overridden."""
    data_dir, cache_dir, _, md5_file = prepared
    c = load_config_file(REPO / "configs/tiny.py")
    c.num_epochs, c.log_every_steps = 1, 2
    c.data.data_dir, c.data.cache_dir, c.data.md5_file = data_dir, cache_dir, md5_file
    return set_fields(c, overrides)


def set_fields(config, fields: dict):
    """`config` with each dotted field of `fields` ("optimizer.learning_rate": 0.1) set; returns it."""
    for dotted, value in fields.items():
        target = config
        *path, last = dotted.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def import_torch():
    """torch, or a skip where it is not installed; with JAXCIFAR_REQUIRE_TORCH set (.ci/run) its absence fails."""
    if os.environ.get("JAXCIFAR_REQUIRE_TORCH"):
        import torch

        return torch
    return pytest.importorskip("torch", reason="PyTorch is not installed (the README's test command installs it)")


def with_devices(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` CPU devices, keeping the caller's flags (e.g. --xla_cpu_max_isa)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()


# ---------------------------------------------------------------------------
# Comparing and damaging saved runs


def assert_same_leaves(a, b):
    """Two trees with the same paths and bit-identical leaves."""
    fa, fb = trees.flat_dict(a), trees.flat_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def flip_bytes_in_largest_file(step_dir: Path, count: int = 8) -> None:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    blob = bytearray(largest.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 8 * count, 8):
        blob[i] ^= 0xFF
    largest.write_bytes(bytes(blob))


def damage_every_data_file(step_dir: Path) -> None:
    """64 bytes flipped across each of a save's data files: every array's bytes are hit."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            blob = bytearray(f.read_bytes())
            for i in range(0, len(blob), max(1, len(blob) // 64)):
                blob[i] ^= 0x5A
            f.write_bytes(bytes(blob))


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` pixels (Pillow decides from the header alone)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def mount_tmpfs(mount: Path, options: str):
    """Mounts a tmpfs with `options` (e.g. "size=3m", "ro") at `mount`, or skips where mounting is not allowed (it
    needs root); returns a function that unmounts it."""
    import subprocess

    mount.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    return lambda: subprocess.run(["umount", "-l", str(mount)], check=False)
