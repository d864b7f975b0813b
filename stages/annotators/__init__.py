"""Annotators, one file each: they score samples, or write feedback on them.

Adding one: a new file in this folder with an `Annotator` subclass that sets `kind`, its `Options`
(with `kind: Literal["<kind>"]`: the schema of an `annotate.steps[]` entry) and `__call__`. Every
module here is imported below; the class registers itself and the config schema is built from the
registry (stages/config.py).
"""

from __future__ import annotations

import importlib
import pkgutil

from stages.annotators.base import ANNOTATORS, Annotator
from stages.annotators.reward_model import reward_model_path
from stages.annotators.rule import load_callable, vader_compound

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ANNOTATORS", "Annotator", "load_callable", "reward_model_path", "vader_compound"]
