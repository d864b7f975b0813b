"""Annotator rules for tests (importable as `rules.*` because pytest puts tests/ on sys.path)."""


def count_e(prompts, completions):
    return [float(c.count("e")) for c in completions]


def raises(prompts, completions):
    raise ValueError("the scorer broke")


def returns_nan(prompts, completions):
    return [float("nan")] * len(completions)


def too_few(prompts, completions):
    return [1.0] * (len(completions) - 1)


def half_weights(rows):
    return [0.5] * len(rows)
