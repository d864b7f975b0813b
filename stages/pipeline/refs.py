"""References to another experiment's artifacts, resolved through the run's artifact store, so a
config names `{experiment: pool_movies, stage: annotate}` instead of a path under ./artifacts, and
`--artifacts` / ALIGN_ARTIFACTS hold everywhere (the default reward model included)."""

from __future__ import annotations

from pydantic import BaseModel

from stages.pipeline.errors import BadInput
from stages.pipeline.sections import Section


class ArtifactRef(Section):
    """A file (or folder) of a complete artifact of another experiment, under the run's artifact root."""

    experiment: str
    stage: str
    round: int = 0
    file: str = "data.parquet"  # "model" for a trained model's folder


def locate(ref: ArtifactRef, store, where: str) -> str:
    """The path (a URL on remote roots; a local cached copy for folders) of `ref` in `store`;
    BadInput naming the config field when that artifact is missing or incomplete."""
    path = store.stage_dir(ref.experiment, ref.round, ref.stage)
    manifest = store.read_manifest(path)
    problem = "no complete artifact" if manifest is None else store.verify(path, manifest)
    if problem:
        raise BadInput(f"{where}: {ref.experiment} round {ref.round} {ref.stage} under {store.url}: {problem}; "
                       f"run `align run configs/{ref.experiment}.yaml` first (with the same --artifacts)")
    if ref.file == "data.parquet":
        return store.fs.unstrip_protocol(f"{path}/{ref.file}") if not store.local else f"{path}/{ref.file}"
    return str(store.local_dir(path) / ref.file)


def resolve_refs(model: BaseModel, store, where: str = "") -> BaseModel:
    """A copy of a config with every ArtifactRef replaced by its located path (unchanged when it has none)."""
    updates = {}
    for name in type(model).model_fields:
        value, here = getattr(model, name), f"{where}.{name}" if where else name
        if isinstance(value, ArtifactRef):
            updates[name] = locate(value, store, here)
        elif isinstance(value, BaseModel):
            new = resolve_refs(value, store, here)
            if new is not value:
                updates[name] = new
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            new_list = [resolve_refs(v, store, f"{here}[{i}]") if isinstance(v, BaseModel) else v
                        for i, v in enumerate(value)]
            if any(a is not b for a, b in zip(new_list, value)):
                updates[name] = new_list
    return model.model_copy(update=updates) if updates else model
