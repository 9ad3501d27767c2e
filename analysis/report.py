"""`ttt report`: which of the paper's claims a store's runs support (`analysis.claims`),
as one self-contained HTML page (figures embedded), the same as Markdown, and the
verdicts as JSON.

The verdict of a claim, from its points (one signed comparison each):
- **no runs**: nothing in the store measures it (the spec that would is named);
- **not evidence**: a language-model claim whose runs are above the corpus's trigram
  floor (they have not learned local statistics yet); a claim about context where
  TTT-E2E's context use is zero within its error; a recall finding where the task
  failed its validity conditions (full attention >= 95% at every distance, SWA at
  chance beyond its window);
- **contradicted**: some point is beyond its interval and the store's seed threshold on
  the wrong side;
- **supported**: every point is, on the expected side;
- **inconclusive**: otherwise (an interval that holds zero, a difference within the
  seed threshold, one seed and so no interval).
Bootstrap intervals use fixed seeds, so the same store gives the same verdicts.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from analysis.claims import CLAIMS, Claim, Evidence, Point
from analysis.figures import build_all
from analysis.recipes import LOSS, Data, context_length, finished, run_flops_per_token
from ttt import tags as TAG
from ttt.data.floors import NAMES
from ttt.data.recall import SOURCE as RECALL_SOURCE
from ttt.tracking import MlflowRun, client, run_link

VERDICTS = ("supported", "contradicted", "inconclusive", "not evidence", "no runs")
# The figures a report embeds, in order, when the store has their data.
REPORT_FIGURES = (
    "fig1_context_length", "table1_ladder", "recall_by_distance", "fig4_window",
    "fig4_chunk", "fig4_ttt_layers", "fig5_model_size", "fig5_training_tokens",
    "fig6_token_index", "inner_lr_meta", "compute", "fig1_prefill_latency", "table2_niah",
)  # fmt: skip


@dataclass
class Verdict:
    claim: str
    verdict: str
    reason: str
    points: list[dict]
    runs: list[dict]  # run_id, run_name, experiment, link
    paper: str
    statement: str
    source: str
    measure: str
    spec: str


def _sign(claim: Claim) -> int:
    return 1 if claim.expect == "positive" else -1  # "negative", "not_positive"


def _point_call(claim: Claim, p: Point) -> str:
    """support, contradict or undecided, for one point."""
    s = _sign(claim) * p.value
    if claim.by_sign:
        return "support" if s > 0 else "contradict"
    if math.isnan(p.lo) or math.isnan(p.hi) or p.pairs < 2:
        return "undecided"  # one seed: no interval, no call
    if claim.expect == "not_positive":  # "does not grow": all of the interval at or below 0
        return "contradict" if p.lo > 0 else "support" if p.hi <= 0 else "undecided"
    if p.noise or p.lo <= 0 <= p.hi:
        return "undecided"
    return "support" if s > 0 else "contradict"


def _above_trigram(runs: pl.DataFrame, floors: dict) -> list[str]:
    """Runs whose final eval loss is above their corpus's trigram floor."""
    if LOSS not in runs.columns or "data.source" not in runs.columns:
        return []
    out = []
    for r in runs.iter_rows(named=True):
        f = floors.get(r["data.source"])
        if f is not None and 3 in f.orders and r[LOSS] is not None and r[LOSS] > f.orders[3]:
            out.append(r.get("run_name") or r["run_id"])
    return out


def _on_recall(runs: pl.DataFrame) -> list[str]:
    """Runs trained and evaluated on the recall task (`data.source=recall`)."""
    if "data.source" not in runs.columns:
        return []
    return [
        r.get("run_name") or r["run_id"]
        for r in runs.iter_rows(named=True)
        if r["data.source"] == RECALL_SOURCE
    ]


def _no_context_use(runs: pl.DataFrame) -> bool:
    """TTT-E2E's runs use no context beyond the window: every one's context use is
    within two standard errors of zero (runs that did not record it do not count)."""
    if "context_use" not in runs.columns:
        return False
    ttt = runs.filter(pl.col("method") == "ttt_e2e").drop_nulls("context_use")
    if ttt.is_empty() or "context_use_se" not in ttt.columns:
        return False
    return all(
        r["context_use_se"] is not None and abs(r["context_use"]) <= 2 * r["context_use_se"]
        for r in ttt.iter_rows(named=True)
    )


def judge(claim: Claim, ev: Evidence | None, data: Data, valid: bool | None) -> tuple[str, str]:
    """(verdict, reason) of one claim."""
    if ev is None or not ev.points:
        return "no runs", f"no run in the store measures it: run {claim.spec}"
    if claim.lm and (tasks := _on_recall(ev.runs)):
        return "not evidence", (
            f"{len(tasks)} of its runs are on the recall task ({', '.join(tasks[:4])}"
            f"{', ...' if len(tasks) > 4 else ''}), a synthetic task with no language in it: "
            "their loss says nothing about a language-model claim"
        )
    if claim.lm:
        above = _above_trigram(ev.runs, data.floors())
        if above:
            return "not evidence", (
                f"{len(above)} of its runs are above the corpus's trigram floor "
                f"({', '.join(above[:4])}{', ...' if len(above) > 4 else ''}): they have not "
                "learned local statistics, so their differences are about training speed"
            )
    if claim.about_context and _no_context_use(ev.runs):
        return "not evidence", (
            "TTT-E2E's context use is zero within its error: these runs use no context "
            "beyond the window, so a claim about context cannot be read from them"
        )
    if claim.recall and not claim.validity and valid is not True:
        return "not evidence", (
            "the recall task was not valid in this store (full attention below 95% at some "
            "distance, or SWA above chance beyond its window)"
            if valid is False
            else "the recall task's validity is not measured here (needs full and SWA runs)"
        )
    calls = [_point_call(claim, p) for p in ev.points]
    if "contradict" in calls:
        bad = [p.where for p, c in zip(ev.points, calls, strict=True) if c == "contradict"]
        return "contradicted", f"against the claim at: {', '.join(bad)}"
    if all(c == "support" for c in calls):
        return "supported", f"every point ({len(calls)}) on the claimed side, beyond noise"
    one_seed = all(p.pairs < 2 for p in ev.points) and not claim.by_sign
    why = (
        "one seed: no interval to decide on"
        if one_seed
        else ("an interval holds zero or a difference is within the store's seed threshold")
    )
    return "inconclusive", why


def _run_rows(runs: pl.DataFrame, data: Data, links) -> list[dict]:
    if "run_id" not in runs.columns:
        return []
    out = []
    for r in runs.unique("run_id", maintain_order=True).iter_rows(named=True):
        out.append(
            {
                "run_id": r["run_id"],
                "run_name": r.get("run_name") or r["run_id"][:8],
                "experiment": r.get("experiment"),
                "link": links(r["run_id"]),
            }
        )
    return out


def verdicts(data: Data, links=lambda run_id: "") -> list[Verdict]:
    """Every claim's verdict on the store, validity of the recall task first."""
    evidence = {c.id: c.measure(data) for c in CLAIMS}
    validity = [c for c in CLAIMS if c.validity]
    if all(evidence[c.id] is not None for c in validity):
        valid = all(judge(c, evidence[c.id], data, None)[0] == "supported" for c in validity)
    else:
        valid = None
    out = []
    for c in CLAIMS:
        ev = evidence[c.id]
        verdict, reason = judge(c, ev, data, valid)
        out.append(
            Verdict(
                c.id, verdict, reason,
                [asdict(p) for p in ev.points] if ev else [],
                _run_rows(ev.runs, data, links) if ev else [],
                c.paper_text, c.statement, c.source, c.measure_text, c.spec,
            )
        )  # fmt: skip
    return out


def provenance(data: Data) -> dict:
    """What was run: commits, data fingerprints, compute spent (training FLOPs by the
    project's own count), and the store's seed threshold."""
    runs = finished(data.runs)
    commits = sorted({c for c in _tag_values(data, TAG.GIT_COMMIT) if c})
    flops = 0.0
    for r in runs.iter_rows(named=True):
        try:
            per = run_flops_per_token(r)
        except Exception:  # a run of a config this version cannot rebuild: not counted
            continue
        flops += (
            per * r.get("train.steps", 0) * r.get("data.batch_size", 0) * r.get("data.seq_len", 0)
        )
    floors = data.floors()
    return {
        "experiments": sorted(set(runs["experiment"].to_list())) if "experiment" in runs.columns
        else [],
        "runs": runs.height,
        "commits": commits,
        "data": {s: f.fingerprint for s, f in floors.items()},
        "training_flops": flops,
        "floors": {s: {NAMES[k]: v for k, v in sorted(f.orders.items())}
                   for s, f in floors.items()},
    }  # fmt: skip


def _tag_values(data: Data, tag: str) -> list[str]:
    c = client(data.tracking_uri)
    ids = [e.experiment_id for e in c.search_experiments()
           if data.experiments is None or e.name in data.experiments]  # fmt: skip
    found = c.search_runs(ids, max_results=5000) if ids else []
    return [r.data.tags.get(tag, "") for r in found]


def threshold(data: Data) -> float | None:
    """The store's own seed threshold, as the paired figures compute it (Fig 1's)."""
    table = context_length(data)
    if table is None or "seed_spread" not in table.columns:
        return None
    spread = table["seed_spread"].drop_nulls()
    return float(spread[0]) if spread.len() else None


# --- rendering -------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.4f}" if isinstance(v, float) else str(v)


def _point_text(p: dict) -> str:
    interval = (
        f" [{p['lo']:+.4f}, {p['hi']:+.4f}]"
        if not (math.isnan(p["lo"]) or math.isnan(p["hi"]))
        else " (no interval)"
    )
    paper = f"; paper {p['paper']:+.4f}" if p.get("paper") is not None else ""
    seeds = f", {p['pairs']} seed{'s' if p['pairs'] != 1 else ''}"
    return f"{p['where']}: {p['value']:+.4f}{interval}{seeds}{paper}"


def markdown(vs: list[Verdict], prov: dict, thr, seconds: float, figures: dict) -> str:
    lines = ["# Which of the paper's claims do these runs support?", ""]
    lines.append(f"Experiments: {', '.join(prov['experiments']) or 'none'}; "
                 f"{prov['runs']} finished runs; report made in {seconds:.1f} s.")  # fmt: skip
    lines.append("")
    counts = {v: sum(x.verdict == v for x in vs) for v in VERDICTS}
    lines.append("Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    lines += ["", "| claim | source | verdict | why |", "|---|---|---|---|"]
    for v in vs:
        lines.append(f"| {v.claim} | {v.source} | **{v.verdict}** | {v.reason} |")
    lines.append("")
    for v in vs:
        lines += [f"## {v.claim}: {v.verdict}", "", f"*{v.statement}* ({v.source})", ""]
        lines.append(f"- Measured as: {v.measure}.")
        lines.append(f"- The paper: {v.paper}.")
        lines.append(f"- Verdict: **{v.verdict}**: {v.reason}.")
        for p in v.points:
            lines.append(f"  - {_point_text(p)}")
        if v.runs:
            links = ", ".join(f"[{r['run_name']}]({r['link']})" if r["link"] else r["run_name"]
                              for r in v.runs[:40])  # fmt: skip
            more = f" and {len(v.runs) - 40} more" if len(v.runs) > 40 else ""
            lines.append(f"- Runs: {links}{more}")
        else:
            lines.append(f"- Runs: none; `{v.spec}` would produce them")
        lines.append("")
    lines += ["## The store", ""]
    for source, orders in prov["floors"].items():
        values = ", ".join(f"{k} {x:.3f}" for k, x in orders.items())
        lines.append(f"- Floors of {source} (held-out nats/token): {values}")
    lines.append(f"- Seed threshold (largest spread of one paired comparison across seeds): "
                 f"{'none (one seed)' if thr is None else f'{thr:.4f} nats'}")  # fmt: skip
    lines.append(f"- Commits: {', '.join(c[:10] for c in prov['commits']) or 'not recorded'}")
    lines.append(f"- Data fingerprints: {json.dumps(prov['data'])}")
    lines.append(f"- Training compute: {prov['training_flops']:.3g} FLOPs (the project's count)")
    lines.append("")
    for name, png in figures.items():
        lines += [f"![{name}]({png})", ""]
    return "\n".join(lines)


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}
.supported{background:#d6f5d6}.contradicted{background:#f8d0d0}.inconclusive{background:#f3f0c8}
.not-evidence{background:#e4e4e4}.no-runs{background:#f4f4f4;color:#666}
img{max-width:100%;border:1px solid #eee;margin:1em 0}"""


def page(vs: list[Verdict], prov: dict, thr, seconds: float, figures: dict) -> str:
    """The same content as `markdown`, as one HTML file with the figures inline."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>ttt report</title>"
           f"<style>{CSS}</style></head><body>",
           "<h1>Which of the paper's claims do these runs support?</h1>",
           f"<p>Experiments: {e(', '.join(prov['experiments']) or 'none')}; {prov['runs']} "
           f"finished runs; report made in {seconds:.1f} s.</p>",
           "<table id='verdicts'><tr><th>claim</th><th>source</th><th>verdict</th>"
           "<th>why</th></tr>"]  # fmt: skip
    for v in vs:
        cls = v.verdict.replace(" ", "-")
        out.append(f"<tr class='{cls}'><td><a href='#{e(v.claim)}'>{e(v.claim)}</a></td>"
                   f"<td>{e(v.source)}</td><td><b>{e(v.verdict)}</b></td><td>{e(v.reason)}"
                   "</td></tr>")  # fmt: skip
    out.append("</table>")
    for v in vs:
        cls = v.verdict.replace(" ", "-")
        out.append(f"<h2 id='{e(v.claim)}' class='{cls}'>{e(v.claim)}: {e(v.verdict)}</h2>")
        out.append(f"<p><i>{e(v.statement)}</i> ({e(v.source)})</p><ul>")
        out.append(f"<li>Measured as: {e(v.measure)}.</li><li>The paper: {e(v.paper)}.</li>")
        out.append(f"<li>Verdict: <b>{e(v.verdict)}</b>: {e(v.reason)}.</li>")
        out += [f"<li>{e(_point_text(p))}</li>" for p in v.points]
        if v.runs:
            links = ", ".join(f"<a class='run' href='{e(r['link'])}'>{e(r['run_name'])}</a>"
                              if r["link"] else e(r["run_name"]) for r in v.runs)  # fmt: skip
            out.append(f"<li>Runs: {links}</li>")
        else:
            out.append(f"<li>Runs: none; <code>{e(v.spec)}</code> would produce them</li>")
        out.append("</ul>")
    out.append("<h2>The store</h2><ul>")
    for source, orders in prov["floors"].items():
        values = ", ".join(f"{k} {x:.3f}" for k, x in orders.items())
        out.append(f"<li>Floors of {e(source)} (held-out nats/token): {e(values)}</li>")
    out.append(f"<li>Seed threshold: {'none (one seed)' if thr is None else f'{thr:.4f} nats'}"
               f"</li><li>Commits: {e(', '.join(c[:10] for c in prov['commits']) or '-')}</li>"
               f"<li>Data fingerprints: {e(json.dumps(prov['data']))}</li>"
               f"<li>Training compute: {prov['training_flops']:.3g} FLOPs</li></ul>")  # fmt: skip
    for name, png in figures.items():
        b64 = base64.b64encode(png.read_bytes()).decode()
        out.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,{b64}'>")
    out.append("</body></html>")
    return "\n".join(out)


def build(tracking_uri: str, experiments: list[str] | None, out: Path) -> dict:
    """Write report.html, report.md and verdicts.json (and the figures the page embeds)
    into `out`; returns what was written and the verdicts."""
    start = time.perf_counter()
    data = Data(tracking_uri, experiments)
    c = client(tracking_uri)
    exp_of = {}

    def link(run_id: str) -> str:
        if run_id not in exp_of:
            exp_of[run_id] = c.get_run(run_id).info.experiment_id
        return run_link(tracking_uri, exp_of[run_id], run_id)

    vs = verdicts(data, link)
    prov = provenance(data)
    thr = threshold(data)
    written, _ = build_all(tracking_uri, out / "figures", experiments, ("png",),
                           list(REPORT_FIGURES))  # fmt: skip
    figures = {n: written[n][0] for n in REPORT_FIGURES if n in written}
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(vs, prov, thr, seconds, {n: f"figures/{p.name}" for n, p in figures.items()})
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page(vs, prov, thr, seconds, figures))
    result = {"verdicts": [asdict(v) for v in vs], "store": prov, "seed_threshold": thr,
              "seconds": round(seconds, 2), "tracking_uri": tracking_uri}  # fmt: skip
    (out / "verdicts.json").write_text(json.dumps(result, indent=2, default=str))
    return {"files": [out / "report.html", out / "report.md", out / "verdicts.json"],
            "verdicts": vs, "seconds": seconds}  # fmt: skip


def log_to_parents(tracking_uri: str, experiments: list[str] | None, files: list[Path]) -> list:
    """The report's files as artifacts (`report/`) of each experiment's sweep parent run;
    the parent runs written to."""
    c = client(tracking_uri)
    ids = [e.experiment_id for e in c.search_experiments()
           if experiments is None or e.name in experiments]  # fmt: skip
    parents = c.search_runs(ids, f"tags.`{TAG.ROLE}` = 'sweep'") if ids else []
    for parent in parents:
        run = MlflowRun.attach(tracking_uri, parent.info.run_id)
        for path in files:
            run.log_artifact(path, "report")
    return parents
