"""Generation from a causal LM: batched `generate` with a KV cache and left padding, prompts sorted
by length so batches waste little padding, temperature / top-p / max_new_tokens, stop on EOS, an
optional conditioning prefix (Quark's best reward token, or NLF feedback). Seeded: the same config
and checkpoint give the same samples. Each sample carries its token ids and the policy's own
log-prob of each generated token and their sum (temperature 1, no top-p: the distribution
importance weights and GRPO's ratio need), read from the raw logits while generating, so no
second forward pass is needed.

Used by the sample stage (the round's samples) and by evaluate (held-out samples of the trained
policy). Backends: "hf" (transformers generate, default) and "vllm" (GPU machines; imported only
when chosen).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from stages.config import SampleConfig
from stages.pipeline.errors import BadInput
from stages.services.models import load_causal_lm, load_tokenizer
from stages.data.tokens import keep_last, template_prefix, text_ids
from stages.training.precision import bf16_native


def conditioning(cfg: SampleConfig) -> tuple[str | None, str | None]:
    """(the text put before every prompt, the conditioning recorded with the sample)."""
    if cfg.conditioning == "quark_best":
        return template_prefix(cfg.control_template, control=cfg.control_token), cfg.control_token
    if cfg.conditioning == "feedback":
        return template_prefix(cfg.feedback_template, feedback=cfg.feedback), cfg.feedback
    return None, None


class TokenLogprobs(LogitsProcessor):
    """Records log p(sampled token) under the raw policy as `generate` goes.

    Custom processors run before generate's temperature and top-p warpers, so the scores seen here
    are the model's own logits. Step t's log-softmax is kept until step t+1's call reveals the token
    sampled from it; `finish` reads the last one.
    """

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), -1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, tokens[:, None]).squeeze(1))
            self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, new tokens] log-probs of the generated tokens (pad positions included)."""
        self._take(sequences[:, -1])
        return torch.stack(self.steps, 1) if self.steps else sequences.new_zeros(sequences.shape[0], 0, dtype=torch.float)


class NucleusSampler(LogitsProcessor):
    """Draws each next token from softmax(logits / temperature) cut to the top-p nucleus (the
    distribution of transformers' temperature and top-p warpers, with their keep rule: a token stays
    while the mass before it is below top_p) and returns scores whose argmax is the draw, so
    `generate` runs greedy. On CPU the warpers' sort of the vocabulary and torch.multinomial cost
    more than SmolLM2's whole bf16 step (107 and 52 ms at 64 x 49,152): here the nucleus is found
    among a row's 256 likeliest tokens when they hold top_p of the mass, else among its 4096 (SmolLM2
    at temperature 1: 58% and 99.6% of rows), else by sorting the row; the draw is Gumbel-max,
    log p - log E with E ~ Exp(1) from torch's seeded generator, over the nucleus only. Without
    top-p or top-k the draw is by inverse CDF (one uniform a row) over the whole vocabulary."""

    TIERS = (256, 4096)
    BLOCK = 256  # the inverse CDF's first level: blocks of this many tokens

    def __init__(self, temperature: float, top_p: float, top_k: int = 0, raw: TokenLogprobs | None = None):
        """raw: the recorder called just before on the same scores; at temperature 1 its
        log-softmax is the one this draw needs, so it is not computed twice."""
        self.temperature, self.top_p, self.top_k, self.raw = temperature, top_p, top_k, raw

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.top_k and self.top_k < scores.shape[-1]:
            # top-k first, renormalised, then top-p: the warpers' order. The draw indexes the k.
            top, idx = (scores.float() / self.temperature).topk(self.top_k)
            logp = torch.log_softmax(top, -1)
            logp = self._nucleus(logp) if self.top_p < 1 else logp
            choice = idx.gather(1, self._gumbel_argmax(logp)[:, None])[:, 0]
        elif self.top_p >= 1:
            choice = self._inverse_cdf(self._log_softmax(scores))
        else:
            choice = self._draw_from_nucleus(self._log_softmax(scores))
        return torch.full_like(scores, float("-inf")).scatter_(1, choice[:, None], 0.0)

    def _log_softmax(self, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 1 and self.raw is not None and self.raw.pending is not None:
            return self.raw.pending  # log_softmax(scores.float()): the same values, bit for bit
        return torch.log_softmax(scores.float() / self.temperature, -1)

    def _draw_from_nucleus(self, logp: torch.Tensor) -> torch.Tensor:
        """One draw per row from its top-p nucleus, found in the smallest tier that holds it."""
        choice = torch.empty(len(logp), dtype=torch.long, device=logp.device)
        todo = torch.arange(len(logp), device=logp.device)
        for k in self.TIERS:
            if k >= logp.shape[-1] or not len(todo):
                break
            top, idx = logp[todo].topk(k)  # sorted, likeliest first
            covered = top.exp().sum(-1) >= self.top_p
            choice[todo[covered]] = idx[covered].gather(1, self._gumbel_argmax(self._nucleus(top[covered]))[:, None])[:, 0]
            todo = todo[~covered]
        if len(todo):
            ranked, order = logp[todo].sort(-1, descending=True)
            choice[todo] = order.gather(1, self._gumbel_argmax(self._nucleus(ranked))[:, None])[:, 0]
        return choice

    def _nucleus(self, ranked_logp: torch.Tensor) -> torch.Tensor:
        """Log-probs sorted descending, -inf past the nucleus (the first token always stays)."""
        p = ranked_logp.exp()
        return ranked_logp.masked_fill(p.cumsum(-1) - p >= self.top_p, float("-inf"))

    @staticmethod
    def _gumbel_argmax(logp: torch.Tensor) -> torch.Tensor:
        return (logp - torch.empty_like(logp).exponential_().log()).argmax(-1)

    @classmethod
    def _inverse_cdf(cls, logp: torch.Tensor) -> torch.Tensor:
        """One draw per row over the whole vocabulary: the first token whose cumulative probability
        exceeds a uniform draw. One random number a row where Gumbel-max needs one a token (CPU's
        exponential_ over 32 x 49,152 took 33 ms a step, a fifth of SmolLM2's sampling time). In
        two levels, so no float64 pass over the vocabulary is needed (a float64 exp and cumsum of
        the whole row were 12 of an 81 ms step at batch 32): the block of BLOCK tokens by the
        float64 running sum of the blocks' float32 masses, then the token within it by the float64
        running sum of its BLOCK probabilities. The sums stay float64, so the tail of a
        49,152-token row keeps its mass."""
        rows, vocab = logp.shape
        p = torch.nn.functional.pad(logp.exp(), (0, -vocab % cls.BLOCK)).view(rows, -1, cls.BLOCK)
        mass = p.sum(-1).double()
        cdf = mass.cumsum(-1)
        u = torch.rand(rows, 1, dtype=torch.float64, device=logp.device) * cdf[:, -1:]
        block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
        within = p.gather(1, block[:, :, None].expand(-1, 1, cls.BLOCK))[:, 0].double().cumsum(-1)
        before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # the mass of earlier blocks
        # u's place in its block (cdf[block - 1] <= u < cdf[block]), in the units of the block's own float64 sum
        rest = (u - before) / mass.gather(1, block) * within[:, -1:]
        token = torch.searchsorted(within, rest, right=True).clamp_(max=cls.BLOCK - 1)
        return (block * cls.BLOCK + token)[:, 0].clamp_(max=vocab - 1)


def sampling_dtype(choice: str) -> torch.dtype:
    """sample.dtype resolved on this machine: auto is bfloat16 where it runs natively."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_native() else torch.float32


AUTO_MAX_SEQUENCES = 256  # beyond it a CPU step gains little and the logits grow
AUTO_BUDGET_BYTES = 2**30  # CPU: KV cache and logits of one call; CUDA: a quarter of free memory instead
FALLBACK_SEQUENCES = 32  # a model whose config does not say its KV cache's shape


def prompts_per_call(cfg: SampleConfig, model, longest_prompt: int) -> int:
    """Prompts per generate call: sample.batch_size // n, or for auto as many sequences as a memory
    budget holds (each: its KV cache over the longest prompt plus max_new_tokens, and four float32
    rows of logits a step), at most AUTO_MAX_SEQUENCES; always whole prompts, at least one."""
    if cfg.batch_size != "auto":
        return max(1, cfg.batch_size // cfg.n)
    c = getattr(model, "config", None)
    layers, heads = getattr(c, "num_hidden_layers", None), getattr(c, "num_attention_heads", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads and getattr(c, "hidden_size", None) else None)
    if not (layers and kv_heads and head_dim and getattr(c, "vocab_size", None)):
        return max(1, FALLBACK_SEQUENCES // cfg.n)
    weight = next(model.parameters())
    per_sequence = (2 * layers * kv_heads * head_dim * weight.element_size() * (longest_prompt + cfg.max_new_tokens)
                    + 4 * 4 * c.vocab_size)
    budget = torch.cuda.mem_get_info(weight.device)[0] // 4 if weight.device.type == "cuda" else AUTO_BUDGET_BYTES
    return max(1, min(AUTO_MAX_SEQUENCES, budget // per_sequence) // cfg.n)


def encode_prompt(tokenizer, text: str, cfg: SampleConfig) -> tuple[list[int], list[int]]:
    """(conditioning ids, prompt ids): the policy sees the two concatenated. The conditioning counts
    toward max_prompt_tokens and is kept whole; the prompt keeps its last tokens."""
    prefix = text_ids(tokenizer, conditioning(cfg)[0])
    if len(prefix) >= cfg.max_prompt_tokens:
        raise BadInput(f"sample.max_prompt_tokens: {cfg.max_prompt_tokens} tokens leave no room for the prompt "
                       f"after the {len(prefix)}-token conditioning")
    return prefix, keep_last(text_ids(tokenizer, text), cfg.max_prompt_tokens - len(prefix))


def generate_hf(path, prompts: list[str], cfg: SampleConfig, seed: int, log) -> list[list[dict]]:
    """For each prompt (conditioned as cfg says), n dicts: text, token ids and counts, truncated,
    policy_logprob and the per-token completion_logps."""
    tokenizer = load_tokenizer(path, padding_side="left")
    dtype = sampling_dtype(cfg.dtype)
    model = load_causal_lm(path, dtype).eval()
    eos = tokenizer.eos_token_id
    parts = [encode_prompt(tokenizer, p, cfg) for p in prompts]
    encoded = [prefix + prompt for prefix, prompt in parts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    vocab = tokenizer.get_vocab()
    banned = sorted({vocab[t] for t in cfg.suppress_tokens if t in vocab}) or None  # not yet added: nothing to ban
    per_call = prompts_per_call(cfg, model, max(map(len, encoded), default=0))  # prompts per generate call
    # Not the model's own generation defaults: its temperature and top-p would only warn.
    greedy = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, suppress_tokens=banned)
    out: list[list[dict]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    t0, new_tokens, done = time.perf_counter(), 0, 0
    bar = tqdm(total=len(prompts) * cfg.n, desc="sample", unit="seq", disable=None)
    for k in range(0, len(order), per_call):
        idx = order[k:k + per_call]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx])
        recorder = TokenLogprobs()
        sampler = NucleusSampler(cfg.temperature, cfg.top_p, cfg.top_k, raw=recorder)
        with torch.no_grad():
            # Greedy over NucleusSampler's scores is sampling; n copies of each prompt, in order.
            gen = model.generate(input_ids=input_ids.repeat_interleave(cfg.n, 0),
                                 attention_mask=mask.repeat_interleave(cfg.n, 0), generation_config=greedy,
                                 logits_processor=LogitsProcessorList([recorder, sampler]))
        token_logps = recorder.finish(gen)
        rows = gen[:, width:].tolist()
        for j, generated in enumerate(rows):
            stop = generated.index(eos) + 1 if eos in generated else len(generated)
            tokens = generated[:stop]
            i = idx[j // cfg.n]
            out[i].append({
                "completion": tokenizer.decode(tokens, skip_special_tokens=True), "prompt_tokens": len(encoded[i]),
                "completion_tokens": len(tokens), "truncated": not tokens or tokens[-1] != eos,
                "policy_logprob": float(token_logps[j, :stop].double().sum()),
                "completion_logps": token_logps[j, :stop].tolist(),
                "conditioning_ids": parts[i][0], "prompt_ids": parts[i][1], "completion_ids": tokens})
            new_tokens += len(tokens)
        bar.update(len(rows))
        done += len(rows)  # the bar counts nothing when it is disabled (not a terminal)
        rate = new_tokens / (time.perf_counter() - t0)
        bar.set_postfix(tok_s=f"{rate:.0f}")
        calls = -(-len(order) // per_call)
        if (k // per_call + 1) % max(1, calls // 5) == 0:  # the bar is hidden when not on a terminal
            log.info("sample: %d/%d sequences, %.0f tokens/s", done, len(prompts) * cfg.n, rate)
    bar.close()
    log.info("sample: %d sequences, %d new tokens, %.0f tokens/s (%s)", len(prompts) * cfg.n, new_tokens,
             new_tokens / max(1e-9, time.perf_counter() - t0), str(dtype).removeprefix("torch."))
    return out


def generate_vllm(path, prompts: list[str], cfg: SampleConfig, seed: int, log) -> list[list[dict]]:
    try:
        import vllm
    except ImportError:
        raise BadInput("sample.backend: 'vllm' is not installed here (pip install vllm on a machine with a GPU), "
                       "or use backend: hf") from None
    llm = vllm.LLM(model=str(path), seed=seed, dtype="auto" if cfg.dtype == "auto" else cfg.dtype)
    params = vllm.SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1,
                                 max_tokens=cfg.max_new_tokens,
                                 seed=seed, logprobs=0, bad_words=list(cfg.suppress_tokens) or None)
    parts = [encode_prompt(llm.get_tokenizer(), p, cfg) for p in prompts]  # the same token rules as hf
    out = []
    for (prefix, prompt), result in zip(parts, llm.generate([{"prompt_token_ids": a + b} for a, b in parts], params)):
        # vLLM's log-probs are under the sampling distribution (after temperature / top-p).
        out.append([{"completion": o.text, "prompt_tokens": len(prefix) + len(prompt),
                     "completion_tokens": len(o.token_ids), "truncated": o.finish_reason != "stop",
                     "policy_logprob": o.cumulative_logprob, "conditioning_ids": prefix, "prompt_ids": prompt,
                     "completion_ids": list(o.token_ids),
                     "completion_logps": [step[t].logprob for t, step in zip(o.token_ids, o.logprobs or [])] or None}
                    for o in result.outputs])
    return out


def generate(path, prompts: list[str], cfg: SampleConfig, seed: int, log) -> list[list[dict]]:
    """n samples per prompt with the configured backend."""
    return (generate_vllm if cfg.backend == "vllm" else generate_hf)(path, prompts, cfg, seed, log)
