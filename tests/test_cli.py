import csv

import pytest

from mmbalance.bench.runner import summarize
from mmbalance.cli import main
from mmbalance.methods import METHODS


def test_methods_and_datasets_listing(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS.names():
        assert name in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "npz" in out


def test_unknown_key_fails_before_training(tmp_path, capsys):
    rc = main(["train", "--dataset", "synthetic", "--method", "ogm_ge", "--out", str(tmp_path / "r"), "method.alpah=1"])
    assert rc == 2
    assert "Did you mean 'alpha'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_writes_csv_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--methods", "joint,unimodal", "--seeds", "0,1", "--epochs", "1", "--out", str(out),
               "data.n_train=200", "data.n_val=50", "data.n_test=50"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("joint", "0"), ("joint", "1"), ("unimodal", "0"), ("unimodal", "1")]
    md = (out / "results.md").read_text()
    assert "| joint | 2 |" in md and "zero-out x2" in md
    assert "| joint | 2 |" in capsys.readouterr().out


def test_summarize_mean_std():
    rows = [{"dataset": "d", "method": "m", "accuracy": a, "macro_f1": 0.5, "zero_out_a": 0.1, "train_seconds": 1.0,
             "late_zero_out_a": late, "samples_seen": 300, "best_epoch_in_warmup": warm}
            for a, late, warm in ((0.5, 0.2, True), (0.7, 0.4, False))]
    md = summarize(rows)
    assert "| m | 2 | 60.00 ± 14.14 | 50.00 ± 0.00 | 10.00 ± 0.00 | 30.00 ± 14.14 | 300 | 1/2 | 1.0 |" in md
    rows = [{k: v for k, v in r.items() if k not in ("late_zero_out_a", "best_epoch_in_warmup")} for r in rows]
    assert "| 10.00 ± 0.00 | - | 300 | - | 1.0 |" in summarize(rows)


def test_overrides_may_be_interleaved_with_options(tmp_path):
    out = tmp_path / "r"
    rc = main(["train", "--dataset", "synthetic", "--method", "unimodal", "method.modality=x2", "--out", str(out),
               "epochs=1", "--quiet", "data.n_train=100", "data.n_val=50", "data.n_test=50"])
    assert rc == 0
    import yaml
    tree = yaml.safe_load((out / "config.yaml").read_text())
    assert tree["method"]["modality"] == "x2" and tree["train"]["epochs"] == 1
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "synthetic", "--bogus-flag"])
