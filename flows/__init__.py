"""Prefect flows and the `align` command line.

Importing this package sets Prefect up to stay local, quiet and offline before Prefect itself is
imported (importing prefect creates PREFECT_HOME and reads these settings once).
"""

import os

from stages.pipeline.paths import PROJECT_ROOT


def configure_environment() -> None:
    defaults = {
        "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The first ephemeral start migrates a fresh database: slow on 2 busy cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "align",
        # Stages also run outside flow runs (`align stage`, tests): their log lines stay local then.
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        # Models and data come from the local cache; never reach for a hub unless the user opts in
        # with HF_HUB_OFFLINE=0, which also lets datasets load (HF_DATASETS_OFFLINE follows it
        # unless set itself).
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' per-load bars; our stages show their own
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


configure_environment()
