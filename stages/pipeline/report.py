"""Reports of an experiment's rounds, read from what is on disk (manifests and evaluate's table), so
any round can be re-reported and experiments compared:

    <root>/<experiment>/round-<k>/report.md          the round's tables, pictures and samples
    <root>/<experiment>/round-<k>/report-*.png       reward distribution per round, reward vs KL,
                                                     reward per quantile (matplotlib)

`align report EXP ...` prints every round's metrics side by side and draws one reward-vs-KL picture
of all the experiments given, round by round (the comparison of the DPO paper).
"""

from __future__ import annotations

import io
import math

from stages.pipeline.store import ArtifactStore

COLUMNS = (  # (metric, heading) of the per-round table; each with its 95% interval where it has one
    ("mean_reward", "reward"), ("reward_gain", "gain over base"), ("kl_to_reference", "KL"), ("perplexity", "ppl (ref)"),
    ("distinct_2", "distinct-2"), ("mean_completion_tokens", "tokens"), ("truncated_fraction", "truncated"),
    ("controllability", "control"), ("control_spread", "spread"), ("conditioning_pairwise", "probe"),
)


def _manifest(store: ArtifactStore, experiment: str, round_: int, stage: str) -> dict | None:
    m = store.read_manifest(store.stage_dir(experiment, round_, stage))
    return m if isinstance(m, dict) else None


def rounds_table(store: ArtifactStore, experiment: str, upto: int | None = None) -> list[dict]:
    """One row per round with an evaluate artifact: its metrics, plus the data pool's where there is one."""
    rows = []
    for k in store.rounds(experiment):
        if upto is not None and k > upto:
            break
        ev = _manifest(store, experiment, k, "evaluate")
        if ev is None:
            continue
        pool = _manifest(store, experiment, k, "data_pool") or {}
        row = {"round": k, **{f"pool_{n}": v for n, v in pool.get("metrics", {}).items()}, **ev.get("metrics", {})}
        old = "reward_gain" not in row and "reward_gain_ci_low" in row  # evaluate < 9 kept round 0's interval only
        if old and None not in (row.get("mean_reward"), row.get("base_mean_reward")):
            row["reward_gain"] = row["mean_reward"] - row["base_mean_reward"]
        rows.append(row)
    return rows


# What a terminal narrower than the full table shows (`align report --wide` for all of COLUMNS).
NARROW_COLUMNS = (("mean_reward", "reward"), ("reward_gain", "gain"), ("kl_to_reference", "KL"),
                  ("conditioning_pairwise", "probe"))


def export(series: dict[str, list[dict]], groups: dict[str, list[list[dict]]], fmt_: str) -> str:
    """`align report --format md|csv|json`: every round of every experiment (its base first, where
    measured) with each of COLUMNS and its interval; md adds the across-seeds table of each A+B+C."""
    import csv
    import json

    rows = []
    for exp, rounds in series.items():
        base = base_row(rounds)
        if base:
            rows.append({"experiment": exp, "round": "base", "mean_reward": base.get("base_mean_reward"),
                         "mean_reward_ci_low": base.get("base_mean_reward_ci_low"),
                         "mean_reward_ci_high": base.get("base_mean_reward_ci_high"), "kl_to_reference": 0.0})
        for r in rounds:
            rows.append({"experiment": exp, "round": r["round"],
                         **{k: r.get(k) for m, _ in COLUMNS for k in (m, f"{m}_ci_low", f"{m}_ci_high")}})
    if fmt_ == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt_ == "csv":
        out = io.StringIO()
        names = ["experiment", "round", *(k for m, _ in COLUMNS for k in (m, f"{m}_ci_low", f"{m}_ci_high"))]
        writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    lines = ["| experiment | round | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        if r["round"] == "base":
            lines.append(f"| `{r['experiment']}` | base | {with_interval(r, 'mean_reward')} | | 0 |" + " |" * (len(COLUMNS) - 3))
        else:
            lines.append(f"| `{r['experiment']}` | {r['round']} | " + " | ".join(with_interval(r, m) for m, _ in COLUMNS) + " |")
    for label, runs in groups.items():
        if len(runs) > 1:
            lines += ["", f"{label}, across {len(runs)} seeds: mean ± standard deviation [min, max]", "",
                      "| round | " + " | ".join(h for _, h in SEED_METRICS) + " |", "|---" * (len(SEED_METRICS) + 1) + "|"]
            lines += [f"| {r['round']} | " + " | ".join(with_spread(r, m) for m, _ in SEED_METRICS) + " |"
                      for r in across_seeds(runs)]
    return "\n".join(lines) + "\n"


SEED_METRICS = (  # (metric, heading) summarised across seeds; "gain" is the round's reward minus its seed's base
    ("mean_reward", "reward"), ("gain", "gain over base"), ("kl_to_reference", "KL"), ("perplexity", "ppl (ref)"),
    ("distinct_2", "distinct-2"), ("controllability", "control"), ("control_spread", "spread"),
    ("conditioning_pairwise", "probe"),
)


def base_row(rows: list[dict]) -> dict | None:
    """The row (round 0's) that carries the base policy's reward, where evaluate measured it."""
    return next((r for r in rows if r.get("base_mean_reward") is not None), None)


def _spread(name: str, values: list) -> dict:
    """`name`: mean, `name_sd` (n - 1; None with one value), `name_min`, `name_max`; all None where a value is."""
    import statistics

    if not values or any(v is None for v in values):
        return {name: None, f"{name}_sd": None, f"{name}_min": None, f"{name}_max": None}
    return {name: statistics.fmean(values), f"{name}_sd": statistics.stdev(values) if len(values) > 1 else None,
            f"{name}_min": min(values), f"{name}_max": max(values)}


def across_seeds(runs: list[list[dict]]) -> list[dict]:
    """Per round that every run (one seed each, rows as rounds_table gives) evaluated: the mean, sample
    standard deviation (n - 1), minimum and maximum over the runs of each of SEED_METRICS, as
    `<metric>`, `<metric>_sd`, `<metric>_min`, `<metric>_max` (None where a run lacks the metric;
    `_sd` None with one run). The spread over seeds, not the interval over prompts of one run."""
    bases = [(b or {}).get("base_mean_reward") for b in map(base_row, runs)]
    by_round = [{r["round"]: r for r in rows} for rows in runs]
    common = sorted(set.intersection(*(set(b) for b in by_round))) if runs else []
    out = []
    for k in common:
        row = {"round": k, "seeds": len(runs)}
        for name, _ in SEED_METRICS:
            if name == "gain":
                values = [b[k].get("mean_reward") - b0 if b[k].get("mean_reward") is not None and b0 is not None else None
                          for b, b0 in zip(by_round, bases)]
            else:
                values = [b[k].get(name) for b in by_round]
            row |= _spread(name, values)
        out.append(row)
    return out


def with_spread(row: dict, name: str) -> str:
    """"mean ± sd [min, max]" of across_seeds' row."""
    if row.get(name) is None:
        return "-"
    sd = row.get(f"{name}_sd")
    return (f"{fmt(row[name])}" + (f" ± {fmt(sd)}" if sd is not None else "")
            + f" [{fmt(row[f'{name}_min'])}, {fmt(row[f'{name}_max'])}]")


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def with_interval(row: dict, name: str) -> str:
    lo, hi = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    value = fmt(row.get(name))
    return f"{value} [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else value


def new_figure(width=5.2, height=3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.subplots()
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    return fig, ax


def png_bytes(fig) -> bytes:
    fig.tight_layout(pad=0.5)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def seeds_series(runs: list[list[dict]]) -> list[dict]:
    """across_seeds' rows in the shape reward_vs_kl_png draws: the mean over seeds, with the bars
    spanning the seeds' minimum to maximum reward, and the mean base (KL 0)."""
    rows = [{"round": r["round"], "mean_reward": r["mean_reward"], "kl_to_reference": r["kl_to_reference"],
             "mean_reward_ci_low": r["mean_reward_min"], "mean_reward_ci_high": r["mean_reward_max"]}
            for r in across_seeds(runs)]
    base = _spread("b", [(b or {}).get("base_mean_reward") for b in map(base_row, runs)])
    if rows and base["b"] is not None:
        rows[0].update({"base_mean_reward": base["b"], "base_mean_reward_ci_low": base["b_min"],
                        "base_mean_reward_ci_high": base["b_max"]})
    return rows


def reward_vs_kl_png(series: dict[str, list[dict]]) -> bytes:
    """Mean held-out reward (with its 95% interval, or for a series of several seeds the seeds'
    range) against KL to the reference, a line per experiment through its rounds; each starts at
    the base policy (KL 0) where it was measured."""
    fig, ax = new_figure()
    for name, rows in series.items():
        pts = [(r.get("kl_to_reference"), r.get("mean_reward"), r.get("mean_reward_ci_low"), r.get("mean_reward_ci_high"),
                str(r["round"])) for r in rows if r.get("mean_reward") is not None and r.get("kl_to_reference") is not None]
        base = base_row(rows)
        if base:
            pts.insert(0, (0.0, base["base_mean_reward"], base.get("base_mean_reward_ci_low"),
                           base.get("base_mean_reward_ci_high"), "base"))
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[y - (p[2] if p[2] is not None else y) for y, p in zip(ys, pts)],
               [(p[3] if p[3] is not None else y) - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, lw=1.2, label=name)
        for x, y, p in zip(xs, ys, pts):
            ax.annotate(p[4], (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6)
    ax.set_xlabel("KL to the reference (nats per sample)", fontsize=8)
    ax.set_ylabel("mean held-out reward (bars: 95% CI or seeds' range)", fontsize=7)
    if ax.get_legend_handles_labels()[0]:  # series without a sampled reward draw nothing
        ax.legend(fontsize=7, frameon=False)
    return png_bytes(fig)


def rewards_png(store: ArtifactStore, experiment: str, rounds: list[int]) -> bytes | None:
    """Box plots of the held-out rewards of each round's policy."""
    data, labels = [], []
    for k in rounds:
        path = store.stage_dir(experiment, k, "evaluate")
        try:
            table = store.read_table(path)
        except (FileNotFoundError, OSError):
            continue
        if "score" not in table.column_names:
            continue
        values = [v for v in table.column("score").to_pylist() if v is not None]
        if values:
            data.append(values)
            labels.append(f"round {k}")
    if not data:
        return None
    fig, ax = new_figure()
    ax.boxplot(data, tick_labels=labels, showmeans=True)
    ax.set_ylabel("held-out reward", fontsize=8)
    return png_bytes(fig)


def per_quantile_png(rows: list[dict]) -> bytes | None:
    """Reward under each control (best first) per round: a controllable policy's bars fall."""
    ks = sorted({int(n.rsplit("_", 1)[1]) for r in rows for n in r if n.startswith("reward_with_control_")})
    if not ks:
        return None
    fig, ax = new_figure()
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ys = [r.get(f"reward_with_control_{k}") for k in ks]
        ax.bar([k + i * width for k in ks], [y if y is not None else 0 for y in ys], width, label=f"round {r['round']}")
    ax.set_xticks([k + 0.4 - width / 2 for k in ks], [str(k) for k in ks])
    ax.set_xlabel("control (0 = best quantile / feedback)", fontsize=8)
    ax.set_ylabel("mean reward of its samples", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    return png_bytes(fig)


def round_report(store: ArtifactStore, experiment: str, round_: int) -> tuple[str, dict[str, bytes]]:
    """(markdown, {file name: PNG bytes}) for round `round_`, covering rounds 0..round_."""
    rows = rounds_table(store, experiment, upto=round_)
    pictures: dict[str, bytes] = {}
    lines = [f"# {experiment}, round {round_}", ""]
    if rows:
        lines += ["| round | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for r in rows:
            lines.append(f"| {r['round']} | " + " | ".join(with_interval(r, m) for m, _ in COLUMNS) + " |")
        base = base_row(rows)
        if base:
            lines += ["", f"Base policy on the same prompts and seeds: reward {with_interval(base, 'base_mean_reward')}; "
                          "each round's gain over it is paired (the same prompts and samples' seeds)."]
        pool = rows[-1]
        if "pool_pool_samples" in pool:
            lines += ["", f"Data pool: {pool['pool_pool_samples']} samples ({pool.get('pool_new_samples')} new, oldest "
                          f"from round {pool.get('pool_oldest_round')}), {pool.get('pool_drawn')} drawn for training."]
        pictures["report-reward-vs-kl.png"] = reward_vs_kl_png({experiment: rows})
    if (png := rewards_png(store, experiment, [r["round"] for r in rows])) is not None:
        pictures["report-rewards.png"] = png
    if (png := per_quantile_png(rows)) is not None:
        pictures["report-controls.png"] = png
    for name in pictures:
        lines += ["", f"![{name[7:-4]}]({name})"]
    examples = _examples(store, experiment, round_)
    if examples:
        lines += ["", "## Samples of this round's policy (held out)", "", "| prompt | completion | reward |", "|---|---|---|"]
        clean = lambda s: (s or "").replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += [f"| {clean(e['prompt'])} | {clean(e['completion'])} | {fmt(e.get('score'))} |" for e in examples]
    return "\n".join(lines) + "\n", pictures


def _examples(store: ArtifactStore, experiment: str, round_: int, n: int = 12) -> list[dict]:
    try:
        table = store.read_table(store.stage_dir(experiment, round_, "evaluate"))
    except (FileNotFoundError, OSError):
        return []
    if not {"prompt", "completion"} <= set(table.column_names):
        return []
    return table.slice(0, n).select([c for c in ("prompt", "completion", "score") if c in table.column_names]).to_pylist()


def write_round_report(store: ArtifactStore, experiment: str, round_: int) -> str:
    """Write round_report's files into the round's folder; returns the markdown's path."""
    text, pictures = round_report(store, experiment, round_)
    base = f"{store.experiment_dir(experiment)}/round-{round_}"
    for name, data in pictures.items():
        store.fs.pipe_file(f"{base}/{name}", data)
    store.fs.pipe_file(f"{base}/report.md", text.encode())
    return f"{base}/report.md"


def _per_prompt(table, column: str) -> dict[str, float]:
    """The mean of `column` over each held-out prompt's samples (unknown values skipped)."""
    sums: dict[str, list[float]] = {}
    for pid, v in zip(table.column("prompt_id").to_pylist(), table.column(column).to_pylist()):
        if v is not None and math.isfinite(v):
            sums.setdefault(pid, []).append(v)
    return {pid: sum(vs) / len(vs) for pid, vs in sums.items()}


def compare_rounds(store: ArtifactStore, a: tuple[str, int], b: tuple[str, int], seed: int = 0) -> dict:
    """One round's policy against another's on the held-out prompts both scored (`align compare`):
    per prompt the mean reward (and KL) of its samples, A minus B, with the bootstrap 95% interval
    over prompts. Paired, so the prompts' own difficulty cancels: the test for "is variant A better
    than B" that two overlapping gain intervals cannot give. Where both rounds paired with the same
    base samples (the same seed), the reward difference is also the difference of their gains."""
    from stages.services.sample_metrics import bootstrap_ci

    def evaluated(exp: str, round_: int):
        try:
            return store.read_table(store.stage_dir(exp, round_, "evaluate"))
        except (FileNotFoundError, OSError):
            raise ValueError(f"compare: {exp} has no evaluate table in round {round_} under {store.root}") from None

    ta, tb = evaluated(*a), evaluated(*b)
    out: dict = {"a": f"{a[0]}@{a[1]}", "b": f"{b[0]}@{b[1]}"}
    for column, name in (("score", "reward"), ("kl", "kl")):
        if column not in ta.column_names or column not in tb.column_names:
            continue
        pa_, pb = _per_prompt(ta, column), _per_prompt(tb, column)
        shared = sorted(pa_.keys() & pb.keys())
        if not shared:
            raise ValueError(f"compare: {out['a']} and {out['b']} scored no held-out prompt in common")
        diffs = [pa_[p] - pb[p] for p in shared]
        out[f"{name}_a"] = sum(pa_[p] for p in shared) / len(shared)
        out[f"{name}_b"] = sum(pb[p] for p in shared) / len(shared)
        out[f"{name}_difference"] = sum(diffs) / len(diffs)
        ci = bootstrap_ci(diffs, seed)
        if ci:
            out[f"{name}_difference_ci_low"], out[f"{name}_difference_ci_high"] = ci
        out["prompts"] = len(shared)
    if "base_score" in ta.column_names and "base_score" in tb.column_names:
        key = lambda t: dict(zip(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist()),  # noqa: E731
                                 t.column("base_score").to_pylist()))
        out["same_base"] = key(ta) == key(tb)
    return out


def pair_agreement(store: ArtifactStore, experiment: str, round_: int, steps: list, seed: int = 0) -> dict:
    """Do the pairs a round trained on agree with another annotator (`align agreement`)? The round's
    pool of pairs (build_pool: generation1 chosen, generation2 rejected, by the round's own
    annotator, e.g. an LLM judge), both sides re-scored by `steps` (e.g. the reward model evaluate
    measures with): the fraction of pairs it orders the same way and its mean chosen-minus-rejected
    margin, each with a bootstrap 95% interval over pairs. Where a round's annotator and the
    yardstick disagree, training on its pairs cannot raise the yardstick's reward."""
    from stages.services.annotation import run_steps
    from stages.services.sample_metrics import bootstrap_ci

    where = f"agreement: {experiment}@{round_}"
    try:
        table = store.read_table(store.stage_dir(experiment, round_, "build_pool"))
    except (FileNotFoundError, OSError):
        raise ValueError(f"{where} has no build_pool table under {store.root}") from None
    if "generation2" not in table.column_names:
        raise ValueError(f"{where}: its pool has no column generation2 (not a pool of pairs)")
    rows = [r for r in table.select(["prompt", "generation1", "generation2"]).to_pylist()
            if r["generation1"] is not None and r["generation2"] is not None]
    if not rows:
        raise ValueError(f"{where}: its pool holds no pair")
    # chosen then rejected in one pass: each annotator's model loads once
    prompts = [r["prompt"] for r in rows] * 2
    scores, _ = run_steps(steps, prompts, [r["generation1"] for r in rows] + [r["generation2"] for r in rows],
                          "agreement", feedback=False)
    chosen, rejected = scores[:len(rows)], scores[len(rows):]
    known = [(c, r) for c, r in zip(chosen, rejected) if c is not None and r is not None]
    agree = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in known]  # a tie counts half
    margins = [c - r for c, r in known]
    labelled = _manifest(store, experiment, round_, "annotate") or {}
    out: dict = {"round": f"{experiment}@{round_}", "pairs": len(known),
                 # which pool it read: a runs-of-record page can tell its own pool from a re-made one
                 "pool_sha256": store.table_sha256(experiment, round_, "build_pool"),
                 "labelled_by": "+".join(s.get("kind", "?") for s in labelled.get("config", {}).get("steps", [])),
                 "yardstick": "+".join(s.kind for s in steps)}
    for name, values in (("agreement", agree), ("margin", margins)):
        out[name] = sum(values) / len(values) if values else None
        ci = bootstrap_ci(values, seed)
        if ci:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = ci
    return out
