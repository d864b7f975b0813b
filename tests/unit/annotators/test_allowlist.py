"""A config is code: ALIGN_ALLOWED_CALLABLES limits the callables a config may name."""

import pytest

from stages.annotators import load_callable
from stages.pipeline.errors import BadInput


def test_only_allowed_callables_load(monkeypatch):
    assert load_callable("os.path.join", "annotate.callable")  # no allow-list: anything importable
    monkeypatch.setenv("ALIGN_ALLOWED_CALLABLES", "stages.annotators, rules")
    assert load_callable("stages.annotators.vader_compound", "annotate.callable")
    with pytest.raises(BadInput, match=r"annotate.callable: 'os.system' is not under ALIGN_ALLOWED_CALLABLES"):
        load_callable("os.system", "annotate.callable")
    with pytest.raises(BadInput, match="is not under"):
        load_callable("stages.annotatorsevil.f", "annotate.callable")  # a prefix is a module path, not a string
