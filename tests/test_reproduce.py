import json
import math

import pytest

from jaxcifar.run import checkpoint, results as results_lib
from jaxcifar.tools import pages
from jaxcifar import errors, evaluate, train
from conftest import load_script, tiny_config

reproduce = load_script("reproduce")


def first_saved_step(workdir) -> int:
    return checkpoint.Checkpointer(workdir, read_only=True).steps()[0]


def test_results_and_table_come_from_run_files(prepared, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(prepared, num_epochs=2), str(workdir))
    result = reproduce.result_from_workdir(workdir, "tiny")
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert result["final_test_accuracy"] == history[-1]["test_accuracy"]  # the final epoch, not the best
    assert [c["epoch"] for c in result["curve"]] == [1, 2] and not result["partial"]
    assert result["config"]["width"] == pytest.approx(1 / 16) and "cpu" in result["device"].lower()
    assert (result["device"], result["commit"]) == (history[0]["machine"], history[0]["commit"])  # as trained
    results = tmp_path / "results"
    results_lib.write_result(result, results)
    assert result["seeds"] == [0] and result["final_test_accuracies"] == [result["final_test_accuracy"]]
    other = dict(result, seed=1, seeds=[1], final_test_accuracy=result["final_test_accuracy"] + 2.0,
                 final_test_accuracies=[result["final_test_accuracy"] + 2.0])
    results_lib.write_result(other, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{pages.TABLE_START}\nstale\n{pages.TABLE_END}\noutro\n")
    pages.update_docs(results, [readme])
    text = readme.read_text()
    mean = result["final_test_accuracy"] + 1.0
    assert f"| `tiny` | - | {mean:.2f} ± 1.41 % | 2 | 2 |" in text
    assert f"Complete runs, mean final test accuracy: `tiny` ({mean:.2f} %, 2 seeds). Partial runs" in text
    assert "have not been measured here" in text
    partial = dict(result, config_name="vgg", epochs_completed=2, epochs_configured=300, partial=True)
    results_lib.write_result(partial, results)
    pages.update_docs(results, [readme])
    assert "| `vgg` | 92.45 % |" in readme.read_text() and "2 of 300 (partial)" in readme.read_text()
    assert "`vgg` (2 of 300 epochs)" in readme.read_text() and "have not been measured here" in readme.read_text()
    results_lib.write_result(dict(partial, epochs_completed=300, partial=False), results)
    pages.update_docs(results, [readme])
    assert "have not been measured here" not in readme.read_text()  # a complete vgg run answers the claim
    assert "stale" not in text and text.startswith("intro") and text.endswith("outro\n")
    # Seeds trained together in one program share a file; each counts once in the row.
    acc = result["final_test_accuracy"]
    together = dict(result, config_name="vgg_fast", seeds=[0, 1, 2], final_test_accuracy=acc + 1.0,
                    final_test_accuracies=[acc, acc + 1.0, acc + 2.0])
    assert results_lib.write_result(together, results).name == "vgg_fast-seeds0-1-2-cpu.json"
    pages.update_docs(results, [readme])
    assert f"| `vgg_fast` | 92.45 % | {acc + 1.0:.2f} ± 1.00 % | 3 | 2 |" in readme.read_text()
    # a damaged results file (e.g. cut by a kill mid-write) is named in one line, and the page is left as it was
    before = readme.read_text()
    (results / "fidelity").mkdir()
    (results / "fidelity" / "cut.json").write_text('{"side": "jax", "epo')
    with pytest.raises(errors.JaxcifarError, match=f"^{results / 'fidelity' / 'cut.json'} cannot be read as JSON "):
        pages.update_docs(results, [readme])
    assert readme.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results", "run"]  # no temporary file left
    with pytest.raises(errors.JaxcifarError, match=r"^no such file or directory while writing .*missing/x.json; .*, "
                                                   r"then run the same command again \(x.json is as it was\)$"):
        reproduce.write_atomically(tmp_path / "missing" / "x.json", "{}")


def test_front_page_blocks_come_from_run_files(prepared, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(prepared, num_epochs=2), str(workdir))
    results = tmp_path / "results"
    quick = dict(reproduce.result_from_workdir(workdir, "quick", wall_time_s=312.0))
    results_lib.write_result(quick, results)
    acc = quick["final_test_accuracy"]
    assert pages.quick_result(results).startswith(f"Measured: {acc:.2f} % test accuracy after 2 epochs, 5.2 min ")
    assert pages.headline(results).startswith("- No complete run at the recipes' own width")  # quick is a try
    full = dict(quick, config_name="vgg_fast", wall_time_s=7200.0,
                curve=[dict(e, epoch_time_s=600.0) for e in quick["curve"]],
                config=dict(quick["config"], width=1.0, batch_size=128, model="vgg_bn_drop"))
    full_path = results_lib.write_result(full, results)
    line = (f"- `vgg_fast`, full width, 2 epochs: **{acc:.2f} %** final test accuracy (1 seed, {full['device']}, "
            f"2 h 00 min)")
    assert pages.headline(results) == (f"{line}. It tests {pages.CLAIM_TESTED['vgg_fast']} and ends "
                                           f"{92.45 - acc:.2f} points below it")
    # The final epoch evaluated with BatchNorm statistics re-estimated joins the line; another epoch is refused.
    evaluation = tmp_path / "evaluation.json"
    assert evaluate.main(["--workdir", str(workdir), "--recompute-bn-stats", "2", "--json", str(evaluation)]) == 0
    bn = json.loads(evaluation.read_text())["accuracy"]
    reproduce.add_evaluation(full_path, evaluation)
    assert pages.headline(results).startswith(f"{line}; {bn:.2f} % with BatchNorm statistics re-estimated from 2 "
                                                  "training batches (a diagnostic, not the seed's protocol). It tests")
    earlier = tmp_path / "earlier.json"
    assert evaluate.main(["--workdir", str(workdir), "--step", str(first_saved_step(workdir)),
                          "--json", str(earlier)]) == 0
    with pytest.raises(SystemExit, match="without --recompute-bn-stats; its epoch is 1, not 2; run python -m jaxcifar"):
        reproduce.add_evaluation(full_path, earlier)
    assert json.loads(full_path.read_text())["recomputed_bn"]["test_accuracies"] == [bn]  # the refusal wrote nothing
    with pytest.raises(errors.JaxcifarError, match=f"^{tmp_path}/missing.json cannot be read as JSON .*give the file"):
        reproduce.add_evaluation(full_path, tmp_path / "missing.json")
    costs = {line.split(" | ")[0]: line.split(" | ") for line in pages.recipe_costs(results).splitlines()}
    # The full-width run's median epoch prices every VGG recipe of that width and batch; NIN has no figure.
    assert costs["| `vgg`"][3:5] == ["10.0 min / 50 h 00 min", "not measured yet"]
    assert costs["| `vgg_fast`"][3] == "10.0 min / 6 h 40 min" and "vgg_fast-seed0-cpu.json" in costs["| `vgg_fast`"][5]
    assert costs["| `nin`"][3:6] == ["not measured yet", "not measured yet", "- |"]


def test_a_run_that_moved_names_each_machine_with_its_epochs():
    a, b = "1 x cpu (Intel(R) Xeon(R) Processor, 2 cores)", "1 x cpu (AMD EPYC, 2 cores)"
    records = [{"epoch": e, "machine": a} for e in (1, 2, 3)] + [{"epoch": 4, "machine": b}]
    assert results_lib.epochs_by(records, "machine", "here") == f"{a} (epochs 1-3), {b} (epoch 4)"
    assert results_lib.epochs_by(records[:3], "machine", "here") == a
    # Records from before they said it stand for what is here, the best guess left.
    assert results_lib.epochs_by([{"epoch": 1}, {"epoch": 2, "machine": a}], "machine", b) == (f"{b} (epoch 1), "
                                                                                               f"{a} (epoch 2)")


def test_benchmark_table_comes_from_bench_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    machine = {"platform": "cpu", "device": "cpu", "device_count": 1, "cpu": "Test CPU", "cpu_count": 2}
    seconds = {"forward": 0.5, "backward": 1.0, "forward+backward": 1.5, "train step": 1.6}
    torch_seconds = {"forward": 0.4, "backward": 0.8, "forward+backward": 1.2, "train step": 1.28}
    bench = {"batch": 128, "dtype": "float32", "machine": machine, "matmul_peak_gflops": 123.4,
             "models": {"vgg_bn_drop": {
        "jax": {"seconds": seconds, "images_per_s": 80.0, "epoch_loop": {"fraction_outside_steps": 0.012},
                "steps_per_call": 4},
        "torch": {"seconds": torch_seconds}, "jax_over_torch": {"train step": 1.6 / 1.28}}}}
    (results / "bench-cpu.json").write_text(json.dumps(bench))
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{pages.TABLE_START}\n{pages.TABLE_END}\nb\n{pages.BENCH_START}\nold\n"
                      f"{pages.BENCH_END}\nc\n")
    pages.update_docs(results, [readme])
    text = readme.read_text()
    assert ("| `bench-cpu.json` (float32, batch 128) | vgg_bn_drop | 0.500 / 0.400 | 1.000 / 0.800 | 1.500 / 1.200 | "
            "1.600 / 1.280 | 1.25 | 4 | 80 | 1.2 % | 123 GFLOP/s | 1 x cpu (Test CPU, 2 cores) |") in text
    assert "old" not in text and text.endswith("c\n")


def test_reduced_width_runs_of_a_whole_schedule_join_the_results_table(tmp_path):
    results = tmp_path / "results"
    (results / "fidelity").mkdir(parents=True)

    def fidelity_run(name, side, epochs_done, num_epochs, variant="recipe", accuracy=70.0, seed=0, cpu="Test CPU"):
        run = {"side": side, "variant": variant, "seed": seed, "config_file": "configs/vgg_fast.py",
               "overrides": [] if variant == "recipe" else ["dropout_bits=32"], "width": 0.5,
               "num_epochs": num_epochs, "threads": 1, "cpu": cpu,
               "epochs": [{"epoch": e, "train_loss": 1.0, "train_accuracy": 75.0, "test_accuracy": accuracy,
                           "train_images_eval_accuracy": 70.0} for e in range(1, epochs_done + 1)]}
        (results / "fidelity" / f"{name}.json").write_text(json.dumps(run))

    fidelity_run("jax-w0.5-s0", "jax", 40, 40, accuracy=81.25)
    fidelity_run("torch-w0.5-s0", "torch", 12, 40)
    fidelity_run("jax-short", "jax", 10, 10)  # another schedule: the fidelity table's alone
    fidelity_run("jax-variant", "jax", 40, 40, variant="dropout_bits=32")
    table = pages.results_table(results)
    assert ("| `vgg_fast` at width ½, JAX | 92.45 % (full width) | 81.25 % | 1 | 40 | - | - | "
            "1 x cpu (Test CPU, 1 thread) |") in table
    assert "| `vgg_fast` at width ½, PyTorch port | 92.45 % (full width) | 70.00 % | 1 | 12 of 40 (partial) |" in table
    assert len(table.split("\n\n")[0].splitlines()) == 2 + 2  # header, rule, the two whole-schedule runs
    assert "Complete runs, mean final test accuracy: `vgg_fast` at width ½, JAX (81.25 %, 1 seed)." in table
    assert "`vgg_fast` at width ½, PyTorch port (12 of 40 epochs)" in table
    assert "have not been measured here" in table  # a reduced width does not answer the full-width claim
    lines = pages.headline(results).splitlines()  # the README's: complete runs only, one line each
    assert lines[0] == ("- `vgg_fast` at width ½, JAX, 40 epochs: **81.25 %** final test accuracy (1 seed, "
                        "1 x cpu (Test CPU, 1 thread))")
    assert len(lines) == 2 and "No complete run at the recipes' own width yet" in lines[1]

    # a second seed, trained on another machine, joins the first: one row of two seeds, not two rows of one
    fidelity_run("jax-w0.5-s1", "jax", 40, 40, accuracy=80.25, seed=1, cpu="Other CPU")
    table = pages.results_table(results)
    assert ("| `vgg_fast` at width ½, JAX | 92.45 % (full width) | 80.75 ± 0.71 % | 2 | 40 | - | - | "
            "1 x cpu (Test CPU, 1 thread) and 1 x cpu (Other CPU, 1 thread) |") in table
    assert "`vgg_fast` at width ½, JAX (80.75 %, 2 seeds)." in table
    assert pages.headline(results).splitlines()[0] == (
        "- `vgg_fast` at width ½, JAX, 40 epochs: **80.75 ± 0.71 %** final test accuracy "
        "(2 seeds: 81.25 and 80.25 %; 1 x cpu (Test CPU, 1 thread) and 1 x cpu (Other CPU, 1 thread))")
    # a third seed still running: its own partial row; the summary tells the two rows of one label apart
    fidelity_run("jax-w0.5-s2", "jax", 12, 40, seed=2, cpu="Third CPU")
    table = pages.results_table(results)
    assert "`vgg_fast` at width ½, JAX on 1 x cpu (Third CPU, 1 thread) (12 of 40 epochs)" in table
    assert ("`vgg_fast` at width ½, JAX on 1 x cpu (Test CPU, 1 thread) and 1 x cpu (Other CPU, 1 thread) "
            "(80.75 %") in table


def test_readme_gap_block_takes_the_ten_epoch_fidelity_runs(tmp_path):
    results = tmp_path / "results"
    (results / "fidelity").mkdir(parents=True)
    runs = (("jax-w0.25-s0", 0, 10, 60.0, 10), ("jax-w0.25-s1", 1, 10, 60.0, 10), ("jax-w0.5-s0", 0, 40, 87.5, 40),
            ("torch-w0.5-s0", 0, 40, 86.0, 40), ("torch-w0.5-s1", 1, 40, 0.0, 0))  # the last one just started
    for name, seed, num_epochs, test, done in runs:
        side, width, _ = name.split("-")
        (results / "fidelity" / f"{name}.json").write_text(json.dumps(
            {"side": side, "variant": "recipe", "overrides": [], "config_file": "configs/vgg_fast.py",
             "cpu": "Test CPU", "threads": 1, "seed": seed, "width": float(width[1:]), "num_epochs": num_epochs,
             "epochs": [{"epoch": e, "train_loss": 1.0, "train_accuracy": 70.0 + seed, "test_accuracy": test,
                         "train_images_eval_accuracy": 60.0} for e in range(1, done + 1)]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{pages.TABLE_START}\n{pages.TABLE_END}\n"
                      f"{pages.GAPS_START}\nold\n{pages.GAPS_END}\n"
                      f"{pages.FIDELITY_START}\n{pages.FIDELITY_END}\n")
    pages.update_docs(results, [readme])
    per_run = readme.read_text().split(pages.FIDELITY_START)[1]
    assert "| torch | 0.5 | recipe | 0 | 40 |" in per_run and "| torch | 0.5 | recipe | 1 |" not in per_run
    block = readme.read_text().split(pages.GAPS_START)[1].split(pages.GAPS_END)[0]
    assert "| jax | 0.25 | recipe | 10 | 2 | 10.0 / 11.0 | 10.50 ± 0.50 | 60.00 ± 0.00 |" in block
    gaps, whole = block.split("\n\n")  # no torch run at 0.25: no comparison of G
    assert "old" not in block and "| 0.5 |" not in gaps  # the 40-epoch runs have another window
    # the recipe's whole schedule (vgg_fast: 40 epochs), a run a side: compared by final test accuracy
    assert "| 0.5 | recipe | 40 | 1 / 1 | 87.50 | 86.00 | +1.50 |  | test |" in whole


def test_readme_bn_shift_block_compares_the_sides_layer_by_layer(tmp_path):
    results = tmp_path / "results"
    (results / "bn-shift").mkdir(parents=True)

    def run(side, seed, second_moment):  # two BatchNorm layers, three weights (the last linear has none)
        return {"side": side, "seed": seed, "gap": 10.0 + seed, "gap_window": [5, 10], "test_accuracy": 50.0,
                "second_moment": [1.0, second_moment], "rms_log_second_moment": [0.1, 0.2],
                "weight_norm": [5.0, 6.0, 7.0], "variance_ratio": [1.0, second_moment]}

    runs = [run("jax", 0, 0.6), run("jax", 1, 0.8), run("torch", 0, 0.9), run("torch", 1, 0.9)]
    (results / "bn-shift" / "w0.25.json").write_text(json.dumps({"runs": runs}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{pages.TABLE_START}\n{pages.TABLE_END}\n"
                      f"{pages.BN_SHIFT_START}\nold\n{pages.BN_SHIFT_END}\n")
    pages.update_docs(results, [readme])
    block = readme.read_text().split(pages.BN_SHIFT_START)[1]
    assert "old" not in block
    assert f"| jax | 1 | 11.00 (epochs 5-10) | 50.00 | {math.log(0.8) / 2:+.3f} | 0.150 |" in block
    # layer 2: jax 0.70 ± 0.10, torch 0.90 ± 0.00: -0.20 / 0.10 = -2.0 standard errors
    assert "| 2 | 0.70 ± 0.10 | 0.90 ± 0.00 | -2.0 | 0.20 ± 0.00 | 0.20 ± 0.00 |" in block
    # every run has the same test accuracy and the same shift: there is no correlation to state
    assert "Over the 4 runs, either side: correlation of the mean channel-by-channel shift with the eval test " \
           "accuracy r = undefined, with G r = undefined." in block
    assert "| 3 |  |  |  |  |  |  | 7.00 ± 0.00 | 7.00 ± 0.00 |" in block


def test_a_folder_that_is_not_a_finished_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="has no metrics.jsonl: give the --workdir of a run"):
        reproduce.result_from_workdir(tmp_path / "nothing", "vgg_fast")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # epochs logged, but no save: a damaged workdir
    with pytest.raises(errors.CheckpointError, match=f"^no checkpoints in {tmp_path / 'checkpoints'}"):
        reproduce.result_from_workdir(tmp_path, "vgg_fast")


def test_bad_arguments_are_refused_before_any_training(tmp_path, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    base = ["--runs-dir", str(runs), "--results", str(results), "--no-readme"]
    for extra, message in ((["--num-epochs", "0"], "--num-epochs 0 must be at least 1"),
                           (["--seeds", "a"], "--seeds a: give comma-separated integers"),
                           (["--configs", "quick,nope"], "no config configs/nope.py"),  # quick would have trained first
                           (["--table-only"], "--table-only with --no-readme does nothing")):
        with pytest.raises(SystemExit) as exit_:
            reproduce.main(base + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not runs.exists() and not results.exists()


def test_seed_lists_read_as_words():
    assert pages.in_words(["90.75"]) == "90.75"
    assert pages.in_words(["90.75", "90.41"]) == "90.75 and 90.41"
    assert pages.in_words(["90.75", "90.41", "90.35", "90.85"]) == "90.75, 90.41, 90.35 and 90.85"


def test_a_benchmark_prices_an_epoch_with_the_loop_around_its_steps(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    seconds = {"forward": 0.00118, "backward": 0.00267, "forward+backward": 0.00383, "train step": 0.00297}
    bench = {"batch": 128, "dtype": "float32", "matmul_peak_gflops": 371630.0,
             "machine": {"platform": "gpu", "device": "NVIDIA H200", "device_count": 1},
             "models": {"vgg_bn_drop": {"jax": {"seconds": seconds, "images_per_s": 25_000.0, "steps_per_call": 4,
                                                "epoch_loop": {"fraction_outside_steps": 0.5}}}}}
    (results / "bench-gpu.json").write_text(json.dumps(bench))
    costs = {line.split(" | ")[0]: line.split(" | ") for line in pages.recipe_costs(results).splitlines()}
    # 50,000 images at 25,000 images/s is 2 s of steps; the loop outside them doubles it.
    assert costs["| `vgg_fast`"][3:5] == ["not measured yet", "4 s / 2.7 min"]
    assert "`bench-gpu.json`, training loop only (1 x NVIDIA H200)" in costs["| `vgg_fast`"][5]
    row = pages.bench_table(results).splitlines()[2]
    assert "| vgg_bn_drop | 1.18 ms | 2.67 ms | 3.83 ms | 2.97 ms | - | 4 | 25,000 | 50.0 % |" in row


def test_a_sigterm_to_reproduce_reaches_its_training_and_waits_for_it(tmp_path, monkeypatch):
    # It exited at once and left the training running, holding its workdir's lock. A stand-in for the training
    # records the signal it gets and exits as training does after its save (128 + 15).
    import os
    import signal
    import subprocess
    import sys
    import threading

    before = signal.getsignal(signal.SIGTERM)
    got = tmp_path / "got"
    child = ("import signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, 'w').write('TERM'), sys.exit(143)))\n"
             "time.sleep(60)\nsys.exit(0)\n")
    real_popen = subprocess.Popen
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda cmd, cwd: real_popen([sys.executable, "-c", child]))
    # The parent is signalled once its training is running (a Python start with nothing to import: well under 2 s).
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(SystemExit) as stopped:
        reproduce.run_config("tiny", [0], tmp_path / "w", [])
    assert stopped.value.code == 143 and got.read_text() == "TERM"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
