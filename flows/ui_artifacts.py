"""What the Prefect UI shows per run: table and markdown artifacts built from our manifests and Parquet.

Keys are stable per experiment (`<experiment>-<what>`), so the UI's artifact page shows one
timeline per key with a version per run and round:

    <exp>-<stage>     one row for that stage: round, ran or skipped, rows, fingerprint, wall time
    <exp>-stages      every stage of the run
    <exp>-metrics     the round's metrics (every stage's scalar metrics, train and evaluate first)
    <exp>-rewards     the round's reward histogram (an inline PNG, drawn with matplotlib)
    <exp>-samples     sample generations (or held-out records, for flows that generate nothing)

Building an artifact never fails a run: a problem is logged and the run goes on.
"""

from __future__ import annotations

import base64
import logging
import math
import re

from stages.pipeline.store import ArtifactStore

log = logging.getLogger("align")

TEXT_CHARS = 160


def artifact_key(experiment: str, what: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only: 'Smoke_DPO', 'load_prompts' ->
    'smoke-dpo-load-prompts'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{experiment}-{what}".lower())).strip("-")


def _create(kind: str, key: str, payload, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    try:
        if kind == "table":
            create_table_artifact(payload, key=key, description=description)
        else:
            create_markdown_artifact(payload, key=key, description=description)
    except Exception as e:  # the UI is a view; never fail a stage for it
        log.warning("artifact %s not created: %s: %s", key, type(e).__name__, e)


def _fmt(value):
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    return value


def stage_row(result: dict) -> dict:
    return {"round": result["round"], "stage": result["stage"], "status": result["status"],
            "rows": result["rows"], "fingerprint": result["fingerprint"],
            "wall_s": round(float(result["wall_seconds"]), 2), "peak_gb": result.get("peak_rss_gb"),
            "reason": result.get("reason", ""),
            "path": result["path"]}


def stage_artifact(experiment: str, result: dict) -> None:
    _create("table", artifact_key(experiment, result["stage"]), [stage_row(result)],
            f"{result['stage']} (round {result['round']}): {result['status']}")


def run_artifact(experiment: str, results: list[dict], failed: tuple[str, int] | None = None) -> None:
    """Every stage of the run; `failed` (stage, round) adds the stage that stopped it."""
    rows = [stage_row(r) for r in results]
    if failed:
        rows.append({"round": failed[1], "stage": failed[0], "status": "failed", "rows": None, "fingerprint": "",
                     "wall_s": None, "peak_gb": None, "reason": "see the run's log", "path": ""})
    ran = sum(r["status"] == "ran" for r in results)
    summary = f"experiment {experiment}: {ran} stages ran, {len(results) - ran} skipped"
    if rows:
        _create("table", artifact_key(experiment, "stages"), rows,
                summary + (f", {failed[0]} (round {failed[1]}) failed" if failed else ""))


# -- per round ---------------------------------------------------------------------------------------

def round_artifacts(store: ArtifactStore, experiment: str, round_: int, stages: list[str], shown: int = 5) -> None:
    """The round's metrics table, reward histogram and `shown` samples (the config's
    evaluate.samples_to_show, like evaluate's own metrics), from what is on disk."""
    try:
        present = {s: store.stage_dir(experiment, round_, s) for s in stages}
        manifests = {s: m for s, p in present.items() if (m := store.read_manifest(p)) is not None}
        _create("table", artifact_key(experiment, "metrics"), metrics_rows(round_, manifests),
                f"round {round_} metrics")
        label, values = reward_values(store, present, manifests)
        if values:
            _create("markdown", artifact_key(experiment, "rewards"), histogram_markdown(label, values, round_),
                    f"round {round_}: {label}")
        title, rows = sample_rows(store, present, manifests, shown)
        if rows:
            _create("table", artifact_key(experiment, "samples"), rows, f"round {round_}: {title}")
        if "evaluate" in manifests:
            _create("markdown", artifact_key(experiment, "report"), report_markdown(store, experiment, round_),
                    f"round {round_} report")
    except Exception as e:
        log.warning("round %d artifacts not created: %s: %s", round_, type(e).__name__, e)


def metrics_rows(round_: int, manifests: dict[str, dict]) -> list[dict]:
    order = ["evaluate", "train"] + [s for s in manifests if s not in ("evaluate", "train")]
    rows = []
    for stage in order:
        for name, value in (manifests.get(stage) or {}).get("metrics", {}).items():
            if value is None or isinstance(value, (int, float, str, bool)):
                rows.append({"round": round_, "stage": stage, "metric": name, "value": _fmt(value)})
    return rows


def _column(store: ArtifactStore, path: str, names: list[str]) -> dict | None:
    table = store.read_table(path)
    if not all(n in table.column_names for n in names):
        return None
    return {n: table.column(n).to_pylist() for n in names}


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def reward_values(store: ArtifactStore, paths: dict[str, str], manifests: dict[str, dict]) -> tuple[str, list[float]]:
    """The round's rewards: the annotated samples', else evaluate's held-out scores; offline flows
    that score nothing show evaluate's per-record NLL (or loss) instead."""
    if "annotate" in manifests and (c := _column(store, paths["annotate"], ["score"])):
        return "reward of the round's samples (annotate)", _finite(c["score"])
    if "evaluate" in manifests:
        path = paths["evaluate"]
        if c := _column(store, path, ["score"]):
            return "held-out reward (evaluate)", _finite(c["score"])
        if c := _column(store, path, ["logprob", "tokens"]):
            return "held-out NLL per token, per record (evaluate)", _finite(
                -lp / t for lp, t in zip(c["logprob"], c["tokens"]) if t)
        if c := _column(store, path, ["loss"]):
            return "held-out loss per record (evaluate)", _finite(c["loss"])
    if "build_pool" in manifests and (c := _column(store, paths["build_pool"], ["generation1_reward"])):
        return "reward of the pool's records (build_pool)", _finite(c["generation1_reward"])
    return "", []


def _clip(text) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def sample_rows(store: ArtifactStore, paths: dict[str, str], manifests: dict[str, dict],
                shown: int) -> tuple[str, list[dict]]:
    for stage, title in (("evaluate", "held-out generations of the trained policy (evaluate)"),
                         ("annotate", "the round's scored samples (annotate)"),
                         ("sample", "the round's samples (sample)")):
        if stage in manifests and (c := _column(store, paths[stage], ["prompt", "completion"])):
            table = store.read_table(paths[stage])
            scores = table.column("score").to_pylist() if "score" in table.column_names else [None] * table.num_rows
            return title, [{"prompt": _clip(p), "completion": _clip(g), "score": _fmt(s)}
                           for p, g, s in list(zip(c["prompt"], c["completion"], scores))[:shown]]
    pool_columns = ["prompt_id", "prompt", "generation1", "split"]
    if "build_pool" in manifests and (c := _column(store, paths["build_pool"], pool_columns)):
        nll = {}
        if "evaluate" in manifests and (e := _column(store, paths["evaluate"], ["prompt_id", "logprob", "tokens"])):
            nll = {i: -lp / t for i, lp, t in zip(e["prompt_id"], e["logprob"], e["tokens"]) if t}
        rows = [{"prompt": _clip(p), "completion": _clip(g), "nll_per_token": _fmt(nll.get(i))}
                for i, p, g, s in zip(c["prompt_id"], c["prompt"], c["generation1"], c["split"]) if s == "heldout"]
        return "held-out records (this flow generates nothing) with the trained model's NLL", rows[:shown]
    return "", []


def report_markdown(store: ArtifactStore, experiment: str, round_: int) -> str:
    """The round's report (stages/pipeline/report.py) with its pictures inlined, for the UI."""
    from stages.pipeline.report import round_report

    text, pictures = round_report(store, experiment, round_)
    for name, data in pictures.items():
        text = text.replace(f"({name})", f"(data:image/png;base64,{base64.b64encode(data).decode()})")
    return text


# -- the histogram ---------------------------------------------------------------------------------

def histogram(values: list[float], bins: int | None = None) -> tuple[list[float], list[int]]:
    """Equal-width bins over [min, max] (one unit wide around a single value): (edges, counts)."""
    import numpy as np

    bins = bins or max(5, min(20, int(math.sqrt(len(values))) + 1))
    lo, hi = min(values), max(values)
    counts, edges = np.histogram(values, bins=bins, range=(lo - 0.5, hi + 0.5) if hi == lo else (lo, hi))
    return edges.tolist(), counts.tolist()


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}".replace("e+0", "e+").replace("e-0", "e-")


def _edge_digits(edges: list[float]) -> int:
    """Enough significant digits that neighbouring bin edges print differently."""
    width = edges[1] - edges[0]
    scale = max(abs(edges[0]), abs(edges[-1]), width)
    return max(3, min(8, math.ceil(math.log10(scale / width)) + 2))


def histogram_png(values: list[float], width: int = 480, height: int = 200) -> bytes:
    """The histogram as a PNG of width x height pixels (matplotlib, no display needed)."""
    import io

    from matplotlib.figure import Figure

    edges, counts = histogram(values)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.subplots()
    ax.stairs(counts, edges, fill=True, color="#2e6ed6")
    ax.set_title(f"n={len(values)}", fontsize=8, loc="right")
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout(pad=0.4)
    out = io.BytesIO()
    fig.savefig(out, format="png")  # no bbox_inches="tight": the size stays width x height
    return out.getvalue()


def histogram_markdown(label: str, values: list[float], round_: int) -> str:
    edges, counts = histogram(values)
    d = _edge_digits(edges)
    mean = sum(values) / len(values)
    data = base64.b64encode(histogram_png(values)).decode()
    lines = [f"### Round {round_}: {label}", "",
             f"![histogram of {label}](data:image/png;base64,{data})", "",
             f"{len(values)} values: min {_num(min(values), d)}, mean {_num(mean, d)}, max {_num(max(values), d)} "
             f"(the tallest bar holds {max(counts)}).", "",
             "| bin | count |", "|---|---|"]
    lines += [f"| {_num(a, d)} to {_num(b, d)} | {c} |" for a, b, c in zip(edges, edges[1:], counts)]
    return "\n".join(lines)
