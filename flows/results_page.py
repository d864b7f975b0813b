"""The results page (docs/results.md), generated from the runs of record in docs/results: one
reward-vs-KL frontier of every method with a summary table per family, then every round of every
run with its intervals, the spread over seeds, the wall time of a round and where each run was made,
as `align report --format md` prints them. `align docs` rewrites the page and its frontier picture
(docs/frontier.png); a test fails when the page is stale, so no reported number is typed by hand.
A method listed here without runs of record is named as not yet measured."""

from __future__ import annotations

import json
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

from stages.pipeline.report import (across_seeds, export, fmt, new_figure, png_bytes, rounds_table, with_interval,
                                    with_spread)
from stages.pipeline.store import ArtifactStore

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = DOCS / "results.md"
FRONTIER = DOCS / "frontier.png"


@dataclass(frozen=True)
class Run:
    method: str
    config: str  # its flow's config; the seeds' experiments add --set seed=k --set experiment=<name>
    names: tuple[str, ...]  # the experiments of its seeds, seed 0 first
    why: str = ""  # where it does not beat its base: why, with the evidence (no numbers: they are the tables')
    sets: tuple[str, ...] = ()  # overrides of its config that made it (a recipe variant: its experiment name too)

    @property
    def seeded(self) -> bool:
        return len(self.names) > 1


def _seeds(stem: str, n: int = 3) -> tuple[str, ...]:
    return (stem, *(f"{stem}_seed{k}" for k in range(1, n)))


# nlf_movies.yaml before it sampled 4 of each opening at top-p 1 and trained 80 steps a round.
NLF_TWO = ("sample.n=2", "train.max_steps=40")
NLF_TOP_P_09 = (*NLF_TWO, "sample.top_p=0.9", "sample.top_k=50")
# quark_movies.yaml before it sampled as nlf_movies.yaml does and put its token inside a text.
QUARK_FIRST = ("train.quark.control_template={control}{prompt}",)
QUARK_TWO = (*QUARK_FIRST, "sample.n=2", "train.max_steps=40", "sample.top_p=0.9", "sample.top_k=50")

FAMILIES = [
    ("Online", "each round samples from the policy being trained and scores: 300 samples a round (2 "
     "continuations of 150 training openings; 4 of 75 for RLOO and GRPO), 3 rounds; NLF samples 4 of "
     "each of the 150 (600 a round).", [
         Run("Online DPO", "online_dpo_movies.yaml", _seeds("online_dpo_movies")),
         Run("Quark", "quark_movies.yaml", _seeds("quark_template_n4"), sets=("experiment=quark_template_n4",)),
         Run("Quark, the token first (the paper's place)", "quark_movies.yaml", ("quark_topp1_n4",),
             "the token comes to mean something (the probe and the ladder's spread, both clear of chance), but the "
             "policy under the best token stays near the base and gains under half of NLF's by round 2: a decoder "
             "without a BOS token reads its first position poorly. Inside a short text (the row \"Quark\") the "
             "same token does better on every measure.",
             sets=(*QUARK_FIRST, "experiment=quark_topp1_n4")),
         Run("Quark, 2 samples an opening at top-p 0.9", "quark_movies.yaml", ("quark_init_words",),
             sets=(*QUARK_TWO, "experiment=quark_init_words")),
         Run("Quark, control tokens drawn at random (the paper's)", "quark_movies.yaml", ("quark_pair_movies",),
             sets=(*QUARK_TWO, "train.quark.control_init=[]", "experiment=quark_pair_movies")),
         Run("NLF", "nlf_movies.yaml", _seeds("nlf_topp1_n4"), sets=("experiment=nlf_topp1_n4",)),
         Run("NLF, 2 samples an opening at top-p 0.9", "nlf_movies.yaml", ("nlf_pair_movies",),
             sets=(*NLF_TOP_P_09, "experiment=nlf_pair_movies")),
         Run("NLF, full-vocabulary KL", "nlf_movies.yaml", ("nlf_pair_exact",),
             sets=(*NLF_TOP_P_09, "train.nlf.kl=exact", "experiment=nlf_pair_exact")),
         Run("NLF, KL coefficient 0.15", "nlf_movies.yaml", ("nlf_kl015",),
             sets=(*NLF_TOP_P_09, "train.nlf.kl_coef=0.15", "experiment=nlf_kl015")),
         Run("NLF, full-vocabulary KL at coefficient 0.2", "nlf_movies.yaml", ("nlf_exact_kl02",),
             "the stronger exact KL holds the KL below online DPO's, but the policy meets it by saying less "
             "(completions of 19 tokens by round 2 against the others' 31: a KL summed over a sequence is cheapest "
             "to cut by ending it) and the gain falls with it: not a recipe.",
             sets=(*NLF_TOP_P_09, "train.nlf.kl=exact", "train.nlf.kl_coef=0.2", "experiment=nlf_exact_kl02")),
         Run("NLF, rounds sampled at top-p 1", "nlf_movies.yaml", _seeds("nlf_topp1_r4"),
             sets=(*NLF_TWO, "rounds=4", "experiment=nlf_topp1_r4")),
         Run("NLF, top-p 1 rounds at twice the learning rate", "nlf_movies.yaml", ("nlf_topp1_lr1e4",),
             "its conditioning learns faster (the held-out probe), but its completions shorten every round and the "
             "gain of round 1 is gone by round 2: not a recipe.",
             sets=(*NLF_TWO, "train.learning_rate=1.0e-4", "experiment=nlf_topp1_lr1e4")),
         Run("Quark, papers' loss", "quark_movies.yaml", _seeds("quark_movies"),
             "its conditioning is memorised per sample, not generalised: the control ladder is flat and the held-out "
             "probe near chance. The pairwise contrast (the row \"Quark\") is what makes it learn; see "
             "[Quark and NLF](quark-nlf.md).",
             sets=(*QUARK_TWO, "build_pool.quantile_scope=global", "train.quark.pair_contrast_coef=0",
                   "train.quark.control_init=[]")),
         Run("NLF, papers' loss", "nlf_movies.yaml", _seeds("nlf_movies"),
             "as Quark's: the feedback phrase is not read as an instruction. The pairwise contrast (the row \"NLF\", "
             "and \"NLF (pool)\" below) makes NLF learn it; see [Quark and NLF](quark-nlf.md).",
             sets=(*NLF_TOP_P_09, "build_pool.quantile_scope=global", "train.nlf.pair_contrast_coef=0")),
         Run("Online DPO, LLM judge", "online_dpo_judge_movies.yaml", _seeds("online_dpo_judge_movies"),
             "its judge (SmolLM2-135M-Instruct, the one instruct model these offline machines hold) orders the pairs "
             "it keeps no better than chance against the reward model evaluate measures with, so DPO on its pairs "
             "moves that reward by chance: up in some seeds, down in another. The method is not at fault: a judge "
             "that can tell which continuation is more positive is (a larger `annotate.steps[].model`, or an "
             "OpenAI-compatible endpoint)."),
         Run("Online KTO", "online_kto_movies.yaml", _seeds("online_kto_lr1e5"), sets=("experiment=online_kto_lr1e5",)),
         Run("Online KTO, learning rate 5e-5", "online_kto_movies.yaml", _seeds("online_kto_movies"),
             "its reward gain comes with a KL of 31 to 62 nats and text the base finds unlikely (perplexity under "
             "the base two to seven times the others'): at this learning rate it over-optimises the reward model; one "
             "seed degenerates in round 1 before recovering part of the way, the others lose reward in round 2. At a fifth of the learning rate (the "
             "row above, the config's default since) it gains steadily at a tenth of the KL.",
             sets=("train.learning_rate=5.0e-5",)),
         Run("RLOO", "rl_movies.yaml", _seeds("rl_movies")),
         Run("GRPO", "grpo_movies.yaml", _seeds("grpo_movies")),
     ]),
    ("Offline, on one pool", "every method trains once over the same pool of `pool_movies.yaml`: 4 base-policy "
     "samples of each of the 450 training openings, scored once (1,800 samples).", [
         Run("SFT on the best of 4", "sft_pool_movies.yaml", ("sft_pool_movies",)),
         Run("DPO", "dpo_movies.yaml", ("dpo_movies",)),
         Run("IPO", "ipo_movies.yaml", ("ipo_movies",)),
         Run("cDPO", "cdpo_movies.yaml", ("cdpo_movies",)),
         Run("SimPO", "simpo_movies.yaml", ("simpo_movies",)),
         Run("ORPO", "orpo_movies.yaml", ("orpo_movies",)),
         Run("KTO", "kto_movies.yaml", ("kto_movies",)),
         Run("Quark (pool)", "quark_pool_movies.yaml", ("quark_pool_pair",), sets=("experiment=quark_pool_pair",)),
         Run("Quark (pool), papers' loss", "quark_pool_movies.yaml", ("quark_pool_movies",),
             "the same memorisation on a fixed pool: the token matches the samples it trained on well above chance "
             "(`conditioning_match` in its manifest) while on unseen samples it means little (the probe column's "
             "interval starts just above chance) and nothing that moves what it samples: the ladder is flat (the "
             "control and spread columns), so sampling with the best token draws from the base's distribution. The pairwise contrast (`pair_contrast_coef`, the row above) is what makes it learn; see "
             "[Quark and NLF](quark-nlf.md).", sets=("train.quark.pair_contrast_coef=0",)),
         Run("NLF (pool)", "nlf_pool_movies.yaml", ("nlf_pool_pair",), sets=("experiment=nlf_pool_pair",)),
         Run("NLF (pool), papers' loss", "nlf_pool_movies.yaml", ("nlf_pool_movies",),
             "the phrase means little on unseen samples (the probe column: near chance) and nothing that moves what "
             "it samples under \"Excellent.\": the ladder is flat, though on its training samples the phrase "
             "matches above chance (`conditioning_match` in its manifest). The "
             "pairwise contrast (the row above) is what makes it learn; see [Quark and NLF](quark-nlf.md).",
             sets=("train.nlf.pair_contrast_coef=0",)),
     ]),
]
RUNS = [run for _, _, runs in FAMILIES for run in runs]
POOL = "pool_movies"  # the offline family's shared samples: their cost is the pool's, once

INTRO = """# Results

Generated by `align docs` (flows/results_page.py) from the runs of record in `docs/results`, their
manifests (see [runs of record](results/README.md)); do not edit by hand. The [Quark and NLF
recipes](conditioning-ablation.md) page holds the round-0 ablations, the [benchmarks](benchmarks.md)
page speed and memory.

**The task**: the controlled-sentiment task of the DPO paper on movie reviews: continue a six-word
review opening (32 new tokens, temperature 1, top-p 0.9) with SmolLM2-135M so that the MiniLM
reward model of `reward_movies.yaml` (P(positive)) scores it high. Every flow shares one protocol
(`configs/bases/movies_online.yaml`): the same 450 training openings, and evaluate samples 2
continuations of each of 400 held-out openings from the trained policy (Quark with its best
token, NLF conditioned on "Excellent.") and, in round 0, from the base policy with the same seeds:
the gain is paired. Brackets are bootstrap 95% intervals over openings; across seeds, mean ±
standard deviation [min, max]. KL is in nats per sample to the base model; "control" is the rank
correlation of the reward under each control with its rank, "spread" the best control's reward
minus the worst's, "probe" the held-out conditioning probe (chance 0.5). A round's wall time is
its stages' but evaluate's (sampling, scoring, reference, training), the median over rounds. The
movie bases wrote a resumable checkpoint every 10 training steps until 2026-12-07 (15-18% of a train
stage's time) and every 50 since: a run's train manifests hold its `checkpoint_every`; no other
number depends on it.
`make frontier` re-runs every flow below (seed 0) and rewrites this page.
"""


def _made(store: ArtifactStore, experiment: str) -> str:
    """Where and when a run's last round was evaluated, from its manifest."""
    rounds = store.rounds(experiment)
    m = store.read_manifest(store.stage_dir(experiment, rounds[-1], "evaluate")) or {}
    p = m.get("provenance") or {}
    where = p.get("cpu") or (m.get("ran_on") or {}).get("host", "?")
    commit = f", commit {p['commit'][:7]}{' (modified)' if p.get('dirty') else ''}" if p.get("commit") else ""
    versions = p.get("versions") or {}
    torch = f", torch {versions['torch']}" if versions.get("torch") else ""
    return (f"`{experiment}`: finished {m.get('finished', '?')}, on {where}{commit}{torch}"
            f"{_older_stages(store, experiment)}{_other_pool(store, experiment)}")


def _other_pool(store: ArtifactStore, experiment: str) -> str:
    """An offline run that read another `pool_movies` than the one recorded here (the sha256 of the
    file its load_prompts read against the pool's annotate table): its row compares less exactly."""
    read = _pool_read(store, experiment)
    if read is None:
        return ""
    return f"; trained on another `{POOL}` than the one recorded here (its samples' sha256 {str(read)[:12]})"


def _pool_read(store: ArtifactStore, experiment: str) -> str | None:
    """The sha256 of the pool an offline run read, where it is not the recorded pool's; else None."""
    loaded = store.read_manifest(store.stage_dir(experiment, 0, "load_prompts")) or {}
    if f"/{POOL}/" not in str((loaded.get("config") or {}).get("source", "")):
        return None
    read = (loaded.get("identity") or {}).get("file_sha256")
    return None if read == store.table_sha256(POOL, 0, "annotate") else str(read)


def _stage_versions(store: ArtifactStore, experiment: str) -> dict[str, tuple[int, int]]:
    """Each stage a run made at an older version than today's code has: (its oldest version, today's)."""
    from stages.pipeline.registry import stage_specs

    today = {name: spec.version for name, spec in stage_specs().items()}
    made: dict[str, int] = {}
    for k in store.rounds(experiment):
        for stage in store.stages_in_round(experiment, k):
            version = (store.read_manifest(store.stage_dir(experiment, k, stage)) or {}).get("code_version")
            if stage in today and str(version).isdigit() and today[stage].isdigit():
                made[stage] = min(made.get(stage, int(version)), int(version))
    return {stage: (v, int(today[stage])) for stage, v in made.items() if v < int(today[stage])}


def _older_stages(store: ArtifactStore, experiment: str) -> str:
    """The stages a run was made with at an older version than today's code has: the page says what
    a re-run would change."""
    older = [f"{stage} v{v} (today v{now})" for stage, (v, now) in _stage_versions(store, experiment).items()]
    return f"; stages older than today's: {', '.join(older)}" if older else ""


def to_redo(store: ArtifactStore, experiment: str) -> list[str]:
    """Why a run of record is not current in issue 31's sense (every stage at most one version behind
    today's code, offline runs on the recorded pool); empty when it is."""
    reasons = [f"{stage} v{v} (today v{now})" for stage, (v, now) in _stage_versions(store, experiment).items()
               if now - v > 1]
    if _pool_read(store, experiment) is not None:
        reasons.append(f"another `{POOL}`")
    return reasons


def redo_section(store: ArtifactStore) -> list[str]:
    """The runs of record to make again, with why: the page's own to-do list."""
    stale = [(run, name, why) for run in RUNS if recorded(store, run) for name in run.names
             if (why := to_redo(store, name))]
    if not stale:
        return []
    return ["## Runs to make again", "",
            "Runs of record made with a stage more than one version older than today's code, or on another "
            "pool than the recorded one (their rows compare less exactly; the Repeat lines below re-make them):", "",
            *(f"- `{name}` ({run.method}): {', '.join(why)}" for run, name, why in stale), ""]


def round_wall_seconds(store: ArtifactStore, experiment: str, trains: bool = True) -> float | None:
    """The median over rounds of a round's wall time without evaluate (which measures, not trains);
    None where only evaluate's manifests were kept (runs of record before 2026-12-06: no train
    manifest; `trains=False` for a flow without one, the offline pool)."""
    walls = []
    for k in store.rounds(experiment):
        stages = [s for s in store.stages_in_round(experiment, k) if s != "evaluate"]
        times = [(store.read_manifest(store.stage_dir(experiment, k, s)) or {}).get("wall_seconds") for s in stages]
        if stages and ("train" in stages or not trains) and None not in times:
            walls.append(sum(times))
    return statistics.median(walls) if walls else None


def recorded(store: ArtifactStore, run: Run) -> bool:
    return all(rounds_table(store, n) for n in run.names)


def summary(store: ArtifactStore, run: Run) -> dict:
    """The run's last round: its gain over the base and KL (with their 95% intervals for one seed,
    the seeds' mean, standard deviation and range for several), distinct-2, perplexity, wall time
    of a round, and whether the gain excludes 0 (for several seeds: every seed's interval does; None
    where a seed's manifest kept no interval for that round: evaluate before v9)."""
    runs = [rounds_table(store, n) for n in run.names]
    last = [rows[-1] for rows in runs]
    walls = [w for w in (round_wall_seconds(store, n) for n in run.names) if w is not None]
    out = {"seeds": len(runs), "round": last[0]["round"], "row": last[0],
           "wall_s": statistics.median(walls) if walls else None}
    if run.seeded:
        out["seeds_row"] = next(r for r in across_seeds(runs) if r["round"] == out["round"])
    lows = [r.get("reward_gain_ci_low") for r in last]
    out["gains"] = None if None in lows else all(low > 0 for low in lows)
    return out


def _seeds_name(name: str) -> str:
    """across_seeds' name of a metric: the gain over each seed's own base is "gain" there."""
    return "gain" if name == "reward_gain" else name


def _cell(s: dict, name: str) -> str:
    """A summary's metric as the table shows it: with its interval (one seed) or spread (several)."""
    return with_spread(s["seeds_row"], _seeds_name(name)) if "seeds_row" in s else with_interval(s["row"], name)


def _value(s: dict, name: str) -> float:
    """A summary's metric as a number: the mean over seeds, or the one seed's value."""
    return s["seeds_row"][_seeds_name(name)] if "seeds_row" in s else s["row"][name]


GAINS = {True: "yes", False: "**no**", None: "not recorded"}


def summary_table(store: ArtifactStore, runs: list[Run]) -> str:
    lines = ["| method | seeds | round | gain over base | KL | distinct-2 | ppl (ref) | wall per round | gain excludes 0 |",
             "|---" * 9 + "|"]
    for run in runs:
        s = summary(store, run)
        wall = f"{s['wall_s'] / 60:.1f} min" if s["wall_s"] is not None else "-"
        lines.append(f"| {run.method} | {s['seeds']} | {s['round']} | {_cell(s, 'reward_gain')} | "
                     f"{_cell(s, 'kl_to_reference')} | {_cell(s, 'distinct_2')} | {_cell(s, 'perplexity')} | {wall} | "
                     f"{GAINS[s['gains']]} |")
    return "\n".join(lines)


def frontier_png(store: ArtifactStore) -> bytes:
    """Gain over the base against KL: every recorded method, online ones through their rounds
    (the mean over seeds, bars the seeds' range), offline ones a point (bars the 95% intervals
    both ways); the base is the origin."""
    fig, ax = new_figure(6.4, 4.2)
    ax.axhline(0, color="0.6", lw=0.8)
    for family, _, runs in FAMILIES:
        marker = "o" if family == "Online" else "s"
        for run in (r for r in runs if recorded(store, r)):
            tables = [rounds_table(store, n) for n in run.names]
            if run.seeded:
                rows = across_seeds(tables)
                pts = [(r["kl_to_reference"], r["gain"], r["kl_to_reference_min"], r["kl_to_reference_max"],
                        r["gain_min"], r["gain_max"]) for r in rows]
            else:
                pts = [(r.get("kl_to_reference"), r.get("reward_gain"), r.get("kl_to_reference_ci_low"),
                        r.get("kl_to_reference_ci_high"), r.get("reward_gain_ci_low"), r.get("reward_gain_ci_high"))
                       for r in tables[0]]
            pts = [p for p in pts if None not in p]
            if not pts:
                continue
            if family == "Online":
                pts.insert(0, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.errorbar(xs, ys, xerr=[[x - p[2] for x, p in zip(xs, pts)], [p[3] - x for x, p in zip(xs, pts)]],
                        yerr=[[y - p[4] for y, p in zip(ys, pts)], [p[5] - y for y, p in zip(ys, pts)]],
                        marker=marker, ms=4, capsize=2, lw=1.0, label=run.method)
    ax.set_xlabel("KL to the base (nats per sample)", fontsize=8)
    ax.set_ylabel("held-out reward gain over the base", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, frameon=False, ncol=2)
    return png_bytes(fig)


def agreement_evidence(store: ArtifactStore, run: Run) -> str:
    """What `align agreement --save` found for a run's seeds: do the pairs its annotator chose agree
    with the yardstick evaluate measures with? Names the pool each figure was made on."""
    parts, yardstick = [], None
    for k, name in enumerate(run.names):
        for rnd in store.rounds(name):
            path = f"{store.experiment_dir(name)}/round-{rnd}/agreement.json"
            if not store.fs.exists(path):
                continue
            a = json.loads(store.fs.cat_file(path))
            yardstick = a["yardstick"]
            pool = store.table_sha256(name, rnd, "build_pool")
            which = "its own pool" if a.get("pool_sha256") == pool else "the pool re-made from its config and seed"
            p = a.get("provenance") or {}
            parts.append(f"seed {k}, round {rnd}: {with_interval(a, 'agreement')} of {a['pairs']} pairs ({which}, "
                         f"{a.get('finished', '?')[:10]}, commit {(p.get('commit') or '?')[:7]}, {p.get('cpu', '?')})")
    if not parts:
        return ""
    return (f"Its pairs ordered as the {yardstick} orders them (`align agreement --save`; chance 0.5): "
            + "; ".join(parts) + ".")


def reading(store: ArtifactStore) -> list[str]:
    """Which method when: generated from the summaries, so it cannot disagree with the tables."""
    done = [(run, summary(store, run)) for run in RUNS if recorded(store, run)]
    if not done:
        return []
    gaining = [(r, s) for r, s in done if s["gains"] is True]
    lines = ["## Which method when", ""]
    if gaining:
        best = max(gaining, key=lambda rs: _value(rs[1], "reward_gain"))
        thrifty = max(gaining,
                      key=lambda rs: _value(rs[1], "reward_gain") / max(_value(rs[1], "kl_to_reference"), 1e-9))
        lines += [f"- Most reward: **{best[0].method}** (gain {_cell(best[1], 'reward_gain')} at KL "
                  f"{_cell(best[1], 'kl_to_reference')}).",
                  f"- Most reward per nat of KL: **{thrifty[0].method}**.",
                  "- Gain over the base with an interval excluding 0: " + ", ".join(r.method for r, _ in gaining) + "."]
    short = [(r, s) for r, s in done if s["gains"] is not True]
    if short:
        lines.append("- Not shown above the base (an interval includes 0, or none was recorded):")
        lines += [f"    - **{r.method}**: " + " ".join(filter(None, (r.why or "not yet explained (issue 31).",
                                                                       agreement_evidence(store, r))))
                  for r, _ in short]
    return lines + [""]


def page(root: Path = DOCS / "results") -> str:
    store = ArtifactStore(str(root))
    parts = [INTRO, "## Every method on one frontier", "",
             "![Held-out reward gain over the base against KL, every method (online: through its rounds, the mean "
             "over seeds with bars the seeds' range; offline: one point with its 95% intervals)](frontier.png)", ""]
    for family, about, runs in FAMILIES:
        have = [r for r in runs if recorded(store, r)]
        parts += [f"### {family}", "", about[0].upper() + about[1:] + " Each method's last round:", ""]
        if have:
            parts += [summary_table(store, have), ""]
        missing = [r for r in runs if not recorded(store, r)]
        if missing:
            parts += ["Not yet measured on the shared protocol: " + ", ".join(
                f"{r.method} (`configs/{r.config}`)" for r in missing) + ".", ""]
    parts += reading(store)
    parts += redo_section(store)
    pool_s = round_wall_seconds(store, POOL, trains=False)
    if pool_s is not None:
        parts += [f"The offline pool itself (`configs/{POOL}.yaml`): {fmt(pool_s / 60, 1)} min of sampling and "
                  f"scoring, once for every offline method. " + _made_pool(store), ""]
    for run in (r for r in RUNS if recorded(store, r)):
        series = {n: rounds_table(store, n) for n in run.names}
        sets = "".join(f" --set {shlex.quote(o)}" for o in run.sets)
        commands = [f".venv/bin/align run configs/{run.config}{sets}"] + [
            f".venv/bin/align run configs/{run.config}{sets} --set seed={k} --set experiment={n}"
            for k, n in enumerate(run.names) if k]
        parts += [f"## {run.method}", "", export(series, {"+".join(run.names): list(series.values())}, "md").rstrip(), "",
                  "Made: " + "; ".join(_made(store, n) for n in run.names) + ".", "", "Repeat:", "",
                  *(f"    {c}" for c in commands), ""]
    everything = " ".join("+".join(r.names) for r in RUNS if r.seeded and recorded(store, r))
    parts += ["## Reward against KL, over seeds", "",
              f"    .venv/bin/align report --artifacts docs/results {everything} --out docs/reward-vs-kl.png", "",
              "![Held-out reward against KL per round, each method over its seeds (mean, bars the seeds' range)]"
              "(reward-vs-kl.png)", ""]
    return "\n".join(parts)


def _made_pool(store: ArtifactStore) -> str:
    m = store.read_manifest(store.stage_dir(POOL, 0, "annotate")) or {}
    p = m.get("provenance") or {}
    return f"Made {m.get('finished', '?')}" + (f", commit {p['commit'][:7]}" if p.get("commit") else "") + "."


def write(path: Path = PAGE, picture: Path = FRONTIER) -> None:
    root = path.parent / "results"
    path.write_text(page(root))
    picture.write_bytes(frontier_png(ArtifactStore(str(root))))
