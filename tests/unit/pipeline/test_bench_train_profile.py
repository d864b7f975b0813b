"""bench_train's profile: the matmuls' FLOPs are counted as 2nkm per product (backward included),
the kinds of operator add up to the profiled time, and MFU is the product of its stated factors; its
cast counter keys every dtype cast by source and counts nothing else."""

import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train  # noqa: E402
from cast_counter import CastCounter  # noqa: E402


def test_matmul_flops_categories_and_mfu_factors():
    a = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        (a @ w).exp().sum().backward()  # forward a@w, backward grad_a = g @ w.T: two 64x32x16 products
    p = bench_train.by_category(prof.key_averages())
    assert p["matmul_gflop"] * 1e9 == 2 * (2 * 64 * 32 * 16)
    assert abs(sum(p["seconds"].values()) - p["total_s"]) < 1e-9 and p["seconds"]["matmuls"] > 0


def test_explain_writes_mfu_as_the_product_of_its_factors():
    seconds = {name: 0.0 for name, _ in bench_train.CATEGORIES} | {"matmuls": 6.0, "attention": 4.0}
    p = {"seconds": seconds, "total_s": 10.0, "matmul_gflop": 2400.0, "top_ops": []}  # 400 GFLOP/s in matmuls
    tokens = 4000
    text = bench_train.explain({"profile": p, "objective": "dpo", "precision": "bf16", "steps": 1, "tokens": tokens},
                               {"gflops": 500.0, "shapes": {"2048x576x1536": 500.0}})
    model_gflop = 6 * bench_train.N_PARAMS * tokens / 1e9  # 3228.4
    mfu, eff, share, ratio = map(float, re.search(
        r"MFU \(profiled\) ([\d.]+)% = matmul efficiency ([\d.]+)% x matmul share ([\d.]+)% x model/matmul FLOPs ([\d.]+)",
        text).groups())
    assert (eff, share, ratio) == (80.0, 60.0, round(model_gflop / 2400, 2))
    assert mfu == round(100 * model_gflop / 10 / 500, 1) and abs(eff * share / 100 * ratio - mfu) < 0.01 * mfu  # the ratio is printed to 2 places


def _to_bf16(t):
    return t.to(torch.bfloat16)


def test_cast_counter_keys_forward_casts_by_frame_and_backward_ones_by_autograd_node():
    x = torch.randn(500, 1000, requires_grad=True)  # 500k elements: 3 MB read + written per float32<->bf16 cast
    with CastCounter(keep=("/tests/",)) as c:
        y = _to_bf16(x)
        y.float().sum().backward()  # a forward cast back, and the backward of both casts
        torch.empty(500, 1000, dtype=torch.bfloat16).copy_(x.detach())  # copy_ across dtypes is a cast too
        torch._foreach_copy_([torch.empty(500, 1000, dtype=torch.bfloat16), torch.empty(3)], [x.detach(), torch.ones(3)])
        x.detach().clone().mul_(2)  # same dtype: not a cast
    sources = {r["source"] for r in c.table()}
    assert sum(r["casts"] for r in c.table()) == 6  # the foreach copy's float32 pair is no cast
    assert any(s.startswith("forward tests/unit/pipeline/test_bench_train_profile.py:") and "_to_bf16 float32->bfloat16" in s
               for s in sources)
    assert sum(1 for s in sources if "test_cast_counter_keys" in s) == 3  # .float(), copy_, _foreach_copy_
    assert c.count["backward ToCopyBackward0 float32->bfloat16"] == 1  # the backward of .float()
    assert c.count["backward ToCopyBackward0 bfloat16->float32"] == 1  # the backward of .to(bfloat16)
    assert all(r["mb"] == 3.0 for r in c.table()), c.table()
