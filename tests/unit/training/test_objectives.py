"""Objective numerics: each loss against an independent float64 formula, weights, masking,
the chunked log-probs against plain logits, and a finite-difference gradient check on a tiny model."""

import math

import pytest
import torch

from conftest import needs_prepared
from stages.training import losses as L
from stages.config import TrainConfig
from stages.training.logprobs import completion_token_logps
from stages.training.objectives import make_objective, sequences
from stages.data.tokens import from_text, of_record

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731

PI_C, PI_R = [-10.0, -12.0, -7.5], [-11.0, -10.0, -7.5]
REF_C, REF_R = [-10.5, -11.0, -8.0], [-10.5, -11.5, -7.0]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("kind, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                            ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.5, 0.0)])
def test_dpo_family_against_hand_formulas(kind, beta, eps):
    losses, rc, rr = L.dpo_loss(t(PI_C), t(PI_R), t(REF_C), t(REF_R), beta, kind, eps)
    for i in range(3):
        h = (PI_C[i] - PI_R[i]) - (REF_C[i] - REF_R[i])
        expected = {"sigmoid": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
                    "ipo": (h - 1 / (2 * beta)) ** 2,
                    "hinge": max(0.0, 1 - beta * h)}[kind]
        assert math.isclose(losses[i].item(), expected, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(rc[i].item(), beta * (PI_C[i] - REF_C[i]), rel_tol=1e-9)
        assert math.isclose(rr[i].item(), beta * (PI_R[i] - REF_R[i]), rel_tol=1e-9)


def test_dpo_reference_free_and_first_step_is_ln2():
    zeros = torch.zeros(3, dtype=torch.float64)
    losses, _, _ = L.dpo_loss(t(PI_C), t(PI_R), zeros, zeros, 0.1)
    assert math.isclose(losses[0].item(), -logsig(0.1 * (PI_C[0] - PI_R[0])), rel_tol=1e-9)
    same, _, _ = L.dpo_loss(t(REF_C), t(REF_R), t(REF_C), t(REF_R), 0.1)
    assert torch.allclose(same, torch.full((3,), math.log(2), dtype=torch.float64))


def test_kto_reference_point_and_unequal_counts():
    pi, ref = t([-5.0, -6.0, -4.0, -9.0]), t([-5.5, -6.0, -5.0, -8.0])
    desirable = torch.tensor([True, True, True, False])
    pi_kl, ref_kl = t([-7.0, -8.0, -6.0, -9.5]), t([-7.5, -8.5, -6.0, -9.0])
    losses, rewards, z0 = L.kto_loss(pi, ref, desirable, pi_kl, ref_kl, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    z = max(0.0, sum(a - b for a, b in zip(pi_kl.tolist(), ref_kl.tolist())) / 4)
    assert math.isclose(z0.item(), z, rel_tol=1e-12)
    for i in range(4):
        r = pi[i].item() - ref[i].item()
        expected = (1 - sig(0.5 * (r - z))) if desirable[i] else 1.5 * (1 - sig(0.5 * (z - r)))
        assert math.isclose(losses[i].item(), expected, rel_tol=1e-9)
        assert math.isclose(rewards[i].item(), 0.5 * r, rel_tol=1e-9)
    # A negative mismatched log-ratio clamps z0 at 0.
    _, _, z0 = L.kto_loss(pi, ref, desirable, ref_kl - 1, ref_kl, beta=0.5)
    assert z0.item() == 0.0


def test_kto_reference_point_carries_no_gradient():
    pi_kl = t([-7.0, -8.0]).requires_grad_()
    losses, _, _ = L.kto_loss(t([-1.0, -2.0]), t([-1.5, -2.5]), torch.tensor([True, False]), pi_kl, t([-8.0, -9.0]), 0.1)
    assert not losses.sum().requires_grad or torch.autograd.grad(losses.sum(), pi_kl, allow_unused=True)[0] is None


def test_exact_token_kl_entropy_and_conditioned_nll():
    torch.manual_seed(0)
    pl, rl = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    p, r = pl.softmax(-1), rl.softmax(-1)
    assert torch.allclose(L.token_kl(pl, rl, "ref_policy"), (r * (r.log() - p.log())).sum(-1))
    assert torch.allclose(L.token_kl(pl, rl, "policy_ref"), (p * (p.log() - r.log())).sum(-1))
    assert torch.allclose(L.entropy(pl), -(p * p.log()).sum(-1))
    logp = torch.log(p.gather(-1, torch.tensor([[[1], [2], [3]], [[0], [0], [5]]])).squeeze(-1))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    kl, ent = L.token_kl(pl, rl, "ref_policy"), L.entropy(pl)
    got = L.conditioned_nll(logp, kl, ent, mask, kl_coef=0.05, entropy_coef=0.06)
    for b in range(2):
        n = int(mask[b].sum())
        expected = sum(-logp[b, i].item() + 0.05 * kl[b, i].item() - 0.06 * ent[b, i].item() for i in range(n)) / n
        assert math.isclose(got[b].item(), expected, rel_tol=1e-9)


def test_kl_to_a_reference_without_the_control_tokens():
    pl = torch.tensor([[0.0, 1.0, 2.0, 5.0]], dtype=torch.float64)  # the last token is new
    rl = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    r = rl.softmax(-1)
    p = pl.softmax(-1)[..., :3]
    assert torch.allclose(L.token_kl(pl, rl, "ref_policy"), (r * (r.log() - p.log())).sum(-1))


def test_sampled_kl_is_zero_at_equality_and_positive_otherwise():
    a, b = t([-1.0, -2.0, -3.0]), t([-1.0, -2.5, -2.0])
    assert torch.all(L.sampled_kl(a, a, "policy_ref") == 0)
    ratio = math.exp(-2.5 - -2.0)
    assert math.isclose(L.sampled_kl(a, b, "policy_ref")[1].item(), ratio - 1 - math.log(ratio), rel_tol=1e-9)


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 0.0), (0.5, 3.0)])
def test_simpo_against_hand_formula(beta, gamma):
    from stages.training.objectives.simpo import simpo_loss

    avg_c, avg_r = [-1.2, -0.4, -2.0], [-1.5, -0.3, -2.0]
    losses, rc, rr = simpo_loss(t(avg_c), t(avg_r), beta, gamma)
    for i in range(3):
        assert math.isclose(losses[i].item(), -logsig(beta * (avg_c[i] - avg_r[i]) - gamma), rel_tol=1e-12)
        assert math.isclose(rc[i].item(), beta * avg_c[i]) and math.isclose(rr[i].item(), beta * avg_r[i])


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_orpo_against_hand_formula(weight):
    from stages.training.objectives.orpo import orpo_loss

    mean_c, mean_r = [-0.7, -2.3, -0.05], [-1.1, -0.9, -3.0]
    odds = lambda m: math.exp(m) / (1 - math.exp(m))  # noqa: E731  p / (1 - p), p = exp(mean log-prob)
    losses, ratio = orpo_loss(t(mean_c), t(mean_r), weight)
    for i in range(3):
        log_or = math.log(odds(mean_c[i]) / odds(mean_r[i]))
        assert math.isclose(ratio[i].item(), log_or, rel_tol=1e-10)
        assert math.isclose(losses[i].item(), -mean_c[i] - weight * logsig(log_or), rel_tol=1e-10)
    # a completion the model is certain of (mean log-prob 0) stays finite
    assert torch.isfinite(orpo_loss(t([0.0]), t([-1.0]), weight)[0]).all()


def test_rloo_leave_one_out_baseline():
    rewards = t([1.0, 0.0, 2.0, 5.0, 3.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    logp = t([-3.0, -2.0, -4.0, -1.0, -1.0, -2.0]).requires_grad_()
    losses, adv = L.rloo_loss(logp, logp.detach(), rewards, groups, kl_coef=0.1)
    expected = [1 - 1.0, 0 - 1.5, 2 - 0.5, 5 - 3, 3 - 5, 0.0]  # r_i - mean of the others; a lone sample: 0
    assert torch.allclose(adv, t(expected))
    assert torch.allclose(torch.autograd.grad(losses.sum(), logp)[0], -t(expected))
    _, adv_kl = L.rloo_loss(logp, logp.detach() - t([1.0, 0, 0, 0, 0, 0]), rewards, groups, kl_coef=0.1)
    assert math.isclose(adv_kl[0].item(), (1 - 0.1) - 1.0, rel_tol=1e-9)


# -- on the tiny model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer

    path = build_tiny_llama()
    model = load_causal_lm(path).double()
    return model, load_tokenizer(path)


ROWS = [
    {"prompt": "The film was", "generation1": "a delight from start to end.", "generation2": "a chore.",
     "reference_logp1": -40.0, "reference_logp2": -20.0},
    {"prompt": "Honestly, this movie", "generation1": "moved me.", "generation2": "bored me to tears, sadly.",
     "reference_logp1": -15.0, "reference_logp2": -35.0},
    {"prompt": "A quiet, lovely", "generation1": "story of friendship.", "generation2": "mess.",
     "reference_logp1": -25.0, "reference_logp2": -12.0},
]


def dpo(**opts):
    return make_objective(TrainConfig(objective="dpo", max_length=32, max_prompt_length=8, dpo=opts))


def weighted_loss(obj, model, tok, rows):
    batch = obj.collate(rows, tok)
    per_example, _ = obj.per_example_loss(model, batch)
    return L.weighted_mean(per_example, batch["weights"].double())


@needs_prepared
def test_chunked_logprobs_match_full_logits(tiny, monkeypatch):
    import stages.training.logprobs as lp

    model, tok = tiny
    batch = dpo().collate(ROWS, tok)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].double()
    expected = L.token_logprobs(full, batch["input_ids"][:, 1:], mask)
    monkeypatch.setattr(lp, "CHUNK", 7)  # several chunks, one partial
    got, got_mask = completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert torch.equal(got_mask, mask)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    w = model.model.layers[0].mlp.up_proj.weight
    g1 = torch.autograd.grad(got.sum(), w)[0]
    g2 = torch.autograd.grad(expected.sum(), w)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_fused_head_log_probs_values_and_gradients():
    """HeadLogProbs against log_softmax(h W^T)[y] by autograd, and gradcheck in float64 (h and W)."""
    from stages.training.logprobs import HeadLogProbs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 3, 10, 3, 7, 1])
    want = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(HeadLogProbs.apply(h, w, y), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda hh, ww: HeadLogProbs.apply(hh, ww, y), (h, w))
    # bf16 inputs: float32 log-probs, gradients in the inputs' dtype
    out = HeadLogProbs.apply(h.detach().bfloat16().requires_grad_(), w.detach().bfloat16(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want.detach(), rtol=0.05, atol=0.1)


@needs_prepared
@pytest.mark.parametrize("objective", ["dpo", "kto", "rl"])
def test_shared_prompt_gives_the_joint_numbers_and_gradients(tiny, objective):
    """Each prompt run once with all its completions on its KV cache: same log-probs and gradients
    as running prompt + completion per row (prompts and completions of different lengths, so both
    pad; RL's rows come grouped per prompt, DPO's chosen block then rejected block)."""
    model, tok = tiny
    if objective == "rl":
        rows = [{"prompt_id": str(i), "prompt": r["prompt"], "generation1": g, "generation1_reward": 0.0}
                for i, r in enumerate(ROWS) for g in (r["generation1"], r["generation2"])]
    else:
        rows = [dict(r, kl_generation=ROWS[(i + 1) % 3]["generation1"], desirable=i != 1) for i, r in enumerate(ROWS)]
    obj = make_objective(TrainConfig(objective=objective, max_length=32, max_prompt_length=8))
    batch = obj.collate(rows, tok)
    assert batch["shared_prompt_ids"].shape[0] == 3 and batch["shared_completion_ids"].shape[0] == 6
    joint = {k: v for k, v in batch.items() if not k.startswith("shared_")}
    w = model.model.layers[0].self_attn.k_proj.weight  # reaches the completions only through the cache
    got, got_n = obj.seq_logps(model, batch)
    want, want_n = obj.seq_logps(model, joint)
    assert torch.equal(got_n, want_n)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    coef = torch.arange(1.0, 7.0, dtype=torch.float64)
    g_got = torch.autograd.grad((got * coef).sum(), w)[0]
    g_want = torch.autograd.grad((want * coef).sum(), w)[0]
    # Llama's RMSNorm runs in float32 even in a float64 model: agreement to ~1e-7 of the largest entry
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6 * g_want.abs().max().item())


def test_shared_prompt_batch_groups_rows_by_prompt_tokens():
    from stages.training.objectives import shared_prompt_batch

    enc = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 1], [0, 1]), ([5, 6, 3], [0, 0, 1]), ([9, 4, 4], [0, 1, 1])]
    out = shared_prompt_batch(enc, pad_id=0)
    assert out["shared_prompt_ids"].tolist() == [[5, 6], [9, 0]]
    assert out["shared_prompt_mask"].tolist() == [[1, 1], [1, 0]]
    assert out["shared_prompt_index"].tolist() == [0, 1, 0, 1]
    assert out["shared_completion_ids"].tolist() == [[7, 8], [1, 0], [3, 0], [4, 4]]
    assert shared_prompt_batch(enc[:2], pad_id=0) == {}  # no prompt repeats: nothing to share
    assert shared_prompt_batch([([1], [1]), ([1], [1])], pad_id=0) == {}  # empty prompt


@needs_prepared
def test_reference_stage_scores_a_prompts_completions_together_with_the_same_numbers(tiny):
    from stages.config import ReferenceConfig
    from stages.services.scoring import score

    model, tok = tiny
    pairs = [(r["prompt"], r[g]) for g in ("generation1", "generation2") for r in ROWS] + [(ROWS[0]["prompt"], "fine.")]
    seqs = [from_text(tok, p, c) for p, c in pairs]
    cfg = ReferenceConfig(model="tiny-llama", batch_size=4, max_length=32, max_prompt_length=8)
    sums, per_token = score(model, seqs, tok.pad_token_id, cfg.batch_size, (8, 32), per_token=True, desc="test")
    for seq, total, tokens in zip(seqs, sums, per_token):
        one = sequences([seq], tok.pad_token_id, 8, 32)
        want, mask = completion_token_logps(model, one["input_ids"], one["attention_mask"], one["completion_mask"])
        assert math.isclose(total, want.sum().item(), rel_tol=1e-9)
        assert tokens == pytest.approx(want[0][mask[0].bool()].tolist(), rel=1e-6)


@needs_prepared
def test_shared_prompt_only_where_it_applies(tiny):
    model, tok = tiny
    assert "shared_prompt_ids" not in dpo().collate([dict(ROWS[0], prompt="")], tok)  # nothing to share
    cfg = TrainConfig(objective="dpo", max_length=32, max_prompt_length=8, gradient_checkpointing=True)
    assert "shared_prompt_ids" not in make_objective(cfg).collate(ROWS, tok)  # HF turns the cache off there
    cfg = TrainConfig(objective="dpo", max_length=32, max_prompt_length=8, share_prompt=False)
    assert "shared_prompt_ids" not in make_objective(cfg).collate(ROWS, tok)


@needs_prepared
def test_dpo_weights_one_is_unweighted_and_double_is_duplicate(tiny):
    model, tok = tiny
    obj = dpo()
    plain = obj.per_example_loss(model, obj.collate(ROWS, tok))[0].mean()
    torch.testing.assert_close(weighted_loss(obj, model, tok, [dict(r, generation1_weight=1.0) for r in ROWS]), plain)
    doubled = [dict(ROWS[0], generation1_weight=2.0)] + ROWS[1:]
    duplicated = [ROWS[0], ROWS[0]] + ROWS[1:]
    torch.testing.assert_close(weighted_loss(obj, model, tok, doubled), weighted_loss(obj, model, tok, duplicated))
    zero = [dict(ROWS[0], generation2_weight=0.0)] + ROWS[1:]
    torch.testing.assert_close(weighted_loss(obj, model, tok, zero), weighted_loss(obj, model, tok, ROWS[1:]))


@needs_prepared
def test_dpo_uses_cached_reference_and_length_normalisation(tiny):
    model, tok = tiny
    obj = dpo(loss="ipo", beta=0.5, length_normalize=True)
    batch = obj.collate(ROWS[:1], tok)
    loss, _ = obj.per_example_loss(model, batch)
    pi, n = obj.seq_logps(model, batch)
    h = (pi[0] / n[0] - pi[1] / n[1]) - (-40.0 / n[0] - -20.0 / n[1])
    assert math.isclose(loss.item(), ((h - 1 / (2 * 0.5)) ** 2).item(), rel_tol=1e-9)


@needs_prepared
def test_kto_with_batch_size_one(tiny):
    model, tok = tiny
    obj = make_objective(TrainConfig(objective="kto", max_length=32, max_prompt_length=8))
    row = {"prompt": "The film was", "generation1": "great.", "kl_generation": "a chore.", "desirable": True,
           "reference_logp1": -9.0, "reference_kl_logp": -11.0}
    batch = obj.collate([row], tok)
    loss, metrics = obj.per_example_loss(model, batch)
    pi, _ = obj.seq_logps(model, batch)
    z0 = max(0.0, pi[1].item() + 11.0)
    assert math.isclose(metrics["kl_z0"].item(), z0, rel_tol=1e-9)
    assert math.isclose(loss.item(), 1 - sig(0.1 * (pi[0].item() + 9.0 - z0)), rel_tol=1e-9)


@needs_prepared
@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_simpo_and_orpo_objectives_use_mean_token_logprobs(tiny, objective):
    """Their per-example losses from each completion scored alone (no shared prompt, no batch)."""
    from stages.training.objectives.orpo import orpo_loss
    from stages.training.objectives.simpo import simpo_loss
    from stages.data.tokens import from_text

    model, tok = tiny
    obj = make_objective(TrainConfig(objective=objective, max_length=32, max_prompt_length=8))
    got, metrics = obj.per_example_loss(model, obj.collate(ROWS, tok))
    assert not obj.uses_reference()
    for i, r in enumerate(ROWS):
        means = []
        for g in ("generation1", "generation2"):
            one = sequences([from_text(tok, r["prompt"], r[g])], tok.pad_token_id, 8, 32)
            lp, mask = completion_token_logps(model, one["input_ids"], one["attention_mask"], one["completion_mask"])
            means.append(lp.sum() / mask.sum())
        c, rj = (m.reshape(1) for m in means)
        want = simpo_loss(c, rj, 2.0, 1.0)[0] if objective == "simpo" else orpo_loss(c, rj, 0.1)[0]
        torch.testing.assert_close(got[i], want[0], rtol=1e-9, atol=1e-10)


@needs_prepared
@pytest.mark.parametrize("objective, opts", [("dpo", {"beta": 0.5}), ("simpo", {}), ("orpo", {})])
def test_gradient_matches_finite_differences_on_tiny_model(tiny, objective, opts):
    model, tok = tiny
    obj = make_objective(TrainConfig(objective=objective, max_length=32, max_prompt_length=8, **{objective: opts}))
    assert_gradient_matches_finite_differences(obj, model, tok, ROWS)


def assert_gradient_matches_finite_differences(obj, model, tok, rows):
    """Central differences on the 3 largest gradient entries of one weight of the tiny model."""
    w = model.model.layers[1].self_attn.o_proj.weight
    loss = weighted_loss(obj, model, tok, rows)
    (grad,) = torch.autograd.grad(loss, w)
    idx = torch.argsort(grad.abs().flatten(), descending=True)[:3]
    # Llama's RMSNorm computes in float32 even for a float64 model, so the loss is only accurate
    # to ~1e-8: a small step drowns in that noise. h = 1e-3 keeps both errors near 1e-6.
    h = 1e-3
    with torch.no_grad():
        for i in idx.tolist():
            flat = w.view(-1)
            orig = flat[i].item()
            flat[i] = orig + h
            up = weighted_loss(obj, model, tok, rows).item()
            flat[i] = orig - h
            down = weighted_loss(obj, model, tok, rows).item()
            flat[i] = orig
            assert math.isclose((up - down) / (2 * h), grad.view(-1)[i].item(), rel_tol=1e-4, abs_tol=1e-8)


# -- GRPO ----------------------------------------------------------------------------------------

def test_group_advantages_against_hand_values():
    rewards = t([1.0, 0.0, 2.0, 5.0, 3.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert torch.allclose(L.group_advantages(rewards, groups, scale=False), t([0, -1, 1, 1, -1, 0]))
    # unbiased std: group 0 (0, -1, 1) -> 1; group 1 (1, -1) -> sqrt(2); a lone sample -> 0
    s2 = math.sqrt(2) + 1e-4
    want = [0, -1 / 1.0001, 1 / 1.0001, 1 / s2, -1 / s2, 0]
    assert torch.allclose(L.group_advantages(rewards, groups, scale=True), t(want))
    # equal rewards in a group: advantage 0 (no division by a zero std blowing up)
    assert torch.equal(L.group_advantages(t([3.0, 3.0]), torch.tensor([0, 0]), scale=True), t([0.0, 0.0]))


def test_grpo_token_loss_against_a_hand_formula():
    logp = t([[-1.0, -2.0, -0.5], [-3.0, -0.2, 0.0]])
    old = t([[-1.1, -1.5, -0.5], [-2.0, -0.4, 0.0]])
    ref = t([[-1.2, -2.5, -0.4], [-2.5, -0.3, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv = t([2.0, -1.0])
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    got = L.grpo_token_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta)
    for i in range(2):
        for j in range(3):
            r = math.exp(logp[i, j] - old[i, j])
            surrogate = -min(r * adv[i].item(), min(max(r, 1 - eps_low), 1 + eps_high) * adv[i].item())
            k3 = math.exp(ref[i, j] - logp[i, j]) - (ref[i, j] - logp[i, j]).item() - 1
            want = (surrogate + beta * k3) * mask[i, j].item()
            assert math.isclose(got["loss"][i, j].item(), want, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(got["kl"][i, j].item(), k3 * mask[i, j].item(), rel_tol=1e-12, abs_tol=1e-15)


def test_grpo_gradient_is_cut_exactly_where_the_clip_binds():
    """d loss / d logp per token: -A * ratio inside the clip (or where the clip would only help),
    0 where it binds; the k3 term adds beta * (1 - exp(ref - logp))."""
    # ratios exp(0.5) > 1.28 and exp(-0.5) < 0.8, each with a positive and a negative advantage
    logp = t([[0.5], [0.5], [-0.5], [-0.5]]).requires_grad_()
    old, mask = torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)
    adv = t([1.0, -1.0, 1.0, -1.0])
    loss = L.grpo_token_loss(logp, old, None, adv, mask, 0.2, 0.28, 0.0)["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    assert torch.allclose(grad.flatten(), t([0.0, r_hi, -r_lo, 0.0]))
    ref = t([[0.1], [0.1], [0.1], [0.1]])
    loss = L.grpo_token_loss(logp, logp.detach(), ref, adv, mask, 0.2, 0.2, 0.5)["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    want = -adv + 0.5 * (1 - torch.exp(ref.flatten() - logp.detach().flatten()))
    assert torch.allclose(grad.flatten(), want)


GRPO_ROWS = [
    {"prompt_id": "a", "prompt": "The film was", "generation1": "a delight from start to end.", "generation1_reward": 0.9},
    {"prompt_id": "a", "prompt": "The film was", "generation1": "a chore.", "generation1_reward": 0.1},
    {"prompt_id": "a", "prompt": "The film was", "generation1": "fine, I guess.", "generation1_reward": 0.4},
    {"prompt_id": "b", "prompt": "Honestly, this movie", "generation1": "moved me.", "generation1_reward": 0.7},
    {"prompt_id": "b", "prompt": "Honestly, this movie", "generation1": "bored me to tears.", "generation1_reward": 0.2},
]


def grpo(**opts):
    return make_objective(TrainConfig(objective="grpo", max_length=32, max_prompt_length=8, grpo=opts))


def alone_token_logps(model, tok, row):
    one = sequences([from_text(tok, row["prompt"], row["generation1"])], tok.pad_token_id, 8, 32)
    lp, mask = completion_token_logps(model, one["input_ids"], one["attention_mask"], one["completion_mask"])
    return lp[0][mask[0].bool()]


@needs_prepared
@pytest.mark.parametrize("opts", [{"beta": 0.1}, {"beta": 0.0, "scale_rewards": False, "loss_type": "dr_grpo",
                                                 "max_completion_length": 16, "epsilon_high": 0.3}])
def test_grpo_objective_against_each_sequence_scored_alone(tiny, opts):
    """The objective's per-example losses (shared prompts, cached per-token reference and sampling
    log-probs laid on the batch's grid) equal the formula over each sequence scored on its own."""
    model, tok = tiny
    obj = grpo(**opts)
    alone = [alone_token_logps(model, tok, r) for r in GRPO_ROWS]
    gen = torch.Generator().manual_seed(0)
    rows = [{**r, "generation1_logps": (lp - 0.3 * torch.rand(len(lp), generator=gen, dtype=lp.dtype)).tolist(),
             "reference_token_logps1": (lp + 0.2).tolist()} for r, lp in zip(GRPO_ROWS, alone)]
    batch = obj.collate(rows, tok)
    assert "shared_prompt_ids" in batch  # the two prompts run once each
    got, metrics = obj.per_example_loss(model, batch)
    adv = L.group_advantages(t([r["generation1_reward"] for r in rows]), torch.tensor([0, 0, 0, 1, 1]),
                             obj.opt.scale_rewards)
    for i, (r, lp) in enumerate(zip(rows, alone)):
        old, ref = (torch.tensor(r[c], dtype=torch.float32).double() for c in ("generation1_logps", "reference_token_logps1"))
        parts = L.grpo_token_loss(lp[None], old[None], ref[None] if obj.opt.beta else None, adv[i:i + 1],
                                  torch.ones(1, len(lp), dtype=lp.dtype), obj.opt.epsilon,
                                  obj.opt.epsilon_high or obj.opt.epsilon, obj.opt.beta)
        denominator = len(lp) if obj.opt.loss_type == "grpo" else obj.opt.max_completion_length
        torch.testing.assert_close(got[i], parts["loss"].sum() / denominator, rtol=1e-5, atol=1e-6)
    assert 0 < float(metrics["clip_fraction"].max()) <= 1  # some recorded log-probs are far enough to clip


@needs_prepared
def test_grpo_gradient_matches_finite_differences_on_tiny_model(tiny):
    model, tok = tiny
    obj = grpo(beta=0.1)
    rows = [{**r, "generation1_logps": (alone_token_logps(model, tok, r) - 0.05).tolist()} for r in GRPO_ROWS]
    obj.ref_model = model  # the resident reference path (no cached columns)
    assert_gradient_matches_finite_differences(obj, model, tok, rows)


def test_grpo_options_are_checked():
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo(loss_type="dr_grpo")
    obj = grpo(num_iterations=3)
    assert obj.updates_per_batch() == 3


@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
@pytest.mark.parametrize("extra", [0, 2])  # tokens the policy added (Quark's), absent from the reference
def test_fused_head_stats_match_the_formulas_and_their_gradients(direction, extra):
    """HeadStats (log p(y), exact KL, entropy) against losses.token_kl / entropy on the full logits:
    values, gradients of a weighted sum by autograd, and gradcheck in float64."""
    from stages.training.logprobs import HeadStats

    g = torch.Generator().manual_seed(extra)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9 + extra, 4, dtype=torch.float64, generator=g, requires_grad=True)
    rh, rw = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(9, 4, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 3, 8, 3, 1])
    coef = torch.randn(3, 5, dtype=torch.float64, generator=g)

    def fused(hh, ww):
        return HeadStats.apply(hh, ww, y, rh, rw, direction == "ref_policy")

    def plain(hh, ww):
        z = hh @ ww.T
        return (torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1), L.token_kl(z, rh @ rw.T, direction),
                L.entropy(z))

    for a, b in zip(fused(h, w), plain(h, w)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    loss = lambda f: sum((t * c).sum() for t, c in zip(f(h, w), coef))  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(fused), (h, w)), torch.autograd.grad(loss(plain), (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(fused, (h, w))
    no_ref = HeadStats.apply(h, w, y, None, None, True)  # kl_coef 0: no reference, KL 0
    assert torch.equal(no_ref[1], torch.zeros(5, dtype=torch.float64))


@needs_prepared
@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
def test_quark_through_the_fused_head_equals_the_checkpointed_graph(tiny, direction, monkeypatch):
    """Quark's loss with a resident reference (exact KL, entropy): the same per-example losses and
    gradients through HeadStats as through the checkpointed autograd graph, on the tiny model."""
    import copy

    import stages.training.logprobs as lp

    model, tok = tiny
    policy, ref = copy.deepcopy(model), copy.deepcopy(model).eval()
    cfg = TrainConfig(objective="quark", model="tiny-llama", max_length=32, max_prompt_length=8,
                      quark={"kl_direction": direction, "control_tokens": ["<|quark_0|>", "<|quark_1|>"]})
    obj = make_objective(cfg)
    rows = [{"prompt": r["prompt"], "generation1": r[g], "control": f"<|quark_{k}|>"}
            for r in ROWS for k, g in enumerate(("generation1", "generation2"))]
    tok = copy.deepcopy(tok)
    obj.prepare_model(policy, tok, rows, 0)  # the policy gains the two control tokens; the reference does not
    obj.ref_model = ref
    batch = obj.collate(rows, tok)
    weight = policy.model.layers[0].mlp.up_proj.weight

    def run():
        loss, _ = obj.per_example_loss(policy, batch)
        return loss, torch.autograd.grad(loss.sum(), weight)[0]

    fused = run()
    monkeypatch.setattr(lp, "_fusable", lambda head, h: False)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-8, atol=1e-10)


@needs_prepared
@pytest.mark.parametrize("fused", [True, False])
def test_quark_predicts_the_original_vocabulary_only(tiny, fused, monkeypatch):
    """Quark's control tokens are inputs only: its log-probs and entropy are those of the logits
    without the control tokens' columns (as the sampler, which suppresses them, draws), and their
    tied output rows get no gradient from being predicted; scoring with `vocab` agrees."""
    import copy

    import stages.training.logprobs as lp
    from stages.services.scoring import score

    if not fused:
        monkeypatch.setattr(lp, "_fusable", lambda head, h: False)
    model, tok = tiny
    policy, tok = copy.deepcopy(model), copy.deepcopy(tok)
    cfg = TrainConfig(objective="quark", model="tiny-llama", max_length=32, max_prompt_length=8,
                      quark={"kl_coef": 0.0, "entropy_coef": 0.5, "control_tokens": ["<|quark_0|>", "<|quark_1|>"]})
    obj = make_objective(cfg)
    rows = [{"prompt": r["prompt"], "generation1": r["generation1"], "control": "<|quark_0|>"} for r in ROWS]
    obj.prepare_model(policy, tok, rows, 0)
    vocab = len(tok) - 2
    assert obj.vocab == vocab
    batch = obj.collate(rows, tok)
    loss, metrics = obj.per_example_loss(policy, batch)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    lp_full = torch.log_softmax(logits[..., :vocab], -1)
    mask = batch["completion_mask"][:, 1:].bool()
    token_lp = lp_full.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    ent = -(lp_full.exp() * lp_full).sum(-1)
    n = mask.sum(-1)
    nll = -(token_lp * mask).sum(-1) / n
    torch.testing.assert_close(metrics["entropy"].double(), (ent * mask).sum(-1) / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), nll - 0.5 * (ent * mask).sum(-1) / n, rtol=1e-5, atol=1e-5)
    # The control rows of the tied embedding move only through their use as inputs: with every
    # row conditioned on quark_0, quark_1's row gets no gradient at all.
    grad = torch.autograd.grad(loss.sum(), policy.get_input_embeddings().weight)[0]
    assert grad[vocab + 1].abs().max() == 0 and grad[vocab].abs().max() > 0
    seqs = [of_record(tok, r, "generation1", obj.prefix(r, tok)) for r in rows]
    sums, _ = score(policy, seqs, tok.pad_token_id, 4, (8, 32), vocab=vocab)
    torch.testing.assert_close(torch.tensor(sums, dtype=torch.float64), (token_lp * mask).sum(-1), rtol=1e-5, atol=1e-4)


@needs_prepared
def test_reference_computes_the_columns_its_objective_reads_and_no_others(tiny):
    from stages.config import ReferenceConfig, RunConfig
    from stages.reference import reference_shard
    from stages.services.models import build_tiny_llama

    def columns(objective: str) -> list[str]:
        return RunConfig(experiment="x", train={"objective": objective}).reference.columns

    assert columns("dpo") == ["reference_logp1", "reference_logp2"]
    assert columns("kto") == ["reference_logp1", "reference_kl_logp"]
    # Quark's record carries a partner in generation2, scored by the policy only (the pair contrast).
    assert columns("quark") == columns("nlf") == columns("grpo") == ["reference_token_logps1"]
    assert columns("sft") == []

    path = str(build_tiny_llama())
    cfg = ReferenceConfig(model="tiny-llama", batch_size=4, max_length=32, max_prompt_length=8, mixed_precision="no")
    quark = dict(ROWS[0], control="<|quark_0|>", control2="<|quark_1|>")
    dpo = reference_shard([ROWS[0]], 0, path, cfg.model_copy(update={"columns": columns("dpo")}))[0]
    both = reference_shard([quark], 0, path, cfg.model_copy(update={"columns": columns("quark")}))[0]
    assert dpo["reference_logp2"] is not None and dpo["reference_token_logps1"] is None
    assert both["reference_logp2"] is None and both["reference_logp1"] is None
    # The same model, sequence and arithmetic: the per-token column sums to the pairwise one.
    assert sum(both["reference_token_logps1"]) == pytest.approx(dpo["reference_logp1"], abs=1e-4)
