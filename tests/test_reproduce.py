import importlib.util
import json

import pytest

from jaxcifar import train
from test_train import REPO, tiny_config

spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts/reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_results_and_table_come_from_run_files(prepared, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(prepared, num_epochs=2), str(workdir))
    result = reproduce.result_from_workdir(workdir, "tiny", 0)
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert result["final_test_accuracy"] == history[-1]["test_accuracy"]  # the final epoch, not the best
    assert [c["epoch"] for c in result["curve"]] == [1, 2] and not result["partial"]
    assert result["config"]["width"] == pytest.approx(1 / 16) and "cpu" in result["device"].lower()
    results = tmp_path / "results"
    reproduce.write_result(result, results)
    other = dict(result, seed=1, final_test_accuracy=result["final_test_accuracy"] + 2.0)
    reproduce.write_result(other, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.TABLE_START}\nstale\n{reproduce.TABLE_END}\noutro\n")
    reproduce.update_readme(results, readme)
    text = readme.read_text()
    mean = result["final_test_accuracy"] + 1.0
    assert f"| `tiny` | - | {mean:.2f} ± 1.41 % | 2 | 2 |" in text
    assert "stale" not in text and text.startswith("intro") and text.endswith("outro\n")
