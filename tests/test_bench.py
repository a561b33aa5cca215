import json


from jaxcifar import bench, models


def test_flop_count_matches_the_layer_arithmetic():
    convs = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256), (8, 256, 256),
             (4, 256, 512), (4, 512, 512), (4, 512, 512), (2, 512, 512), (2, 512, 512), (2, 512, 512)]
    expected = sum(2 * hw * hw * 9 * cin * cout for hw, cin, cout in convs) + 2 * (512 * 512 + 512 * 10)
    assert bench.forward_flops(models.VGGBNDrop()) == expected
    assert bench.train_flops(models.VGGBNDrop()) == 3 * expected
    assert 1.85e9 < bench.train_flops(models.VGGBNDrop()) < 1.9e9


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "nin", "--batch", "4", "--runs", "1", "--epoch-steps", "2", "--steps-per-call", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    nin = result["models"]["nin"]["jax"]
    assert set(nin["seconds"]) == set(bench.PHASES) and all(v >= 0 for v in nin["seconds"].values())
    assert nin["images_per_s"] > 0 and 0 < nin["fraction_of_matmul_peak"]
    assert 0 <= nin["epoch_loop"]["fraction_outside_steps"] < 1
    assert nin["steps_per_call"] == 2 and nin["train_step_one_per_call"]["seconds"] > 0
    assert result["machine"]["jax"] and result["matmul_peak_gflops"] > 0
    assert "train step" in capsys.readouterr().out


def test_bench_rejects_unknown_models(capsys):
    assert bench.main(["--models", "resnet"]) == 2
    assert "unknown model" in capsys.readouterr().err
