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


# How long jemalloc keeps a freed page before handing it back (its default: 10 s). Training frees
# and re-allocates activation-sized buffers every micro-batch; pages freed during one backward pass
# are mostly not the right size for the buffers allocated at its end (the gradient of the embedding,
# the float32 gradients), so they sat resident under the step's peak. The train stage of SmolLM2's
# online round (bench_online's GRPO, bf16, one thread): peak RSS 3.23 GB at 10 s, 3.17 at 1 s, 3.13
# at 0.5 s, 3.02 at 0 (training steps about 1.4x slower: every free an madvise); bench_online itself
# (two threads): 3.21 GB against 3.23, its wall unchanged (docs/benchmarks.md).
DECAY_MS = 500
_tuned = False


def _jemalloc_set(libc, key: str, value: int) -> int:
    import ctypes

    v = ctypes.c_ssize_t(value)
    return libc.mallctl(key.encode(), None, None, ctypes.byref(v), ctypes.c_size_t(ctypes.sizeof(v)))


def return_freed_pages_sooner(ms: int = DECAY_MS) -> bool:
    """Under jemalloc: freed pages go back to the system after `ms` instead of 10 s, in the arenas
    that exist (those not yet made start with it too). Once per process; False where the process
    does not run on jemalloc or MALLOC_CONF already chose (the user's word wins)."""
    global _tuned
    if _tuned:
        return False
    _tuned = True  # decided once, whatever the answer: run_stage asks before every stage
    if current() != "jemalloc" or "decay" in os.environ.get("MALLOC_CONF", ""):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        n, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
        libc.mallctl(b"arenas.narenas", ctypes.byref(n), ctypes.byref(size), None, ctypes.c_size_t(0))
        for kind, value in (("dirty", ms), ("muzzy", 0)):  # muzzy 0: a decayed page is returned at once
            _jemalloc_set(libc, f"arenas.{kind}_decay_ms", value)  # arenas made from now on
            for i in range(n.value):  # those made already; one not yet initialised refuses, harmlessly
                _jemalloc_set(libc, f"arena.{i}.{kind}_decay_ms", value)
    except (OSError, AttributeError):
        return False
    return True


_frozen = False


def keep_long_lived_objects_out_of_gc() -> None:
    """Once per process, before its first stage: what is alive then (the imported modules of torch,
    transformers and Prefect, the config: about half a million objects) leaves the cyclic
    collector's reach (`gc.freeze`), so the full collection `release_free_memory` runs between
    stages, and Python's own, scan only what the stages made (0.1-0.2 s less each). Not later: a
    stage's objects frozen would never be collected once garbage."""
    import gc

    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


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


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux's VmHWM) to the current RSS, so that
    `peak_rss_gb` reads the peak of what runs next; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float | None:
    """This process's resident-set high-water mark in GB (10^9 bytes) since the last `reset_peak_rss`
    (else since it started); None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


if __name__ == "__main__":  # `python -m stages.training.allocator`: the malloc `align` runs on here
    reexec_under_jemalloc("stages.training.allocator")
    print(current())
