"""Training objectives, one file each.

Adding one: a new file in this folder with an `Objective` subclass that sets `name`, its `Options`
(the config section `train.<name>`), the record columns it `needs`, `collate` and
`per_example_loss`. Nothing else: every module here is imported below, the class registers itself,
and the config schema is built from the registry (stages/config.py).
"""

from __future__ import annotations

import importlib
import pkgutil

from stages.training.objectives.base import (OBJECTIVES, Objective, batch_token_logps, column, make_objective, sequences,
                                    shared_prompt_batch, token_grid)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OBJECTIVES", "Objective", "batch_token_logps", "column", "make_objective", "sequences",
           "shared_prompt_batch", "token_grid"]
