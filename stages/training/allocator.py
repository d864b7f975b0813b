"""Which malloc the process runs on, and re-running under jemalloc where the system has it.

PyTorch on CPU allocates and frees activation-sized buffers every step. glibc's malloc keeps
them in a heap that fragments (its mmap threshold grows to 32 MiB as big buffers are freed), so
the resident set stays high; jemalloc reuses and returns them. Measured on SmolLM2 DPO training
(benchmarks/bench_dpo.py): the same speed and a peak about 0.7 GB lower. The allocator can only
be chosen before the process starts, so `align` re-executes itself once with LD_PRELOAD set, as
PyTorch's own CPU launcher (torch.backends.xeon.run_cpu --enable-jemalloc) does.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

SWITCH = "ALIGN_MALLOC"  # "system" keeps the C library's malloc


def jemalloc_library() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it (Debian: libjemalloc2)."""
    return ctypes.util.find_library("jemalloc")


def current() -> str:
    """'jemalloc' when it is loaded in this process, else 'system'."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if "jemalloc" in maps.read() else "system"
    except OSError:
        return "system"


def preload_env(env: dict[str, str], library: str) -> dict[str, str]:
    """env with `library` added in front of LD_PRELOAD."""
    rest = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{library}:{rest}" if rest else library}


def reexec_under_jemalloc(module: str) -> None:
    """Replace this process by `python -m module <same args>` under jemalloc, unless it already
    runs there, jemalloc is not installed, or ALIGN_MALLOC=system. Returns only when it does not."""
    if (os.environ.get(SWITCH, "jemalloc") == "system" or not sys.platform.startswith("linux")
            or "jemalloc" in os.environ.get("LD_PRELOAD", "")):  # asked for already: never loop
        return
    library = jemalloc_library()
    if library is None:
        return
    env = preload_env(dict(os.environ), library)
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def release_free_memory() -> None:
    """Hand the memory the last stage freed back to the system before the next one starts: Python's
    cycles first, then the allocator's cached free pages (jemalloc keeps freed pages for 10 s, glibc
    in its heaps). A round's stages run in one process, so what sampling left cached otherwise sits
    under training's peak: 0.1 GB of SmolLM2's online round (benchmarks/bench_online.py)."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        if current() == "jemalloc":
            libc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))  # 4096: every arena
        elif hasattr(libc, "malloc_trim"):
            libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):  # another libc or allocator: nothing to release this way
        pass


if __name__ == "__main__":  # `python -m stages.training.allocator`: the malloc `align` runs on here
    reexec_under_jemalloc("stages.training.allocator")
    print(current())
