"""The memory-lean SwiGLU and RMSNorm: gradients against finite differences and against the
original modules, on a tiny Llama, and fewer saved activations."""

import copy

import torch

from conftest import needs_prepared
from stages.training.lean_layers import RMSNormLean, SwiGLUDown, make_lean


def test_swiglu_down_gradcheck():
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, w))
    # and against the plain formula
    out = SwiGLUDown.apply(gate, up, w)
    want = (torch.nn.functional.silu(gate) * up) @ w.T
    torch.testing.assert_close(out, want)


def test_rmsnorm_lean_matches_an_independent_float64_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    w = torch.randn(8, generator=g, requires_grad=True)
    out = RMSNormLean.apply(x, w, 1e-5)
    gout = torch.randn(out.shape, generator=g)
    gx, gw = torch.autograd.grad(out, (x, w), gout)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = w64 * x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5)
    rx, rw = torch.autograd.grad(ref, (x64, w64), gout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5)


@needs_prepared
def test_lean_model_matches_original_and_saves_less():
    from stages.services.models import build_tiny_llama, load_causal_lm

    model = load_causal_lm(build_tiny_llama())
    lean = copy.deepcopy(model)
    counts = make_lean(lean)
    n_layers = model.config.num_hidden_layers
    assert counts == {"mlp": n_layers, "norm": 2 * n_layers + 1}
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row

    def run(m):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = m(input_ids=ids, attention_mask=mask).logits
            loss = (logits.float().log_softmax(-1)[..., 5] * mask).sum()
        grads = torch.autograd.grad(loss, list(m.parameters()))
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        return logits, grads, sum(v for k, v in saved.items() if k not in params)

    logits, grads, saved = run(model)
    lean_logits, lean_grads, lean_saved = run(lean)
    torch.testing.assert_close(lean_logits, logits, rtol=0, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads, lean_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert lean_saved < saved


@needs_prepared
def test_lean_layers_stay_through_train_and_eval(monkeypatch):
    """transformers with `kernels` re-kernelizes its layers at model.train() and deletes a module's
    own `forward` (it did: the trainer's model.train() turned every lean RMSNorm back into the
    original). The lean layers must still run after it."""
    from stages.services.models import build_tiny_llama, load_causal_lm
    from stages.training import lean_layers

    model = load_causal_lm(build_tiny_llama())
    counts = make_lean(model)
    model.train(); model.eval(); model.train()
    calls = {"norm": 0, "mlp": 0}
    for name, fn in (("norm", RMSNormLean), ("mlp", SwiGLUDown)):
        monkeypatch.setattr(getattr(lean_layers, fn.__name__), "apply",
                            lambda *a, _fn=fn.apply, _n=name: (calls.__setitem__(_n, calls[_n] + 1), _fn(*a))[1])
    model(input_ids=torch.randint(3, 100, (1, 6))).logits.sum().backward()
    assert calls == counts
    assert make_lean(model) == counts and type(model.model.norm).__name__ == "LlamaRMSNorm"  # idempotent, same name


@needs_prepared
def test_lean_layers_leave_lora_projections_and_autocast_alone():
    from peft import LoraConfig, get_peft_model

    from stages.services.models import build_tiny_llama, load_causal_lm

    model = get_peft_model(load_causal_lm(build_tiny_llama()), LoraConfig(r=2, target_modules=["down_proj"]))
    counts = make_lean(model)
    assert counts["mlp"] == 0 and counts["norm"] > 0
    ids = torch.randint(3, 100, (1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
    assert torch.isfinite(out.float()).all()


@needs_prepared
def test_native_gqa_gives_the_same_numbers_and_restores_the_switch(monkeypatch):
    import os

    from stages.training.lean_layers import native_gqa
    from stages.services.models import build_tiny_llama, load_causal_lm

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    model = load_causal_lm(build_tiny_llama())
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped, as SmolLM2
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = model(input_ids=ids, attention_mask=mask).logits
    with native_gqa():
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
        got = model(input_ids=ids, attention_mask=mask).logits
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
