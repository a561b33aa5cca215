import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar.data import archive as archive_lib, cache, tfds_cifar10
from jaxcifar.nn import augment, batches
from jaxcifar import errors, prepare


def test_good_archive_verifies(fake_archive):
    archive, md5_file = fake_archive
    members = archive_lib.read_archive(archive, archive_lib.read_md5_file(md5_file))
    images, labels = archive_lib.parse_batches(members[f] for f in archive_lib.TRAIN_FILES)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert set(labels) == set(range(10))


def test_extracted_folder_is_accepted(fake_archive, tmp_path):
    archive, md5_file = fake_archive
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    for folder in (tmp_path, tmp_path / archive_lib.ARCHIVE_PREFIX):
        assert len(archive_lib.read_archive(folder, archive_lib.read_md5_file(md5_file))) == 7


def test_official_sums_reject_a_fake_archive(fake_archive):
    with pytest.raises(errors.DataError, match=r"data_batch_1.bin .* has MD5 [0-9a-f]{32}, expected 5dd7e06a"):
        archive_lib.read_archive(fake_archive[0])


def test_truncated_archive(fake_archive, tmp_path):
    blob = fake_archive[0].read_bytes()
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(errors.DataError, match="truncated or not a valid tar.gz"):
        archive_lib.read_archive(bad, archive_lib.read_md5_file(fake_archive[1]))


def test_missing_member(fake_archive, tmp_path):
    src, md5_file = fake_archive
    bad = tmp_path / "missing.tar.gz"
    with tarfile.open(src) as tin, tarfile.open(bad, "w:gz") as tout:
        for info in tin:
            if not info.name.endswith("test_batch.bin"):
                tout.addfile(info, tin.extractfile(info))
    with pytest.raises(errors.DataError, match="no member cifar-10-batches-bin/test_batch.bin"):
        archive_lib.read_archive(bad, archive_lib.read_md5_file(md5_file))


def test_unreadable_and_absent_paths(tmp_path, fake_archive):
    with pytest.raises(errors.DataError, match="does not exist"):
        archive_lib.read_archive(tmp_path / "nope.tar.gz")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.tar.gz"
        shutil.copy(fake_archive[0], locked)
        locked.chmod(0)
        with pytest.raises(errors.DataError, match="cannot read"):
            archive_lib.read_archive(locked)


def test_offline_without_archive_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_cifar10, "DOWNLOAD_HOST", ("127.0.0.1", 9))  # nothing listens: the probe fails at once
    t0 = time.time()
    with pytest.raises(errors.DataError, match=r"--archive /path/to/cifar-10-binary.tar.gz"):
        tfds_cifar10.prepare(str(tmp_path / "tfds"))
    assert time.time() - t0 < 15


def test_failed_prepare_leaves_no_partial_dataset(tmp_path, fake_archive):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(fake_archive[0].read_bytes()[:5000])
    with pytest.raises(errors.DataError):
        tfds_cifar10.prepare(str(tmp_path / "tfds"), str(bad), archive_lib.read_md5_file(fake_archive[1]))
    leftovers = list((tmp_path / "tfds").rglob("*")) if (tmp_path / "tfds").exists() else []
    assert not [p for p in leftovers if p.is_file()]


def test_prepare_cli_reports_split_sizes(tmp_path, fake_archive, capsys):
    rc = prepare.main(["--archive", str(fake_archive[0]), "--md5-file", str(fake_archive[1]),
                    "--data-dir", str(tmp_path / "tfds")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train: 200 images" in out and "test: 50 images" in out
    assert "airplane 20" in out and "airplane 5" in out


def test_preparing_and_reading_leave_nothing_in_the_temp_folder(tmp_path, fake_archive, monkeypatch):
    # tfds makes an empty temp folder each time a builder is made for an unprepared folder, and keeps it.
    scratch = tmp_path / "system-temp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data_dir = str(tmp_path / "tfds")
    tfds_cifar10.prepare(data_dir, str(fake_archive[0]), archive_lib.read_md5_file(fake_archive[1]))
    tfds_cifar10.load_uint8(data_dir)
    assert list(scratch.iterdir()) == []


def test_prepare_cli_error_is_one_line(tmp_path, capsys):
    rc = prepare.main(["--archive", str(tmp_path / "missing.tar.gz"), "--data-dir", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err


def test_tfds_roundtrip_preserves_images(prepared, fake_archive):
    data_dir, _, md5s, _ = prepared
    raw = tfds_cifar10.load_uint8(data_dir)
    members = archive_lib.read_archive(fake_archive[0], md5s)
    want_images, want_labels = archive_lib.parse_batches(members[f] for f in archive_lib.TRAIN_FILES)
    # tfds stores its own (deterministic) order: compare as multisets keyed by bytes
    got = sorted(zip(raw["train_labels"].tolist(), (im.tobytes() for im in raw["train_images"])))
    want = sorted(zip(want_labels.tolist(), (im.tobytes() for im in want_images)))
    assert got == want
    assert raw["test_images"].shape == (50, 32, 32, 3)


def test_cache_is_reused_and_corruption_rebuilt(prepared, capsys, tmp_path):
    data_dir, _, md5s, _ = prepared
    cache_dir = str(tmp_path / "cache")
    messages = []
    first = cache.load_preprocessed(data_dir, cache_dir, md5s=md5s, log=messages.append)
    assert any("preprocessing" in m for m in messages)
    messages.clear()
    second = cache.load_preprocessed(data_dir, cache_dir, md5s=md5s, log=messages.append)
    assert any("loaded preprocessed" in m for m in messages)
    np.testing.assert_array_equal(first.train_images, second.train_images)
    assert first.stats == second.stats
    # flip bytes inside the cached training images: detected, rebuilt, never trusted
    (folder,) = [p for p in os.scandir(cache_dir) if p.is_symlink()]  # the cache's name links to its version
    path = os.path.join(folder.path, "train_images.npy")
    with open(path, "r+b") as f:
        f.seek(4000)
        f.write(b"\xff" * 64)
    messages.clear()
    third = cache.load_preprocessed(data_dir, cache_dir, md5s=md5s, log=messages.append)
    assert "corrupt" in capsys.readouterr().err
    assert any("preprocessing" in m for m in messages)
    np.testing.assert_array_equal(first.train_images, third.train_images)
    assert len(os.listdir(cache_dir)) == 2  # the link and the one version it names: nothing left behind


def test_cache_is_npy_and_json_only_and_loads_without_pickle(prepared, tmp_path):
    data_dir, _, md5s, _ = prepared
    cache_dir = tmp_path / "cache"
    cache.load_preprocessed(data_dir, str(cache_dir), md5s=md5s, log=lambda m: None)
    files = sorted(p for p in cache_dir.rglob("*") if p.is_file())
    assert sorted(p.name for p in files) == sorted([f"{a}.npy" for a in ("train_images", "train_labels",
                                                                         "test_images", "test_labels")]
                                                   + ["manifest.json"])
    for path in files:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)  # an object array (pickled) would raise here
            assert array.dtype != object and array.size > 0
        else:
            json.loads(path.read_text())


def test_epoch_order_is_a_function_of_seed_and_epoch():
    key = jax.random.key(0)
    a = batches.epoch_batch_indices(key, 3, 1000, 128)
    b = batches.epoch_batch_indices(key, 3, 1000, 128)
    c = batches.epoch_batch_indices(key, 4, 1000, 128)
    d = batches.epoch_batch_indices(jax.random.key(1), 3, 1000, 128)
    assert a.shape == (7, 128)  # 1000 // 128 full batches, the partial one dropped
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert len(set(np.asarray(a).ravel().tolist())) == 7 * 128  # no repeats within an epoch


@pytest.mark.parametrize("batch", [128, 7])
def test_batchflip_mirrors_exactly_half(batch):
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 4, 5, 3)).astype(np.float32))
    labels = jnp.arange(batch)
    idx = jnp.arange(batch)
    counts = []
    for seed in range(5):
        x, y = batches.gather_batch(images, labels, idx)
        x = augment.augment(x, jax.random.key(seed), augment.Augment("batchflip"))
        flipped = np.array([np.array_equal(x[i], images[i, :, ::-1]) for i in range(batch)])
        unchanged = np.array([np.array_equal(x[i], images[i]) for i in range(batch)])
        assert np.all(flipped ^ unchanged)
        counts.append(flipped.sum())
        np.testing.assert_array_equal(y, labels)
    assert all(c == batch // 2 for c in counts)


def test_independent_flips_and_no_flips():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(256, 2, 3, 1)).astype(np.float32))
    idx = jnp.arange(256)
    counts = set()
    for seed in range(4):
        x = augment.augment(images[idx], jax.random.key(seed), augment.Augment("independent"))
        counts.add(sum(np.array_equal(x[i], images[i, :, ::-1]) for i in range(256)))
    assert all(80 < n < 176 for n in counts) and len(counts) > 1  # binomial(256, 1/2), not forced to half
    x = augment.augment(images[idx], jax.random.key(0), augment.Augment("none"))
    np.testing.assert_array_equal(x, images)


def test_random_crops_keep_a_window_of_each_zero_padded_image_and_leave_the_flips_as_they_were():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype(np.float32))
    crop = augment.Augment("none", crop_padding=4)
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = set()
    for seed in range(3):
        x = np.asarray(augment.augment(images, jax.random.key(seed), crop))
        for i in range(64):
            windows = [(r, c) for r in range(9) for c in range(9) if np.array_equal(x[i], padded[i, r:r + 8, c:c + 8])]
            assert windows, f"image {i} is not a window of its padded copy"
            offsets.add(windows[0])
    assert len(offsets) > 40  # offsets spread over the 9 x 9 possible windows, not a fixed one
    # Crops draw from their own stream: the same key flips the same images with or without them.
    flips = augment.Augment("batchflip")
    key = jax.random.key(7)
    plain = np.asarray(augment.augment(images, key, flips))
    mirrored = [not np.array_equal(plain[i], np.asarray(images)[i]) for i in range(64)]
    both = np.asarray(augment.augment(images, key, augment.Augment("batchflip", crop_padding=4)))
    unflipped = np.asarray(augment.augment(images, key, crop))
    assert [not np.array_equal(both[i], unflipped[i]) for i in range(64)] == mirrored


def test_the_config_resolves_its_augmentation_once():
    from jaxcifar import config as config_lib

    c = config_lib.base_config()
    assert augment.Augment.of_config(c) == augment.Augment("batchflip", 0)  # the seed's recipe: flips only
    c.augment, c.flip = "crop_flip", "independent"
    assert augment.Augment.of_config(c) == augment.Augment("independent", 4)


def test_eval_batches_cover_every_example_once():
    for n, b in [(10_000, 500), (10_000, 128), (50, 64), (7, 3)]:
        idx, valid = batches.eval_batches(n, b)
        seen = idx[valid]
        assert sorted(seen.tolist()) == list(range(n))


# ---------------------------------------------------------------------------
# Damaged inputs: one line that names the problem and the fix


def test_an_md5_list_that_is_not_text_is_named_as_such(fake_archive, capsys, tmp_path):
    binary = tmp_path / "sums.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(errors.DataError, match="is not an MD5 list .*not text"):
        archive_lib.read_md5_file(binary)
    with pytest.raises(errors.DataError, match=r"too large for a list of MD5s \(an archive\?\)"):
        archive_lib.read_md5_file(fake_archive[0])  # the archive given in the list's place
    assert prepare.main(["--archive", str(fake_archive[0]), "--md5-file", str(fake_archive[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "too large for a list of MD5s" in err


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 40])
def test_an_empty_or_random_archive_is_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(content)
    assert prepare.main(["--archive", str(bad), "--data-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is truncated or not a valid tar.gz" in err, err


def _flip_in_train_records(data_dir: str) -> None:
    (train_file,) = [p for p in (Path(data_dir) / "cifar10").rglob("*train.array_record*")]
    blob = bytearray(train_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    train_file.write_bytes(bytes(blob))


def test_a_damaged_prepared_dataset_is_named_then_prepared_again_from_the_archive(fake_archive, tmp_path, capsys):
    archive, md5_file = map(str, fake_archive)
    md5s = archive_lib.read_md5_file(md5_file)
    data_dir, cache_dir = str(tmp_path / "tfds"), str(tmp_path / "cache")
    tfds_cifar10.prepare(data_dir, archive, md5s)
    good = tfds_cifar10.load_uint8(data_dir)
    _flip_in_train_records(data_dir)
    with pytest.raises(errors.DataError, match=r"the prepared dataset in \S+ is damaged .*prepare --force --archive") as e:
        cache.load_preprocessed(data_dir, cache_dir, md5s=md5s, log=lambda m: None)
    assert "\n" not in str(e.value)
    # with the archive known, it is moved aside (kept) and prepared again
    messages = []
    again = cache.load_preprocessed(data_dir, cache_dir, archive=archive, md5s=md5s, log=messages.append)
    assert any("is damaged" in m and "moved it to" in m for m in messages), messages
    np.testing.assert_array_equal(tfds_cifar10.load_uint8(data_dir)["train_images"], good["train_images"])
    assert len(again.train_labels) == 200
    (aside,) = (tmp_path / "tfds" / "cifar10-set-aside").iterdir()
    # the command line does the same on request
    _flip_in_train_records(data_dir)
    assert prepare.main(["--force", "--archive", archive, "--md5-file", md5_file, "--data-dir", data_dir]) == 0
    assert "moved the prepared dataset to" in capsys.readouterr().out
    np.testing.assert_array_equal(tfds_cifar10.load_uint8(data_dir)["train_images"], good["train_images"])
    assert len(list((tmp_path / "tfds" / "cifar10-set-aside").iterdir())) == 2


def test_the_cache_is_replaced_without_a_moment_without_one(prepared, tmp_path, monkeypatch):
    data_dir, _, md5s, _ = prepared
    cache_dir = tmp_path / "cache"
    first = cache.load_preprocessed(data_dir, str(cache_dir), md5s=md5s, log=lambda m: None)
    (folder,) = [p for p in cache_dir.iterdir() if p.is_symlink()]
    seen = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def check(*args, **kwargs):  # at every step of the rewrite, a reader finds a whole cache
        seen.append(cache.read_cache(folder, first.fingerprint) is not None)

    monkeypatch.setattr(cache.os, "replace", lambda *a: (check(), real_replace(*a))[1])
    monkeypatch.setattr(cache.shutil, "rmtree", lambda *a, **k: (check(), real_rmtree(*a, **k))[1])
    cache.write_cache(folder, first)
    check()
    assert seen and all(seen), seen


def test_a_given_archive_that_does_not_exist_is_an_error_even_when_prepared(prepared, capsys):
    data_dir, _, _, md5_file = prepared
    rc = prepare.main(["--archive", "/nonexistent.tar.gz", "--data-dir", data_dir, "--md5-file", md5_file])
    assert rc == 2 and "/nonexistent.tar.gz does not exist" in capsys.readouterr().err


def test_a_prepared_set_is_checked_against_the_expected_archive(prepared, capsys):
    data_dir, _, _, md5_file = prepared
    assert prepare.main(["--data-dir", data_dir]) == 2  # the official set expected, a fake one prepared
    err = capsys.readouterr().err
    assert "another archive than the official CIFAR-10 archive" in err and "200 train / 50 test images" in err
    assert prepare.main(["--data-dir", data_dir, "--md5-file", md5_file]) == 0
    assert "NOT the official CIFAR-10" in capsys.readouterr().out


def test_an_md5_file_line_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "sums.md5"
    bad.write_text(f"{'0' * 32}  data_batch_1.bin\nnot-a-digest\n")
    assert prepare.main(["--md5-file", str(bad), "--data-dir", str(tmp_path / "tfds")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2: 'not-a-digest'" in err and "Traceback" not in err


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_cache_version_whose_writer_died_is_removed_on_the_next_load(prepared, tmp_path):
    data_dir, _, md5s, _ = prepared
    said = []
    cache.load_preprocessed(data_dir, str(tmp_path), md5s=md5s, log=said.append)  # writes the cache
    (current,) = [p for p in tmp_path.iterdir() if p.is_symlink()]
    orphan = tmp_path / f"{current.name}.version-{_dead_pid()}-x1y2"  # as a kill during the write leaves it
    orphan.mkdir()
    (orphan / "train_images.npy").write_bytes(b"\0" * 1000)
    alive = tmp_path / f"{current.name}.version-{os.getpid()}-z3"  # a writer still at work: left alone
    alive.mkdir()
    said.clear()
    cache.load_preprocessed(data_dir, str(tmp_path), md5s=md5s, log=said.append)
    assert not orphan.exists() and alive.exists() and current.resolve().is_dir()
    assert f"removed {orphan}, a preprocessed cache whose writing was stopped before its end" in said


def test_preparers_of_one_folder_wait_for_each_other_and_clean_a_killed_ones_leftovers(tmp_path, fake_archive):
    import fcntl
    import subprocess
    import sys

    archive, md5_file = fake_archive
    folder = tmp_path / "tfds" / "cifar10"
    folder.mkdir(parents=True)
    (folder / "incomplete.ABC123_3.0.2").mkdir()  # as a killed preparation leaves it
    cmd = [sys.executable, "-m", "jaxcifar.prepare", "--data-dir", str(tmp_path / "tfds"),
           "--archive", str(archive), "--md5-file", str(md5_file)]
    with open(folder / ".jaxcifar-prepare.lock", "a") as held:  # a preparer at work
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        for proc in procs:
            assert "waiting for it" in proc.stdout.readline()
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sum("preparing CIFAR-10 in" in out for out in outputs) == 1  # the other adopted its result
    assert sum("removed " in out and "incomplete.ABC123_3.0.2" in out for out in outputs) == 1
    assert not list(folder.glob("incomplete.*")) and "Traceback" not in "".join(outputs)


def test_an_md5_list_with_two_sums_for_one_file_is_refused(tmp_path):
    listing = tmp_path / "sums.md5"
    listing.write_text(f"{'a' * 32}  data_batch_1.bin\n{'a' * 32}  data_batch_1.bin\n{'b' * 32}  data_batch_1.bin\n")
    with pytest.raises(errors.DataError, match=r"line 3: a second MD5 for data_batch_1.bin \(b{32}; an earlier line"):
        archive_lib.read_md5_file(listing)


def test_a_cache_folder_that_is_a_file_is_named_as_such(prepared, tmp_path):
    data_dir, _, md5s, _ = prepared
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(errors.DataError, match="the preprocessed-data cache .*cache is a file, not a folder"):
        cache.load_preprocessed(data_dir, str(tmp_path / "cache"), md5s=md5s, log=lambda m: None)


@pytest.mark.parametrize("options,cause", [("size=64k", "no space left on device"), ("ro", "read-only file system")])
def test_preparing_on_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, fake_archive, capsys,
                                                                             options, cause):
    from conftest import mount_tmpfs

    archive, md5_file = fake_archive
    disk = tmp_path / "disk"
    unmount = mount_tmpfs(disk, options)
    try:
        rc = prepare.main(["--data-dir", str(disk), "--archive", str(archive), "--md5-file", str(md5_file)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: cannot prepare CIFAR-10 in ") and cause in err.lower(), err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not list(disk.rglob("*.array_record*"))  # nothing half-written to be taken as prepared
    finally:
        unmount()


def test_a_full_disk_under_the_cache_is_one_line(prepared, tmp_path):
    from conftest import mount_tmpfs

    data_dir, _, md5s, _ = prepared
    disk = tmp_path / "disk"
    unmount = mount_tmpfs(disk, "size=64k")  # the fake set's arrays take ~3 MB
    try:
        with pytest.raises(errors.DataError, match=r"cannot write the preprocessed cache in .*: no space left on device; "
                                                   r"free space or make it writable, or set JAXCIFAR_CACHE_DIR"):
            cache.load_preprocessed(data_dir, str(disk), md5s=md5s, log=lambda m: None)
        assert not [p for p in disk.iterdir() if ".version-" in p.name]  # the partial version is removed
    finally:
        unmount()
