"""Self-contained HTML reports: ``report.html`` with every figure embedded as a base64 PNG data
URI (no scripts, no external resources; opens from the file system), and the PNGs beside it."""
from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import MMBalanceError
from . import stats as S

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#222;
background:#fff;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.meta{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:.8em}
.pos{color:#176417}.neg{color:#a11}.note{font-size:.85em;color:#555}
"""


def _e(x: Any) -> str:
    return _html.escape(str(x))


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}f}"
    return _e(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _f(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _figure(png: Path, caption: str) -> str:
    return (f'<figure><img alt="{_e(caption)}" src="{_data_uri(png)}"><figcaption>{_e(caption)} '
            f'(<code>{_e(Path(png).name)}</code> beside this file)</figcaption></figure>')


def _page(title: str, body: List[str]) -> str:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n<p class=\"meta\">written by mmbalance "
            f"report, {stamp}</p>\n" + "\n".join(body) + "\n</body></html>\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MMBalanceError(f"cannot read {path}: {exc}") from exc


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (unreadable lines skipped; a missing file gives [])."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{100 * v:.2f}"


# --------------------------------------------------------------------------------------- run report

def write_run_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` (and ``report_*.png`` beside it) for a training run folder holding
    ``result.json`` and ``metrics.jsonl`` (plus ``config.yaml`` and ``diagnostics.json`` when
    present). Returns the path of ``report.html`` (in ``out_dir``, default ``run_dir``)."""
    from . import plots as P
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        raise MMBalanceError(f"{run_dir} has no result.json: not a finished mmbalance run folder")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    res = _read_json(run_dir / "result.json")
    rows = read_metrics(run_dir / "metrics.jsonl")
    diag = _read_json(run_dir / "diagnostics.json") if (run_dir / "diagnostics.json").is_file() else None
    test, val = res.get("test") or {}, res.get("val") or {}
    mods = list(res.get("modalities") or (test.get("modalities") or {}).keys())
    title = f"mmbalance run: {res.get('method', '?')} on {res.get('dataset', '?')} (seed {res.get('seed', '?')})"
    body: List[str] = []

    # summary
    info = [("method", res.get("method")), ("dataset", res.get("dataset")), ("seed", res.get("seed")),
            ("epochs", res.get("epochs")), ("best epoch", res.get("best_epoch")),
            ("warm-up epochs", res.get("warmup_epochs")), ("best epoch in warm-up", res.get("best_epoch_in_warmup")),
            ("samples seen", res.get("samples_seen")), ("train seconds", res.get("train_seconds")),
            ("weak modality", res.get("weak_modality")), ("run folder", str(run_dir))]
    body.append("<h2>Summary</h2>" + _table(["", "value"], [(k, v) for k, v in info if v is not None]))
    mrows = []
    for name, split in (("test", test), ("val", val)):
        if split:
            mrows.append((name, _pct(split.get("accuracy")), _pct(split.get("macro_f1")), split.get("loss")))
    if mrows:
        body.append("<h3>Fused model (accuracy and macro-F1 in %)</h3>"
                    + _table(["split", "accuracy", "macro-F1", "loss"], mrows))

    # per modality
    late = res.get("val_zero_out_last_k") or {}
    prow = []
    for m in mods:
        t = (test.get("modalities") or {}).get(m) or {}
        v = (val.get("modalities") or {}).get(m) or {}
        prow.append((m + (" (weak)" if m == res.get("weak_modality") else ""), _pct(t.get("zero_out_accuracy")),
                     _pct(t.get("head_accuracy")), _pct(t.get("probe_accuracy")), _pct(v.get("zero_out_accuracy")),
                     _pct(v.get("head_accuracy")), _pct(late.get(m))))
    if prow:
        body.append("<h2>Per modality</h2><p class=\"note\">zero-out: fused accuracy with only this modality "
                    "kept (the others zeroed); head: the modality's own classifier head, where the method has "
                    "one; probe: a logistic regression on the frozen encoder's features, fitted on train. In %.</p>"
                    + _table(["modality", "test zero-out", "test head", "test probe", "val zero-out", "val head",
                              f"val zero-out, mean of last {late.get('k', 'k')} epochs"], prow))
    bars: Dict[str, Dict[str, Optional[float]]] = {}
    for m in mods:
        t = (test.get("modalities") or {}).get(m) or {}
        bars[m] = {"zero-out (test)": t.get("zero_out_accuracy"), "head (test)": t.get("head_accuracy"),
                   "probe": t.get("probe_accuracy")}
        if diag:
            pm = (diag.get("per_modality") or {}).get(m) or {}
            bars[m]["probe"] = pm.get("probe_accuracy", bars[m]["probe"])
            bars[m]["alone (reference)"] = pm.get("reference_accuracy")
            bars[m]["Shapley (accuracy)"] = ((diag.get("shapley") or {}).get("accuracy") or {}).get(m)
    if any(v is not None for b in bars.values() for v in b.values()):
        png = P.grouped_bars(bars, out / "report_modalities.png", title="per-modality accuracies")
        body.append(_figure(png, "Per modality: zero-out, head, linear probe, standalone and Shapley accuracy "
                                 "(where available)"))

    # curves
    if rows:
        png = P.training_curves(rows, mods, out / "report_curves.png", warmup_epochs=res.get("warmup_epochs"))
        stat_keys = P.method_stat_keys(rows)
        caption = "Fused and per-modality accuracies per epoch"
        if stat_keys:
            caption = "Left: " + caption[0].lower() + caption[1:] + "; right: the method's statistics (coefficients, ratios...) per epoch"
        if res.get("warmup_epochs"):
            caption += "; dashed red line: end of warm-up"
        body.append("<h2>Training curves</h2>" + _figure(png, caption))
        last = rows[-1]
        if stat_keys:
            body.append("<p class=\"note\">method statistics at the last epoch: "
                        + ", ".join(f"{_e(k)} = {_f(last.get(k))}" for k in stat_keys) + "</p>")
    else:
        body.append("<h2>Training curves</h2><p>metrics.jsonl is missing or empty.</p>")

    if diag:
        body += _diagnostics_sections(diag, out)

    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        body.append(f"<h2>Configuration</h2><pre>{_e(cfg.read_text())}</pre>")
    path = out / "report.html"
    path.write_text(_page(title, body), encoding="utf-8")
    return path


def _diagnostics_sections(diag: Dict[str, Any], out: Path) -> List[str]:
    from . import plots as P
    body = [f"<h2>Diagnostics</h2><p class=\"meta\">split {_e(diag.get('split', '?'))}, "
            f"{_e(diag.get('num_samples', '?'))} samples, fused accuracy {_pct(diag.get('fused_accuracy'))} %</p>"]
    verdicts = diag.get("verdicts") or {}
    if verdicts:
        # a verdict is a sentence that starts with its modality ("x2: not used; ...")
        body.append("<h3>Verdicts</h3>" + "".join(
            f"<p><b>{_e(m)}</b>: {_e(v[len(m) + 2:] if v.startswith(f'{m}: ') else v)}</p>" for m, v in verdicts.items()))
    pm = diag.get("per_modality") or {}
    if pm:
        cols = ["zero_out_accuracy", "head_accuracy", "probe_accuracy", "reference_accuracy"]
        body.append("<h3>Per modality (%)</h3>" + _table(
            ["modality", "zero-out", "head", "linear probe", "alone (reference)"],
            [[m] + [_pct((d or {}).get(c)) for c in cols] for m, d in pm.items()]))
    sh = diag.get("shapley") or {}
    if sh.get("accuracy") or sh.get("true_class_prob"):
        ms = list(dict.fromkeys(list(sh.get("accuracy") or {}) + list(sh.get("true_class_prob") or {})))
        note = (f"level {_e(sh.get('level', '?'))}, {'exact' if sh.get('exact') else 'Monte-Carlo estimate'}; "
                "values sum to v(all) − v(none)")
        va, vn = sh.get("v_all") or {}, sh.get("v_none") or {}
        if va or vn:
            def _v(d):
                return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in d.items() if isinstance(v, (int, float)))
            note += f"; v(all): {_e(_v(va))}; v(none): {_e(_v(vn))}"
        body.append(f"<h3>Shapley values</h3><p class=\"note\">{note}</p>" + _table(
            ["modality", "accuracy", "true-class probability"],
            [(m, (sh.get("accuracy") or {}).get(m), (sh.get("true_class_prob") or {}).get(m)) for m in ms]))
    cur = diag.get("cur")
    if isinstance(cur, dict):
        if cur.get("defined"):
            body.append("<h3>Conditional utilisation rate</h3>" + _table(
                ["quantity", "value"], [(k, v if not isinstance(v, (dict, list)) else json.dumps(v))
                                        for k, v in cur.items() if k != "defined"]))
        else:
            body.append("<h3>Conditional utilisation rate</h3><p>not defined for this run"
                        + (f": {_e(cur.get('reason'))}" if cur.get("reason") else "") + ".</p>")
    pairs = (diag.get("gap") or {}).get("pairs") or {}
    if pairs:
        rows = []
        for name, p in pairs.items():
            g = (p or {}).get("gmm") or {}
            rows.append((name, (p or {}).get("mean"), (p or {}).get("std"),
                         ", ".join(f"{x:.3f}" for x in g.get("means") or []) or "–", g.get("balanced_share")))
        body.append("<h3>Modality gap</h3><p class=\"note\">per sample: true-class softmax probability of the "
                    "first modality minus the second; a 2-component GMM splits balanced from imbalanced "
                    "samples.</p>" + _table(["pair", "mean", "std", "GMM means", "balanced share"], rows))
        png = P.gap_histograms(pairs, out / "report_gap.png")
        body.append(_figure(png, "Modality gap histograms with the fitted 2-component GMM"))
    eg = diag.get("ensemble_gap")
    if isinstance(eg, dict) and eg:
        body.append("<h3>Ensemble gap</h3>" + _table(
            ["", "value"], [("ensemble source", eg.get("source")), ("ensemble accuracy", eg.get("ensemble_accuracy")),
                            ("fused accuracy", diag.get("fused_accuracy")), ("gap (fused − ensemble)", eg.get("gap"))]))
    return body


# ------------------------------------------------------------------------------------- bench report

def _ms(s: Dict[str, Any]) -> str:
    if s.get("mean") is None:
        return "–"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s.get("std") is not None else f"{100 * s['mean']:.2f}"


def _interval_cell(t: Dict[str, Any]) -> _Raw:
    if t.get("mean") is None:
        return _Raw("–")
    cls = ""
    if t.get("low") is not None:
        cls = "pos" if t["low"] > 0 else ("neg" if t["high"] < 0 else "")
        txt = f"{100 * t['mean']:+.2f} [{100 * t['low']:+.2f}, {100 * t['high']:+.2f}]"
    else:
        txt = f"{100 * t['mean']:+.2f} (n = {t['n']}: no interval)"
    return _Raw(f'<span class="{cls}">{_e(txt)}</span>' if cls else _e(txt))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s).stem) or "dataset"


def write_bench_report(bench_dir: str | Path, reference: str = "joint") -> Path:
    """Write ``report.html`` (and ``report_<dataset>_*.png`` beside it) for a bench folder holding
    ``results.csv``: mean ± std per method, the paired comparison of every method against
    ``reference`` over common seeds (95 % t-interval), and figures. Returns the report path."""
    from . import plots as P
    bench_dir = Path(bench_dir)
    rows = S.read_results_csv(bench_dir / "results.csv")
    mods = S.modalities_of(rows)
    body: List[str] = [f"<p>{len(rows)} runs from <code>{_e(bench_dir / 'results.csv')}</code>. Accuracies in %, "
                       "mean ± sample std over seeds.</p>"]
    for ds in S.datasets_of(rows):
        slug = _slug(ds)
        sub = [r for r in rows if r["dataset"] == ds]
        seeds = sorted({r["seed"] for r in sub}, key=str)
        cols = (["accuracy", "macro_f1"] + [f"zero_out_{m}" for m in mods] + [f"late_zero_out_{m}" for m in mods]
                + [f"head_{m}" for m in mods] + [f"probe_{m}" for m in mods])
        cols = [c for c in cols if any(r.get(c) is not None for r in sub)]
        summ = S.summary(rows, ds, cols + ["samples_seen", "train_seconds"])
        labels = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
        for m in mods:
            labels[f"zero_out_{m}"] = f"zero-out {m}"
            labels[f"late_zero_out_{m}"] = f"val zero-out {m}, late"
            labels[f"head_{m}"] = f"head {m}"
            labels[f"probe_{m}"] = f"probe {m}"
        trs = []
        for meth, d in summ.items():
            n = len([r for r in sub if r["method"] == meth])
            warm = [r.get("best_epoch_in_warmup") for r in sub if r["method"] == meth]
            trs.append([meth, n] + [_Raw(_e(_ms(d[c]))) for c in cols]
                       + [_Raw(f"{d['samples_seen']['mean']:.0f}" if d["samples_seen"]["mean"] is not None else "–"),
                          _Raw(f"{d['train_seconds']['mean']:.2f}" if d["train_seconds"]["mean"] is not None else "–"),
                          _Raw("–" if all(w is None for w in warm) else f"{sum(bool(w) for w in warm)}/{n}")])
        body.append(f"<h2>{_e(ds)}</h2><p class=\"meta\">seeds {_e(', '.join(map(str, seeds)))}</p>"
                    + _table(["method", "n"] + [labels[c] for c in cols]
                             + ["samples/run", "train s", "best in warm-up"], trs))

        weak = S.weak_modality(rows, ds, reference)
        pc_acc = S.paired_comparison(rows, ds, "accuracy", reference)
        if pc_acc:
            pc_weak = S.paired_comparison(rows, ds, f"zero_out_{weak}", reference) if weak else {}
            prs = [[meth, t["n"], _interval_cell(t)] + ([_interval_cell(pc_weak.get(meth, {}))] if weak else [])
                   for meth, t in pc_acc.items()]
            header = ["method", "common seeds", "Δ test accuracy [95 % CI]"] + (
                [f"Δ zero-out {weak} (weak) [95 % CI]"] if weak else [])
            body.append(f"<h3>Paired comparison against {_e(reference)}</h3><p class=\"note\">Per seed run by both: "
                        f"method − {_e(reference)}; mean difference in points with a 95 % t-interval "
                        "(n − 1 degrees of freedom, n = common seeds; no interval for n &lt; 2). Green: interval "
                        "above 0, red: below 0. The weak modality is the one with the lowest mean zero-out "
                        f"accuracy under {_e(reference)}.</p>" + _table(header, prs))
        else:
            body.append(f"<p class=\"note\">no paired comparison: {_e(reference)} did not run on {_e(ds)}.</p>")

        png = P.method_errorbars({m: d["accuracy"] for m, d in summ.items()}, bench_dir / f"report_{slug}_accuracy.png",
                                 title=f"{ds}: fused test accuracy (mean ± std over seeds)")
        body.append(_figure(png, "Fused test accuracy per method, error bars: std over seeds"))
        if weak:
            png = P.method_errorbars({m: S.mean_std([r.get(f"zero_out_{weak}") for r in sub if r["method"] == m])
                                      for m in summ}, bench_dir / f"report_{slug}_weak_zero_out.png",
                                     title=f"{ds}: zero-out accuracy of the weak modality {weak}")
            body.append(_figure(png, f"Test accuracy with only the weak modality {weak} kept (zero-out), per method"))
            if any(r.get(f"probe_{weak}") is not None for r in sub):
                png = P.method_errorbars({m: S.mean_std([r.get(f"probe_{weak}") for r in sub if r["method"] == m])
                                          for m in summ}, bench_dir / f"report_{slug}_weak_probe.png",
                                         title=f"{ds}: linear-probe accuracy of the weak modality {weak}")
                body.append(_figure(png, f"Test accuracy of a logistic regression on the frozen {weak} encoder's "
                                         "features (fitted on train), per method: how much the encoder learned, "
                                         "whatever the fused head makes of it"))
        png = P.cost_scatter(summ, bench_dir / f"report_{slug}_cost.png", title=f"{ds}: accuracy against training cost")
        body.append(_figure(png, "Mean test accuracy against samples seen per run (left) and train seconds (right)"))
    path = bench_dir / "report.html"
    path.write_text(_page(f"mmbalance bench report: {bench_dir.name}", body), encoding="utf-8")
    return path


def write_report(path: str | Path) -> Path:
    """A run report for a run folder (result.json + metrics.jsonl) or a bench report for a bench
    folder (results.csv)."""
    p = Path(path)
    if not p.is_dir():
        raise MMBalanceError(f"{p} is not a folder")
    if (p / "result.json").is_file() and (p / "metrics.jsonl").is_file():
        return write_run_report(p)
    if (p / "results.csv").is_file():
        return write_bench_report(p)
    raise MMBalanceError(f"{p} is neither a run folder (result.json + metrics.jsonl) nor a bench folder "
                         "(results.csv)")
