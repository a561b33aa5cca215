import os

import pytest

from jaxcifar import data, fake_data


@pytest.fixture(scope="session")
def fake_archive(tmp_path_factory):
    """(archive, md5 file) of a small CIFAR-10-shaped archive: 5 x 40 train, 50 test images."""
    return fake_data.write_fake_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, fake_archive):
    """A tfds data dir with the fake archive prepared, and a cache dir; returns (data_dir, cache_dir, md5s, md5_file)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    md5s = data.read_md5_file(fake_archive[1])
    data.prepare(data_dir, str(fake_archive[0]), md5s)
    return data_dir, cache_dir, md5s, str(fake_archive[1])


@pytest.fixture(scope="session", autouse=True)
def _shared_compile_cache(tmp_path_factory):
    # One persistent XLA cache for the whole session, subprocesses included: each program compiles once.
    os.environ["JAXCIFAR_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("xla"))
    from jaxcifar import train

    train.enable_compile_cache("")  # tests that build a Trainer directly use it too


@pytest.fixture(autouse=True)
def _no_home_writes(tmp_path, monkeypatch):
    # Tests never touch the user's tfds folder or cache.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))
    monkeypatch.setenv("JAXCIFAR_CACHE_DIR", str(tmp_path / "cache-default"))
