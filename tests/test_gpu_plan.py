"""scripts/gpu_plan.py and scripts/gpu_run.sh: what a GPU slot queues from results/, what each run costs, and the
slot's command rehearsed on the CPU."""

import json
import os
import subprocess
import sys

from conftest import REPO, load_script

gpu_plan = load_script("gpu_plan")


def result(name, seeds, *, accuracies=None, epochs=300, done=None, dtype="float32", device="1 x NVIDIA H200",
           model="vgg_bn_drop", curve=None, width=1.0):
    done = epochs if done is None else done
    return {"config_name": name if dtype == "float32" else f"{name}-{dtype}", "seeds": seeds, "dtype": dtype,
            "final_test_accuracies": accuracies or [90.0] * len(seeds), "final_test_accuracy": 90.0,
            "epochs_completed": done, "epochs_configured": epochs, "partial": done < epochs, "device": device,
            "curve": curve or [{"epoch": 1, "epoch_time_s": 1.0}],
            "config": {"model": model, "width": width, "dtype": dtype, "num_epochs": epochs}}


def write(results_dir, name, r):
    results_dir.mkdir(exist_ok=True)
    (results_dir / name).write_text(json.dumps(r))


def test_the_queue_is_the_tables_missing_rows_in_order_with_the_bf16_check_after_vgg_and_nin(tmp_path):
    results = tmp_path / "results"
    write(results, "vgg-seed0-gpu.json", result("vgg", [0]))  # complete: not queued again
    write(results, "nin-seed0-gpu.json", result("nin", [0], done=120, model="nin"))  # a partial row is still missing
    write(results, "vgg_noflip-seed0-cpu.json", result("vgg_noflip", [0], width=0.5))  # another width: not the row
    write(results, "vgg_fast-bfloat16-seed1-gpu.json", result("vgg_fast", [1], epochs=40, dtype="bfloat16"))
    queue = gpu_plan.queue(gpu_plan.load_results(results))
    assert queue[:6] == [("nin", 0, "float32"), ("vgg_fast", 0, "bfloat16"), ("vgg_fast", 2, "bfloat16"),
                         ("vgg_fast", 3, "bfloat16"), ("vgg_noflip", 0, "float32"), ("nin_noflip", 0, "float32")]
    assert queue[8:10] == [("vgg", 1, "float32"), ("nin", 1, "float32")]
    assert len(queue) == 6 * 3 - 1 + 3


def test_the_table_trains_in_bf16_only_once_bf16_is_within_noise_of_fp32(tmp_path):
    fp32 = result("vgg_fast", [0, 1, 2, 3], accuracies=[90.75, 90.41, 90.35, 90.85], epochs=40)
    close = [result("vgg_fast", [s], accuracies=[a], epochs=40, dtype="bfloat16")
             for s, a in zip(range(4), [90.6, 90.3, 90.9, 90.5])]
    far = [dict(r, final_test_accuracies=[a]) for r, a in zip(close, [88.1, 88.4, 88.0, 88.3])]
    assert gpu_plan.table_dtype([fp32]) == "float32"  # bf16 not measured yet
    assert gpu_plan.table_dtype([fp32] + close[:3]) == "float32"  # 3 of its 4 seeds
    assert gpu_plan.table_dtype([fp32] + close) == "bfloat16"
    assert gpu_plan.table_dtype([fp32] + far) == "float32"
    assert {d for _, _, d in gpu_plan.queue([fp32] + close)} == {"bfloat16"}


def test_estimates_are_not_below_what_the_h200_runs_took():
    # results/ holds the 2026-12-04 H200 run: vgg_fast, 4 seeds in one program, 40 epochs. Its two processes' summary
    # lines (results/gpu/*.log) counted 318 s (epochs 1-31, then SIGTERM) and 84 s (epochs 32-40): 402 s in all.
    took = 318 + 84
    assert gpu_plan.estimate("vgg_fast", [0, 1, 2, 3], "float32", REPO / "results", together=True) >= took
    # A 300-epoch row of one seed is priced from the bench's one-seed rate plus the measured bookkeeping: more than
    # its steps alone (300 epochs of 53,333 images at 42,646 images/s: 375 s).
    assert gpu_plan.estimate("vgg", [0], "float32", REPO / "results") > 375


def test_estimates_use_the_timings_that_new_runs_record(tmp_path):
    results = tmp_path / "results"
    curve = [{"epoch": 1, "epoch_time_s": 31.3, "startup_s": 20.0}] + [
        {"epoch": e, "epoch_time_s": 1.3, "bookkeeping_s": 0.1} for e in range(2, 301)]
    write(results, "vgg-seed0-gpu.json", result("vgg", [0], curve=curve))
    per_run = 20.0 + 300 * (1.3 + 0.1)
    assert gpu_plan.estimate("vgg_noflip", [0], "float32", results) == int((per_run + 30.0) * 1.1)
    # Seeds one after another compile once (the persistent compilation cache).
    assert gpu_plan.estimate("vgg_noflip", [0, 1], "float32", results) == int((2 * per_run + 30.0) * 1.1)
    # A network never run on a GPU: nothing to price it from without the CPU's ratio.
    assert gpu_plan.estimate("nin", [0], "float32", results) == 10 ** 9


def gpu_run(args, env, timeout=280):
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh"), *map(str, args)],
                          env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_run_plan_prints_the_queue_without_a_gpu():
    proc = gpu_run(["--plan"], {}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["config", "seed", "dtype", "estimate"]
    assert lines[1].split()[:3] == ["vgg", "0", "float32"]  # results/ has no 300-epoch row yet
    assert lines[-1].startswith("gpu_run.sh: ") and "runs queued" in lines[-1]


def test_gpu_run_refuses_bad_input_in_one_line(tmp_path, fake_archive):
    archive, _ = fake_archive
    for args, says in (([tmp_path, archive, tmp_path / "o", "abc"], "BUDGET_S=abc"),
                       ([tmp_path, archive, tmp_path / "o", "0"], "BUDGET_S=0"),
                       ([tmp_path / "none", archive, tmp_path / "o"], "no wheels folder")):
        proc = gpu_run(args, {}, timeout=30)
        assert proc.returncode == 2 and proc.stderr.startswith("gpu_run.sh: error: ") and says in proc.stderr
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-aa").write_bytes(archive.read_bytes())
    (parts / "SHA256SUMS").write_text("0" * 64 + "  part-aa\n")
    proc = gpu_run(["-", parts, tmp_path / "o"], {"INSTALL": "0"}, timeout=30)
    assert proc.returncode == 2 and "has no line for cifar-10-binary.tar.gz" in proc.stdout + proc.stderr  # and the log


def test_gpu_run_trains_its_runs_one_after_another_and_a_second_call_skips_what_the_first_finished(
        fake_archive, tmp_path):
    archive, md5_file = fake_archive
    env = {"WORK": str(tmp_path / "work"), "MD5_FILE": str(md5_file), "INSTALL": "0", "BENCH": "0",
           "RUNS": "tiny:0:float32 tiny:1:float32"}
    out = tmp_path / "out"
    proc = gpu_run(["-", archive, out, 240], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.log", "tiny-seed0-cpu.json", "tiny-seed1-cpu.json"]
    for seed in (0, 1):
        r = json.loads((out / f"tiny-seed{seed}-cpu.json").read_text())
        assert (r["seeds"], r["epochs_completed"], r["partial"], r["dtype"]) == ([seed], 2, False, "float32")
        assert r["config"]["checkpoint_every_s"] == 120 and r["config"]["save_best"] is False
    assert (tmp_path / "work" / "finished").read_text().split() == ["tiny:0:float32", "tiny:1:float32"]
    again = gpu_run(["-", archive, tmp_path / "out2", 240], env)
    assert again.returncode == 0 and "== tiny seed" not in again.stdout
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["gpu_run.log"]
    # A run named wrongly is one line, before anything trains.
    bad = gpu_run(["-", archive, tmp_path / "out3", 240], {**env, "RUNS": "tiny:zero:float32"})
    assert bad.returncode != 0 and "give NAME:SEED:DTYPE" in bad.stdout + bad.stderr
