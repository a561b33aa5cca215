"""scripts/gpu_plan.py: the budget arithmetic and step settings gpu_run.sh takes from the benchmark."""

import json
import os
import subprocess
import sys

from conftest import REPO, load_script

gpu_plan = load_script("gpu_plan")


def test_estimates_come_from_the_measured_throughput_of_that_many_seeds(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"models": {"vgg_bn_drop": {
        "jax": {"images_per_s": 20_000.0},
        "replicas": {"1": {"images_per_s": 20_000.0}, "4": {"images_per_s": 60_000.0},
                     "8": {"images_per_s": 100_000.0}},
        "step_variants": {"fastest": {"steps_per_call": 1000000, "step_loop": "scan"}}}}}))
    per_epoch = 50_000 + 10_000 / 3
    # 8 seeds x 40 epochs at the 8-seed rate; 3 seeds at the slower of the rates of 1 and 4 seeds.
    assert gpu_plan.estimate("vgg_fast", "0,1,2,3,4,5,6,7", "float32", str(bench), "") == int(
        8 * 40 * per_epoch / 100_000 * 1.1 + 60)
    assert gpu_plan.estimate("vgg", "0,1,2", "float32", str(bench), "") == int(3 * 300 * per_epoch / 20_000 * 1.1 + 60)
    # Nothing measured for that model or dtype: the stage never looks affordable.
    assert gpu_plan.estimate("nin", "0", "float32", str(bench), "") == 10 ** 9
    assert gpu_plan.estimate("vgg_fast", "0", "bfloat16", str(bench), str(tmp_path / "absent.json")) == 10 ** 9
    assert gpu_plan.overrides(str(bench)) == "--config.steps_per_call=1000000 --config.step_loop=scan"
    assert gpu_plan.overrides(str(tmp_path / "absent.json")) == ""


def test_estimates_take_the_slower_neighbour_and_add_the_loop_around_the_steps(tmp_path):
    # As measured on an H200: one seed faster than eight summed, 39 % of an epoch outside the steps.
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"models": {"vgg_bn_drop": {
        "jax": {"images_per_s": 43_125.0,
                "epoch_loop": {"steps": 8, "seconds": 0.0366, "bare_steps_seconds": 0.0224}},
        "replicas": {"1": {"images_per_s": 42_646.0}, "8": {"images_per_s": 37_661.0}}}}}))
    per_epoch = 50_000 + 10_000 / 3
    loop_s = 40 * 390 * (0.0366 - 0.0224) / 8
    # 4 seeds lie between the measured 1 and 8: the slower rate (8's) counts, not the faster one (1's).
    assert gpu_plan.estimate("vgg_fast", "0,1,2,3", "float32", str(bench), "") == int(
        (4 * 40 * per_epoch / 37_661 + loop_s) * 1.1 + 60)
    # Counts beyond the measured ones take the nearest measured.
    assert gpu_plan.estimate("vgg_fast", "0,1,2,3,4,5,6,7,8,9", "float32", str(bench), "") == int(
        (10 * 40 * per_epoch / 37_661 + loop_s) * 1.1 + 60)


def test_gpu_run_trains_the_smallest_alternative_when_no_benchmark_allows_an_estimate(fake_archive, tmp_path):
    archive, md5_file = fake_archive
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "MD5_FILE": str(md5_file),
           "INSTALL": "0", "BENCH": "0", "STAGES": "tiny:0,1:float32|tiny:0:float32"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh"), str(tmp_path / "wheels"), str(archive),
                           str(out), "300"], env=env, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu_run.log").read_text()
    assert "== skipping tiny (float32, seeds 0,1): needs ~1000000000 s" in log
    assert "== no estimate for tiny (float32): running seeds 0 for at most the" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.log", "tiny-seed0-cpu.json"]  # data stayed in WORK
    result = json.loads((out / "tiny-seed0-cpu.json").read_text())
    assert (result["epochs_completed"], result["partial"]) == (2, False)
