"""Reports (issue 10, points 2-3): the paired statistics by hand, self-contained report.html for a
real tiny run and a tiny bench, the CLI, and a headless-Chromium screenshot when Chromium exists."""
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mmbalance.report import stats as S

T_0975_2 = 4.302653  # scipy.stats.t.ppf(0.975, 2), from tables


# ---------------------------------------------------------------------------------------- stats

def test_t_interval_by_hand():
    t = S.t_interval([1, 2, 3])
    assert t["n"] == 3 and t["mean"] == pytest.approx(2.0) and t["std"] == pytest.approx(1.0)
    hw = T_0975_2 * 1 / math.sqrt(3)
    assert hw == pytest.approx(2.484138, abs=1e-6)
    assert t["half_width"] == pytest.approx(hw, abs=1e-5)
    assert (t["low"], t["high"]) == (pytest.approx(2 - hw, abs=1e-5), pytest.approx(2 + hw, abs=1e-5))


def test_t_interval_small_n():
    one = S.t_interval([0.25])
    assert one["mean"] == 0.25 and one["half_width"] is None and one["low"] is None
    assert S.t_interval([])["mean"] is None


def _rows():
    rows = []
    for seed, (ja, oa, jx1, jx2, ox2) in enumerate([(0.5, 0.6, 0.9, 0.3, 0.4), (0.6, 0.8, 0.8, 0.2, 0.4),
                                                     (0.7, 1.0, 0.9, 0.4, 0.5)]):
        rows.append({"dataset": "d", "method": "joint", "seed": seed, "accuracy": ja,
                     "zero_out_x1": jx1, "zero_out_x2": jx2})
        rows.append({"dataset": "d", "method": "ogm_ge", "seed": seed, "accuracy": oa,
                     "zero_out_x1": jx1, "zero_out_x2": ox2})
    rows.append({"dataset": "d", "method": "solo", "seed": 5, "accuracy": 0.9, "zero_out_x1": 0.1, "zero_out_x2": 0.1})
    rows.append({"dataset": "d", "method": "solo", "seed": 0, "accuracy": 0.9, "zero_out_x1": 0.1, "zero_out_x2": 0.1})
    return rows


def test_paired_comparison_matches_seeds():
    rows = _rows()
    assert S.weak_modality(rows, "d") == "x2"  # joint: x1 0.867, x2 0.3
    pc = S.paired_comparison(rows, "d", "accuracy")
    # ogm_ge - joint per seed: 0.1, 0.2, 0.3 -> mean 0.2, half-width t * 0.1 / sqrt(3)
    assert pc["ogm_ge"]["seeds"] == [0, 1, 2]
    assert pc["ogm_ge"]["mean"] == pytest.approx(0.2)
    assert pc["ogm_ge"]["half_width"] == pytest.approx(T_0975_2 * 0.1 / math.sqrt(3), abs=1e-6)
    # solo shares only seed 0 with joint: a difference, no interval
    assert pc["solo"]["seeds"] == [0] and pc["solo"]["mean"] == pytest.approx(0.4)
    assert pc["solo"]["half_width"] is None
    weak = S.paired_comparison(rows, "d", "zero_out_x2")
    assert weak["ogm_ge"]["mean"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert S.paired_comparison(rows, "other", "accuracy") == {}


def test_read_results_csv_parses(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("dataset,method,seed,accuracy,best_epoch_in_warmup,head_x1\nsynthetic,joint,0,0.5,False,\n")
    (r,) = S.read_results_csv(p)
    assert r == {"dataset": "synthetic", "method": "joint", "seed": 0, "accuracy": 0.5,
                 "best_epoch_in_warmup": False, "head_x1": None}


# ------------------------------------------------------------------------------- reports (matplotlib)

def _check_self_contained(html_path: Path, pngs):
    text = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), "external resource in report"
    assert "<script" not in text.lower()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == len(pngs) >= 1
    for p in pngs:
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.parent == html_path.parent
    return text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from mmbalance.cli import main
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--dataset", "synthetic", "--method", "multiloss", "--out", str(out), "--quiet",
                 "epochs=2", "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from mmbalance.cli import main
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--methods", "joint,ogm_ge", "--seeds", "0,1", "--epochs", "1", "--out", str(out),
                 "data.n_train=200", "data.n_val=50", "data.n_test=50", "train.threads=1"]) == 0
    return out


def test_run_report(tiny_run):
    from mmbalance.report import write_run_report
    path = write_run_report(tiny_run)
    assert path == tiny_run / "report.html"
    pngs = [tiny_run / "report_modalities.png", tiny_run / "report_curves.png"]
    text = _check_self_contained(path, pngs)
    assert "multiloss" in text and "Training curves" in text and "Configuration" in text
    assert "Diagnostics" not in text and not (tiny_run / "report_gap.png").exists()


def test_run_report_with_diagnostics_and_warmup(tiny_run, tmp_path):
    from mmbalance.report import write_run_report
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "report*"))
    res = json.loads((run / "result.json").read_text())
    res["warmup_epochs"] = 1
    (run / "result.json").write_text(json.dumps(res))
    (run / "diagnostics.json").write_text(json.dumps({
        "split": "test", "modalities": ["x1", "x2"], "num_samples": 50, "fused_accuracy": 0.8,
        "per_modality": {"x1": {"zero_out_accuracy": 0.8, "probe_accuracy": 0.85, "reference_accuracy": 0.86},
                         "x2": {"zero_out_accuracy": 0.4, "probe_accuracy": 0.5}},
        "shapley": {"level": "feature", "exact": True, "accuracy": {"x1": 0.5, "x2": 0.1},
                    "true_class_prob": {"x1": 0.4, "x2": 0.1}, "v_all": {"accuracy": 0.8}, "v_none": {"accuracy": 0.2}},
        "cur": {"defined": False},
        "gap": {"pairs": {"x1-x2": {"mean": 0.3, "std": 0.2,
                                    "histogram": {"edges": [-1, -0.5, 0, 0.5, 1], "counts": [2, 10, 25, 13]},
                                    "gmm": {"weights": [0.6, 0.4], "means": [0.1, 0.6], "variances": [0.02, 0.05],
                                            "balanced_share": 0.6}}}},
        "ensemble_gap": {"source": "heads", "ensemble_accuracy": 0.78, "gap": 0.02},
        "verdicts": {"x1": "x1: used; removing it costs 40 points", "x2": "x2: barely used"}}))
    path = write_run_report(run)
    text = _check_self_contained(path, [run / "report_modalities.png", run / "report_curves.png",
                                        run / "report_gap.png"])
    for s in ("Verdicts", "removing it costs 40 points", "Shapley values", "Modality gap", "Ensemble gap",
              "Conditional utilisation rate"):
        assert s in text


def test_bench_report(tiny_bench):
    from mmbalance.report import write_bench_report
    path = write_bench_report(tiny_bench)
    pngs = [tiny_bench / f"report_synthetic_{k}.png" for k in ("accuracy", "weak_zero_out", "weak_probe", "cost")]
    text = _check_self_contained(path, pngs)
    assert "probe x1" in text and "probe x2" in text
    assert "Paired comparison against joint" in text and "ogm_ge" in text
    assert (tiny_bench / "results.md").is_file()  # results.md keeps working


def test_cli_report(tiny_run, tiny_bench, tmp_path, capsys):
    from mmbalance.cli import main
    assert main(["report", str(tiny_run)]) == 0
    assert main(["report", str(tiny_bench)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # neither a run nor a bench: a clear error
    assert "neither a run folder" in capsys.readouterr().err


def test_missing_matplotlib_message(monkeypatch):
    import builtins

    from mmbalance.errors import MMBalanceError
    from mmbalance.report import plots
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MMBalanceError, match="pip install matplotlib"):
        plots._plt()


# ------------------------------------------------------------------------------ headless Chromium

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _screenshot(html: Path, png: Path, profile: Path) -> None:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
           f"--screenshot={png}", "--window-size=1200,2000", html.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH: headless screenshot test skipped "
                                                "(apt-get install chromium to run it)")
@pytest.mark.parametrize("kind", ["run", "bench"])
def test_report_renders_in_chromium(kind, tiny_run, tiny_bench, tmp_path):
    from PIL import Image

    from mmbalance.report import write_report
    html = write_report(tiny_run if kind == "run" else tiny_bench)
    png = tmp_path / f"{kind}.png"
    _screenshot(html, png, tmp_path / "profile")
    assert png.is_file(), "chromium wrote no screenshot"
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot looks blank"
