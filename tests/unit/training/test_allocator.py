"""`align` re-executes itself under jemalloc where it is installed, once, and ALIGN_MALLOC=system
keeps the C library's malloc."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from stages.training.allocator import jemalloc_library, peak_rss_gb, preload_env, release_free_memory, reset_peak_rss


def allocator_of(**env) -> str:
    merged = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-m", "stages.training.allocator"], cwd=ROOT, env=merged,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(jemalloc_library() is None, reason="needs jemalloc (apt-get install libjemalloc2)")
def test_reexec_under_jemalloc_and_opt_out():
    assert allocator_of(LD_PRELOAD=None, ALIGN_MALLOC=None) == "jemalloc"
    assert allocator_of(LD_PRELOAD=None, ALIGN_MALLOC="system") == "system"


def test_without_jemalloc_it_runs_on_and_never_loops():
    # A preload that names jemalloc but cannot load: no re-exec loop, the system malloc, exit 0.
    assert allocator_of(LD_PRELOAD="/nonexistent/libjemalloc.so.2") == "system"


def test_preload_env_keeps_what_was_there():
    assert preload_env({}, "libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2"
    assert preload_env({"LD_PRELOAD": "libx.so"}, "libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2:libx.so"


RELEASE = """
import torch
from stages.training.allocator import current, release_free_memory

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

base = rss()
blocks = [torch.ones(4096) for _ in range(19200)]  # 300 MB in 16 kB tensors: kept by the allocator once freed
del blocks
held = rss()
release_free_memory()
print(current(), base, held, rss())
"""


@pytest.mark.skipif(jemalloc_library() is None, reason="needs jemalloc (apt-get install libjemalloc2)")
@pytest.mark.parametrize("malloc", ["jemalloc", "system"])
def test_release_free_memory_hands_freed_pages_back(malloc):
    """What a stage freed and the allocator kept cached (jemalloc for 10 s) goes back to the system
    before the next stage, under either allocator."""
    # Whatever the caller preloads is not the allocator under test (a runner under jemalloc).
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "ALIGN_MALLOC": "system"}
    if malloc == "jemalloc":
        env = preload_env(env, jemalloc_library())
    out = subprocess.run([sys.executable, "-c", RELEASE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    name, base, held, after = out.stdout.split()
    assert name == malloc
    assert int(after) < int(base) + 100
    if malloc == "system":  # glibc keeps the freed heap (jemalloc here returned most of it itself)
        assert int(held) - int(after) > 200


DECAY = """
import ctypes, os
from stages.training.allocator import return_freed_pages_sooner

def decay(key):
    v, n = ctypes.c_ssize_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    assert ctypes.CDLL(None).mallctl(key.encode(), ctypes.byref(v), ctypes.byref(n), None, ctypes.c_size_t(0)) == 0
    return v.value

before = decay("arena.0.dirty_decay_ms")
print(before, return_freed_pages_sooner(), return_freed_pages_sooner(), decay("arena.0.dirty_decay_ms"),
      decay("arenas.dirty_decay_ms"), decay("arena.0.muzzy_decay_ms"))
"""


@pytest.mark.skipif(jemalloc_library() is None, reason="needs jemalloc (apt-get install libjemalloc2)")
@pytest.mark.parametrize("malloc_conf", [None, "dirty_decay_ms:2000"])
def test_freed_pages_go_back_after_half_a_second_unless_the_user_chose(malloc_conf):
    env = preload_env({k: v for k, v in os.environ.items() if k != "MALLOC_CONF"}, jemalloc_library())
    if malloc_conf:
        env["MALLOC_CONF"] = malloc_conf
    out = subprocess.run([sys.executable, "-c", DECAY], cwd=ROOT, env={**env, "ALIGN_MALLOC": "system"},
                         capture_output=True, text=True, check=True).stdout.split()
    if malloc_conf:  # the user's word: untouched
        assert out == ["2000", "False", "False", "2000", "2000", "0"]
    else:  # jemalloc's 10 s, then ours in the arena that exists and for those made later; once a process
        assert out == ["10000", "True", "False", "500", "500", "0"]


def test_long_lived_objects_leave_the_collector_once_and_later_cycles_are_still_collected():
    code = """
import gc, weakref
from stages.training.allocator import keep_long_lived_objects_out_of_gc
keep_long_lived_objects_out_of_gc()
frozen = gc.get_freeze_count()
class Node: pass
a, b = Node(), Node(); a.other, b.other = b, a   # a cycle made after the freeze
ref = weakref.ref(a); del a, b
keep_long_lived_objects_out_of_gc()               # a second call freezes nothing more
assert gc.get_freeze_count() == frozen > 0
gc.collect()
assert ref() is None                              # the later cycle is collected
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_reads_the_peak_since_the_last_reset():
    """What a stage manifest's peak_rss_gb is: a 400 MB buffer raises the peak by about that; after
    it is freed and the mark reset, the peak is back near the current RSS."""
    import numpy as np

    assert reset_peak_rss()
    before = peak_rss_gb()
    buffer = np.ones(400_000_000 // 8)  # written: resident
    peak = peak_rss_gb()
    assert peak - before >= 0.38
    del buffer
    release_free_memory()  # as the runner does after each stage
    assert reset_peak_rss()
    assert peak_rss_gb() < peak - 0.3

