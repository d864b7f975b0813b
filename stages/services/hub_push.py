"""`align push EXP --repo ORG/NAME`: a round's trained policy to the Hugging Face hub, with its card.

The card train wrote (stages/services/model_card.py) gains what only later stages know: the data
it came from (load_prompts' source, subset, revision and the commit it resolved to) and the round's
held-out evaluation (reward with its interval, the paired gain over the base, KL, diversity). The
upload is one commit through huggingface_hub's client (create_repo, create_commit); the hub's
address is the client's (HF_ENDPOINT), its token the client's (HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

from stages.pipeline.errors import BadInput
from stages.pipeline.store import MANIFEST, ArtifactStore
from stages.services.models import hub_offline

# evaluate's metrics the card reports, in this order, with their intervals where they have them
EVALUATION = [("mean_reward", "reward"), ("reward_gain", "gain over the base (paired)"),
              ("kl_to_reference", "KL to the reference (nats)"), ("perplexity", "perplexity"),
              ("distinct_2", "distinct-2"), ("pairwise_accuracy", "pairwise accuracy (reward model)"),
              ("conditioning_pairwise", "conditioning probe (held-out pairs)")]


def pushed_round(store: ArtifactStore, experiment: str, round_: int | None) -> int:
    """The round to push: the one asked for, or the last whose train artifact is complete."""
    done = [k for k in store.rounds(experiment) if store.read_manifest(store.stage_dir(experiment, k, "train"))]
    if not done:
        raise BadInput(f"push: experiment {experiment} has no complete train artifact under {store.root}")
    if round_ is None:
        return done[-1]
    if round_ not in done:
        raise BadInput(f"push: --round {round_}: no complete train artifact (complete rounds: "
                       f"{', '.join(map(str, done))})")
    return round_


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def card_additions(store: ArtifactStore, experiment: str, round_: int) -> str:
    """Markdown sections for the data and the held-out evaluation, from the stages' manifests."""
    parts = []
    data = store.read_manifest(store.stage_dir(experiment, 0, "load_prompts"))
    if data is not None:
        cfg = data["config"]
        pinned = ", ".join(f"{k} `{cfg[k]}`" for k in ("name", "data_dir", "revision") if cfg.get(k))
        commit = data["metrics"].get("commit")
        parts.append(f"## Data\n\nPrompts from `{cfg['source']}` (split `{cfg.get('hub_split')}`"
                     f"{', ' + pinned if pinned else ''}{f', commit `{commit}`' if commit else ''}), "
                     f"format `{cfg.get('format')}`, chat template `{cfg.get('chat_template')}`.\n")
    evaluation = store.read_manifest(store.stage_dir(experiment, round_, "evaluate"))
    if evaluation is not None:
        m = evaluation["metrics"]
        rows = [f"| {label} | {_fmt(m[key])}"
                + (f" [{_fmt(m[key + '_ci_low'])}, {_fmt(m[key + '_ci_high'])}]" if key + "_ci_low" in m else "") + " |"
                for key, label in EVALUATION if m.get(key) is not None]
        if rows:
            parts.append(f"## Held-out evaluation (round {round_})\n\nOn {m.get('prompts', m.get('records'))} "
                         "held-out prompts; intervals are bootstrap 95% intervals.\n\n| metric | value |\n|---|---|\n"
                         + "\n".join(rows) + "\n")
    return "\n".join(parts)


def push_policy(store: ArtifactStore, experiment: str, repo: str, round_: int | None = None,
                private: bool = False) -> str:
    """Upload round `round_`'s trained policy (default: the last) to `repo`; returns the commit's URL."""
    if hub_offline():
        raise BadInput("push: the hub is offline here (set HF_HUB_OFFLINE=0 where it is reachable)")
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    k = pushed_round(store, experiment, round_)
    model = store.local_dir(store.stage_dir(experiment, k, "train")) / "model"
    card = model / "README.md"
    text = card.read_text() if card.exists() else f"# {experiment}, round {k}\n"
    text = text.rstrip() + "\n\n" + card_additions(store, experiment, k)
    files = sorted(p for p in model.rglob("*") if p.is_file() and p.name not in ("README.md", MANIFEST))
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(model).as_posix(), path_or_fileobj=str(p)) for p in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode()))
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.create_commit(repo, ops, commit_message=f"{experiment} round {k}")
    except HfHubHTTPError as e:  # refused (token, permissions, name): one line; the hub's are long
        raise BadInput(f"push: {repo}: {str(e).splitlines()[0]}") from None
    return info.commit_url

