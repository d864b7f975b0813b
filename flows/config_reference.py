"""The config reference page (docs/config-reference.md), generated from the pydantic models: every
section and field with its type, default and the comment that explains it in the source, where a
reader of the code finds it too. The objectives' options (train.<objective>) and the annotators'
(annotate.steps[]) come from their own files, through the registries.

    .venv/bin/align docs          # rewrites docs/config-reference.md (a test fails when it is stale)
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from functools import cache
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PIPE = "\\|"  # a literal | inside a markdown table cell
PAGE = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"


@cache
def _comments(path: str) -> tuple[dict[int, str], set[int]]:
    """{line: comment text} of a source file, and the lines that hold only a comment."""
    source = Path(path).read_text()
    comments, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return comments, {line for line in comments if line not in code_lines}


def field_comments(cls: type) -> dict[str, str]:
    """Each field declared in `cls`'s own body -> the comment block right above it plus the comment
    at the end of its line (a comment block above a field is read as about that field)."""
    path = inspect.getsourcefile(cls)
    comments, alone = _comments(path)
    lines, start = inspect.getsourcelines(cls)
    body = ast.parse(inspect.cleandoc("\n" + "".join(lines)) if lines[0][0].isspace() else "".join(lines)).body[0]
    out = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        first, last = start + node.lineno - 1, start + node.end_lineno - 1
        above, line = [], first - 1
        while line in alone:
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[k] for k in range(first, last + 1) if k in comments and k not in alone]
        out[node.target.id] = " ".join(above + trailing)
    return out


def descriptions(cls: type[BaseModel]) -> dict[str, str]:
    """Every field of the model (inherited ones too) -> its comment, the nearest class's first."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            try:
                found = field_comments(klass)
            except (OSError, TypeError, IndexError, SyntaxError):
                continue  # made by create_model: no source of its own
            for name, text in found.items():
                if text and not out.get(name):
                    out[name] = text
    return out


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("stages.pipeline.refs.", "")
    text = text.replace("Annotated[int, Gt(gt=0)]", "positive int")  # pydantic's PositiveInt
    return text.replace("NoneType", "None").replace("|", PIPE)


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`".replace("|", PIPE)


def section_table(cls: type[BaseModel], skip: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(markdown rows of the model's fields, names of fields without a description)."""
    text = descriptions(cls)
    rows, missing = ["| field | type | default | what it does |", "|---|---|---|---|"], []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        if not text.get(name):
            missing.append(name)
        what = text.get(name, "").replace("|", PIPE)
        if isinstance(field.validation_alias, str):  # TRL's or peft's spelling, accepted too
            what += f" (also `{field.validation_alias}`)"
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {what} |")
    return rows, missing


def sections() -> list[tuple[str, type[BaseModel], str, set[str]]]:
    """(heading, model, the class's docstring or '', fields shown elsewhere) of every section, the
    objectives' and the annotators' options last."""
    from stages import config as C
    from stages.annotators import ANNOTATORS
    from stages.training.objectives import OBJECTIVES

    top = [("run (top level)", C.RunConfig, {"load_prompts", "build_pool", "sample", "annotate", "reweight",
                                             "data_pool", "reference", "train", "evaluate"}),
           ("load_prompts", C.LoadPromptsConfig, set()), ("sample", C.SampleConfig, set()),
           ("annotate", C.AnnotateConfig, set()), ("reweight", C.ReweightConfig, set()),
           ("reweight.strategies[]", C.ReweightStrategy, set()), ("data_pool", C.DataPoolConfig, set()),
           ("build_pool", C.BuildPoolConfig, set()), ("reference", C.ReferenceConfig, set()),
           ("train", C.TrainConfig, set(OBJECTIVES)), ("train.lora", C.LoraOptions, set()),
           ("evaluate", C.EvaluateConfig, set())]
    out = [(h, cls, inspect.getdoc(cls) if cls.__doc__ and "__doc__" in cls.__dict__ else "", skip)
           for h, cls, skip in top]
    for name, obj in sorted(OBJECTIVES.items()):
        if obj.Options.model_fields:
            out.append((f"train.{name}", obj.Options, (obj.__doc__ or "").strip().split("\n\n")[0], set()))
    for kind, ann in sorted(ANNOTATORS.items()):
        out.append((f"annotate.steps[] kind: {kind}", ann.Options, (ann.__doc__ or "").strip().split("\n\n")[0], {"kind"}))
    return out


def page() -> tuple[str, list[str]]:
    """(the page's markdown, "section.field" of every field without a description)."""
    lines = ["# Config reference", "",
             "Generated from the pydantic models by `align docs` (flows/config_reference.py); do not edit by hand.",
             "Every section forbids unknown keys. Override any field with `--set section.field=value`.", ""]
    missing = []
    for heading, cls, doc, skip in sections():
        rows, lacking = section_table(cls, skip)
        missing += [f"{heading}.{name}" for name in lacking]
        lines += [f"## {heading}", ""] + ([" ".join(doc.split()), ""] if doc else []) + rows + [""]
    return "\n".join(lines), missing


def write(path: Path = PAGE) -> list[str]:
    text, missing = page()
    path.write_text(text)
    return missing
