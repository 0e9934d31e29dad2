import json

import pytest
import torch
import yaml

from mmbalance.cli import main
from mmbalance.training.checkpoint import load_checkpoint
from mmbalance.training.trainer import Trainer, build_scheduler, run_from_dir
from utils import tiny_config

SMALL = ["data.n_train=300", "data.n_val=100", "data.n_test=100", "model.feature_dim=8", "model.hidden_dim=16"]


def test_outputs_and_result_schema(tmp_path):
    cfg = tiny_config("multiloss", SMALL + ["train.epochs=3"])
    res = Trainer(cfg, tmp_path, quiet=True).fit()
    for f in ("config.yaml", "metrics.jsonl", "result.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for k in ("method", "dataset", "seed", "epochs", "best_epoch", "train_seconds", "train_samples_per_second", "test", "val"):
        assert k in saved
    for split in ("test", "val"):
        s = saved[split]
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["macro_f1"] <= 1
        for m in ("x1", "x2"):
            assert 0 <= s["modalities"][m]["zero_out_accuracy"] <= 1
            assert 0 <= s["modalities"][m]["head_accuracy"] <= 1  # multiloss has heads
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert {"train_loss", "train_accuracy", "val_accuracy", "val_x1_zero_out_accuracy", "val_x2_head_accuracy"} <= set(rows[0])
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert saved["best_epoch"] == next(r["epoch"] for r in rows if r["val_accuracy"] == best["val_accuracy"])
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert tree["model"]["unimodal_heads"] is True and tree["method"]["unimodal_weight"] == 1.0
    ck = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert ck["epoch"] == saved["best_epoch"] and "method" in ck


def test_test_metrics_come_from_best_checkpoint(tmp_path):
    cfg = tiny_config("joint", SMALL + ["train.epochs=3", "optim.lr=0.5"])
    tr = Trainer(cfg, tmp_path, quiet=True)
    res = tr.fit()
    ck = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    fresh = Trainer(cfg, None, quiet=True)
    fresh.load_state(ck, weights_only=True)
    assert fresh._eval_split("test")["accuracy"] == res["test"]["accuracy"]


@pytest.mark.parametrize("method", ["joint", "ogm_ge", "ensemble"])
def test_resume_gives_the_same_result(tmp_path, method):
    over = SMALL + ["train.epochs=4", "schedule.name=step", "schedule.step_size=2", "optim.name=adam", "optim.lr=0.01"]
    full = Trainer(tiny_config(method, over), tmp_path / "full", quiet=True).fit()
    # a run stopped after epoch 1: train 2 epochs, then continue with the 4-epoch config
    part_dir = tmp_path / "part"
    cfg2 = tiny_config(method, over)
    tr = Trainer(cfg2, part_dir, quiet=True)
    tr.cfg.train.epochs = 2
    tr.fit()
    # restore the full run's epoch budget in the saved config, as if it had been interrupted
    tree = yaml.safe_load((part_dir / "config.yaml").read_text())
    tree["train"]["epochs"] = 4
    (part_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    resumed = run_from_dir(part_dir, quiet=True)
    for k in ("test", "val", "best_epoch"):
        assert resumed[k] == full[k], k
    rows = [json.loads(l) for l in (part_dir / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full_rows]


def test_resume_via_cli_drops_rows_after_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(out), "--quiet", "epochs=2"] + SMALL) == 0
    with open(out / "metrics.jsonl", "a") as f:  # a row written after the last checkpoint
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_early_stopping(tmp_path):
    cfg = tiny_config("joint", SMALL + ["train.epochs=30", "train.early_stopping=2", "optim.lr=0.3"])
    Trainer(cfg, tmp_path, quiet=True).fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 30
    best_before = max(r["val_accuracy"] for r in rows[:-2])
    assert all(r["val_accuracy"] <= best_before for r in rows[-2:])


def test_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = tiny_config("joint", ["schedule.name=step", "schedule.step_size=2", "schedule.gamma=0.5", "optim.lr=1.0"])
    opt = torch.optim.SGD([p], lr=1.0)
    sch = build_scheduler(cfg, opt, 6)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    cfg = tiny_config("joint", ["schedule.name=cosine", "optim.lr=1.0"])
    opt = torch.optim.SGD([p], lr=1.0)
    sch = build_scheduler(cfg, opt, 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-5)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from mmbalance.errors import ConfigError
    with pytest.raises(ConfigError, match="no CUDA device"):
        Trainer(tiny_config("joint", ["train.device=cuda"]), None, quiet=True)


def test_tensorboard_is_optional(tmp_path):
    """train.tensorboard=true writes event files when tensorboard is installed, else fails
    before training with a clear message naming the package."""
    import importlib.util
    from mmbalance.errors import ConfigError
    cfg = tiny_config("joint", SMALL + ["train.epochs=1", "train.tensorboard=true"])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            Trainer(cfg, tmp_path, quiet=True).fit()
        assert not (tmp_path / "result.json").exists()
    else:
        Trainer(cfg, tmp_path, quiet=True).fit()
        assert any((tmp_path / "tensorboard").iterdir())


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path):
    from mmbalance.errors import MMBalanceError
    cfg = tiny_config("joint", SMALL + ["train.epochs=1", "optim.lr=1e30", "optim.momentum=0"])
    with pytest.raises(MMBalanceError, match="loss became"):
        Trainer(cfg, tmp_path, quiet=True).fit()


@pytest.mark.slow
def test_two_process_training_under_torchrun(tmp_path):
    """DDP (gloo, CPU) through torchrun: shards the epoch, averages gradients, rank 0 writes."""
    import os
    import subprocess
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mmbalance", "train",
           "--dataset", "synthetic", "--method", "ogm_ge", "--out", str(out), "--quiet", "epochs=2",
           "train.threads=1"] + SMALL
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["epochs"] == 2 and 0 <= res["test"]["accuracy"] <= 1
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_channels_last_matches_and_bf16_runs(tmp_path):
    from utils import tiny_bundle
    bundle = tiny_bundle(2, shapes={"img": (1, 8, 8), "vec": (5,)})
    base = ["train.epochs=1", "model.feature_dim=8"]
    plain = Trainer(tiny_config("joint", base), None, quiet=True, bundle=bundle).fit()
    cl = Trainer(tiny_config("joint", base + ["model.channels_last=true"]), None, quiet=True, bundle=bundle).fit()
    assert cl["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=1e-4)
    bf = Trainer(tiny_config("joint", base + ["train.bf16=true"]), None, quiet=True, bundle=bundle).fit()
    assert 0 <= bf["test"]["accuracy"] <= 1 and bf["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=0.2)


def test_deterministic_mode_skips_the_nan_fill_of_new_tensors():
    torch.utils.deterministic.fill_uninitialized_memory = True
    Trainer(tiny_config("joint", SMALL), None, quiet=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False
