"""Runs that are safe to stop, resume and re-run; config validation; console behaviour."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from mmbalance.cli import main
from mmbalance.config import resolve_config
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.training import checkpoint as ckpt
from mmbalance.training.trainer import Trainer, run_from_dir
from utils import tiny_config

SMALL = ["data.n_train=96", "data.n_val=32", "data.n_test=32", "train.threads=1"]


def _train(tmp_path, *extra):
    return main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(tmp_path), "--quiet",
                 "epochs=2", "model.feature_dim=8", "model.hidden_dim=16", "train.progress=off", *SMALL, *extra])


class Payload:
    """Unpickling this would create a marker file (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_crafted_pickle_checkpoint_is_refused_and_never_executed(tmp_path, name):
    assert _train(tmp_path / "run") == 0
    marker = tmp_path / "pwned"
    state = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)
    state["method"] = {"x": Payload(str(marker))}
    torch.save(state, tmp_path / "run" / "checkpoints" / name)
    with pytest.raises(MMBalanceError, match=rf"checkpoint '.*{name}' was refused: it holds objects other than tensors"):
        ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / name)
    if name == "last.pt":
        assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    for method in ("gmm_adaptive", "bmm", "arm", "midas", "mla", "mcr"):
        cfg = tiny_config(method, SMALL + (["method.warmup_epochs=1"] if method not in ("mla", "mcr") else []))
        Trainer(cfg, tmp_path / method, quiet=True).fit()
        state = torch.load(tmp_path / method / "checkpoints" / "last.pt", weights_only=True)
        assert state["epoch"] == 1 and state["config"]["method"]["name"] == method


def test_out_folder_with_a_run_is_refused_without_overwrite(tmp_path, capsys):
    assert _train(tmp_path) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    assert _train(tmp_path, "seed=3") == 2
    err = capsys.readouterr().err
    assert "already holds a run (config.yaml, metrics.jsonl, result.json, checkpoints)" in err
    assert "--overwrite" in err and (tmp_path / "metrics.jsonl").read_text() == before
    assert _train(tmp_path, "seed=3", "--overwrite") == 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 3


def test_resume_refuses_a_config_that_differs_from_the_checkpoint(tmp_path):
    assert _train(tmp_path) == 0
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    tree["method"]["name"] = "multiloss"
    tree["optim"]["lr"] = 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(MMBalanceError, match=r"trained with another config") as e:
        run_from_dir(tmp_path, quiet=True)
    assert "method.name: checkpoint 'joint', now 'multiloss'" in str(e.value)
    assert "optim.lr: checkpoint 0.05, now 0.5" in str(e.value)


def test_resume_overrides_safe_applied_others_refused(tmp_path, capsys):
    assert _train(tmp_path) == 0
    assert main(["train", "--resume", str(tmp_path), "--quiet", "method.name=mm", "optim.lr=1"]) == 2
    assert "--resume cannot change method.name, optim.lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--quiet", "epochs=3"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 3


def test_resume_without_checkpoint_is_clear(tmp_path):
    assert _train(tmp_path) == 0
    (tmp_path / "checkpoints" / "last.pt").unlink()
    with pytest.raises(MMBalanceError, match="has no checkpoint"):
        run_from_dir(tmp_path, quiet=True)


def test_disk_full_names_the_path_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert _train(tmp_path) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    good = last.read_bytes()

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(MMBalanceError, match=r"cannot write '.*last.pt': No space left on device"):
        ckpt.save_checkpoint(last, {"x": torch.zeros(2)})
    assert last.read_bytes() == good
    assert not list(tmp_path.rglob("*.tmp"))


def test_unwritable_output_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MMBalanceError, match=r"cannot create the output folder '.*file/run'"):
        Trainer(tiny_config("joint", SMALL), blocker / "run", quiet=True).fit()


@pytest.mark.parametrize("override, msg", [
    ("train.eval_every=0", "eval_every must be >= 1"),
    ("schedule.step_size=0", "step_size must be >= 1"),
    ("model.dropout=1.0", r"dropout must be in \[0, 1\)"),
    ("model.dropout=-0.1", r"dropout must be in \[0, 1\)"),
    ("optim.momentum=-0.5", "momentum must be >= 0"),
    ("optim.weight_decay=-1", "weight_decay must be >= 0"),
    ("train.grad_clip=-1", "grad_clip must be >= 0"),
    ("schedule.gamma=0", "gamma must be > 0"),
    ("method.alpha=-0.1", "alpha must be >= 0"),
    ("method.unimodal_weight=-1", "unimodal_weight must be >= 0"),
])
def test_config_validation_messages(override, msg):
    method = {"method.alpha=-0.1": "ogm_ge", "method.unimodal_weight=-1": "multiloss"}.get(override, "joint")
    with pytest.raises(ConfigError, match=msg):
        resolve_config("synthetic", method, overrides=[override])


def test_npz_val_fraction_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"val_fraction"):
        resolve_config(str(tmp_path / "x.npz"), "joint", overrides=["data.val_fraction=1.5"])


def test_misspelled_section_is_reported_with_the_other_errors():
    with pytest.raises(ConfigError) as e:
        resolve_config("synthetic", "joint", overrides=["optm.lr=0.1", "train.eval_every=0", "method.alpah=1"])
    text = str(e.value)
    assert "unknown config section 'optm'. Did you mean 'optim'?" in text
    assert "eval_every must be >= 1" in text and "unknown key 'method.alpah'" in text


def test_bench_epochs_zero_is_refused(tmp_path, capsys):
    assert main(["bench", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


def test_methods_piped_into_head_ends_quietly():
    cmd = f"{sys.executable} -m mmbalance methods | head -n 1"
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() and "Traceback" not in proc.stderr, proc.stderr


def test_methods_and_datasets_by_name(capsys):
    assert main(["methods", "ogm_ge"]) == 0
    out = capsys.readouterr().out
    assert "paper: Peng et al., CVPR 2022" in out and "kind: optimisation" in out
    assert "alpha = " in out and "cremad" in out  # an option with its default; the dataset presets
    assert main(["datasets", "npz"]) == 0
    out = capsys.readouterr().out
    assert "standardize = 'auto'" in out and "val_fraction = 0.1" in out
    assert main(["methods", "ogm_gee"]) == 2
    assert "Did you mean 'ogm_ge'" in capsys.readouterr().err


def test_end_of_train_prints_per_modality_accuracies_and_folder(tmp_path, capsys):
    main(["train", "--dataset", "synthetic", "--method", "multiloss", "--out", str(tmp_path), "epochs=1",
          "model.feature_dim=8", "train.progress=off", *SMALL])
    out = capsys.readouterr().out
    assert "x1: zero-out 0." in out and "head 0." in out and f"run folder: {tmp_path}" in out


def test_thread_count_auto_is_one_for_small_models_and_restored():
    before = torch.get_num_threads()
    tr = Trainer(tiny_config("joint", SMALL + ["train.threads=0"]), None, quiet=True)
    assert tr.threads == 1
    tr.fit()
    assert torch.get_num_threads() == before
    assert Trainer(tiny_config("joint", SMALL + ["train.threads=2"]), None, quiet=True).threads == 2


def test_result_records_compute_and_warmup_and_late_zero_out(tmp_path):
    res = Trainer(tiny_config("gmm_adaptive", ["method.warmup_epochs=1", "train.epochs=3"] + SMALL),
                  tmp_path, quiet=True).fit()
    assert res["samples_seen"] == 3 * 96 and res["warmup_epochs"] == 1
    assert res["best_epoch_in_warmup"] == (res["best_epoch"] < 1)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    late = res["val_zero_out_last_k"]
    assert late["k"] == 3
    assert late["x2"] == pytest.approx(sum(r["val_x2_zero_out_accuracy"] for r in rows) / 3, abs=1e-6)
    zo = {m: d["zero_out_accuracy"] for m, d in res["test"]["modalities"].items()}
    assert res["weak_modality"] == min(zo, key=zo.get)
    assert "best_epoch_in_warmup" not in Trainer(tiny_config("joint", SMALL), None, quiet=True).fit()


def test_resume_refuses_when_the_data_statistics_changed(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    split = np.array(["train"] * 60 + ["val"] * 15 + ["test"] * 15)
    path = tmp_path / "feat.npz"
    np.savez(path, y=y, split=split, x_a=rng.normal(500, 100, (n, 4)) + y[:, None] * 50, x_b=rng.normal(size=(n, 3)))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(path), "--method", "joint", "--out", str(out), "--quiet", "epochs=1",
                 "train.progress=off", "train.threads=1"]) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    mean = state["data_transform"]["standardize"]["a"]["mean"]
    assert mean.shape == (4,) and float(mean.mean()) > 400  # fitted on the raw train rows
    np.savez(path, y=y, split=split, x_a=rng.normal(900, 100, (n, 4)), x_b=rng.normal(size=(n, 3)))
    with pytest.raises(MMBalanceError, match="data's fitted statistics .* differ from the checkpoint's"):
        run_from_dir(out, quiet=True, overrides=["epochs=2"])
