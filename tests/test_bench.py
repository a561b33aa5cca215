import json

import pytest

from jaxcifar import bench
from jaxcifar.nn import models
from jaxcifar.tools import flops, torch_bench
from conftest import import_torch


def test_flop_count_matches_the_layer_arithmetic():
    convs = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256), (8, 256, 256),
             (4, 256, 512), (4, 512, 512), (4, 512, 512), (2, 512, 512), (2, 512, 512), (2, 512, 512)]
    expected = sum(2 * hw * hw * 9 * cin * cout for hw, cin, cout in convs) + 2 * (512 * 512 + 512 * 10)
    assert flops.forward_flops(models.VGGBNDrop()) == expected
    assert flops.train_flops(models.VGGBNDrop()) == 3 * expected
    assert 1.85e9 < flops.train_flops(models.VGGBNDrop()) < 1.9e9


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "nin", "--width", "0.125", "--batch", "4", "--runs", "1", "--epoch-steps", "2",
                       "--steps-per-call", "2", "--replicas", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["width"] == 0.125
    nin = result["models"]["nin"]["jax"]
    assert set(nin["seconds"]) == set(bench.PHASES) and all(v >= 0 for v in nin["seconds"].values())
    assert nin["images_per_s"] > 0 and 0 < nin["fraction_of_matmul_peak"]
    assert 0 <= nin["epoch_loop"]["fraction_outside_steps"] < 1
    assert nin["steps_per_call"] == 2 and nin["train_step_one_per_call"]["seconds"] > 0
    assert result["machine"]["jax"] and result["matmul_peak_gflops"] > 0
    two = result["models"]["nin"]["replicas"]["2"]
    assert two["replicas"] == 2 and two["images_per_s"] == pytest.approx(2 * 4 / two["seconds_per_step"])
    printed = capsys.readouterr().out
    assert "train step" in printed and "2 seeds at once" in printed
    assert printed.splitlines()[-1] == f"bench: results written to {out}"


def test_fastest_step_settings_need_a_clear_win():
    def v(overrides, seconds):
        return {"overrides": overrides, "seconds_per_step": seconds}

    variants = {"defaults": v({}, 1.0), "1 step per call": v({"steps_per_call": 1, "step_loop": "unroll"}, 1.2),
                "whole epoch, lax.scan": v({"steps_per_call": 10 ** 6, "step_loop": "scan"}, 0.8),
                "conv_impl=xla": v({"conv_impl": "xla"}, 0.5), "conv_impl=small": v({"conv_impl": "small"}, 0.6),
                "pool_grad=xla": v({"pool_grad": "xla"}, 0.99),  # within noise: the default stays
                "bn_grad=autodiff": v({"bn_grad": "autodiff"}, 1.5)}
    assert bench.fastest_overrides(variants) == {"steps_per_call": 10 ** 6, "step_loop": "scan", "conv_impl": "xla"}
    assert bench.fastest_overrides({"defaults": v({}, 1.0), "x": v({"bn_grad": "autodiff"}, 1.0)}) == {}


def test_pytorch_runs_where_jax_runs():
    torch = import_torch()
    assert torch_bench.torch_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert torch_bench.torch_device("gpu") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA"):
            torch_bench.torch_device("gpu")


def test_bench_refuses_bad_arguments_before_timing_anything(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    for argv, message in ((["--models", "resnet"], "unknown model"), (["--epoch-steps", "0"], "must be positive"),
                          (["--threads", "0"], "must be positive"),
                          (["--width", "0"], "--width 0.0 must be a positive"),
                          (["--json", str(tmp_path / "a-file" / "x.json")], "cannot make its folder")):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
