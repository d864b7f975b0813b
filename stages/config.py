"""Run configurations: YAML validated by pydantic, with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo is an error that names its key path instead of a
setting silently ignored. Defaults sit here, at the top of each section, where a reader finds them.
"""

from __future__ import annotations

import re

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError, create_model, field_validator, model_validator

from stages.pipeline.errors import BadInput
from stages.pipeline.refs import ArtifactRef
from stages.pipeline.sections import Section, conditioning_template, control_prefix_template


class LoadPromptsConfig(Section):
    # A built-in corpus ("movie_snippets", "tweets", "product_snippets", "editorial_snippets"),
    # a local/fsspec Parquet, JSONL or CSV file, or a hub dataset name (only where the hub is reachable).
    source: str | ArtifactRef = "movie_snippets"
    hub_split: str = "train"  # the split of a hub dataset (or of a local dataset folder) to read
    # Both also apply to a local dataset folder (the hub's layout, read by load_dataset):
    name: str | None = None  # a dataset's configuration (load_dataset's `name`)
    data_dir: str | None = None  # a folder inside the dataset (Anthropic/hh-rlhf: harmless-base, helpful-base, ...)
    # A branch, tag or commit of a hub dataset. The commit it resolves to enters the stage's identity,
    # so an updated hub dataset re-runs the stage instead of reusing the old artifact.
    revision: str | None = None
    # Conversational rows (formats hh_rlhf, ultrafeedback, conversational tldr_preference) rendered
    # for the policy: auto uses its tokenizer's chat template with the generation prompt where it has
    # one; none (or a tokenizer without a template) writes "User: ...\nAssistant:".
    chat_template: Literal["auto", "none"] = "auto"
    tokenizer: str | None = None  # whose chat template: filled from sample.model (round 0's policy) for conversational formats
    # our column -> the source's column; `prompt` is required, `completion` and `score` optional;
    # `prompt_ids` and `completion_ids` (token ids, as sample records them) are read when present.
    columns: dict[str, str] = Field(default_factory=dict)
    # plain: the columns above; or a preference schema mapped to prompt / completion / rejected.
    format: Literal["plain", "hh_rlhf", "ultrafeedback", "tldr_preference", "pairs"] = "plain"
    # For the built-in snippet corpora: prompt = the first N words, completion = the rest.
    # None keeps the whole text as the prompt (reward modelling on whole snippets).
    prompt_words: int | None = 6
    min_abs_score: float | None = None  # keep rows with |score| >= this (drops neutral snippets)
    min_prompt_chars: int = 1  # rows whose prompt is shorter are dropped
    max_prompt_chars: int = 2000  # rows whose prompt is longer are dropped
    min_completion_words: int = 0  # rows whose completion has fewer words are dropped
    dedupe: Literal["prompt", "row", "none"] = "prompt"  # keep the first row of each prompt, or of each identical row
    # The share of prompts held out (by a hash of the prompt, so stable across runs): evaluate's prompts.
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_rows: int | None = Field(None, gt=0)  # applied after the split, per split, in hash order


class SampleConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"  # transformers' generate on any device, or vLLM on a GPU machine
    model: str | None = None  # round 0's policy; default: train.model. Later rounds: last round's model.
    n: int = Field(2, ge=1)  # generations per prompt
    max_new_tokens: int = Field(32, ge=1)  # a completion stops here if the policy has not ended it
    temperature: float = Field(1.0, gt=0)  # the logits are divided by it before sampling
    top_p: float = Field(0.9, gt=0, le=1)  # nucleus sampling: the smallest set of tokens with this much probability
    top_k: int = Field(50, ge=0)  # transformers' sampling default, kept; 0: off
    # Sequences per generate call (prompts x n). More share each decoding step's read of the
    # weights (SmolLM2 on 2 CPU cores: 128 a call samples 1.75x faster than 32); auto: as many as
    # a memory budget for their KV cache and logits allows, at most 256 (generation.prompts_per_call).
    batch_size: PositiveInt | Literal["auto"] = "auto"
    max_prompt_tokens: int = Field(64, ge=1)  # a longer prompt keeps its last tokens (the conditioning counts)
    # The sampler's weights: bfloat16 halves the bytes each decoding step reads and, where the
    # hardware has bf16 units (CUDA, CPUs with AVX512-BF16 or AMX), about doubles tokens/s on CPU
    # (benchmarks/bench_sampling.py); the recorded log-probs are then the bf16 sampler's own.
    # auto: bfloat16 where the hardware has it, else float32 (emulated bf16 is slower).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    split: Literal["train", "heldout", "all"] = "train"  # whose prompts are sampled
    max_prompts: int | None = Field(None, gt=0)  # the first this many prompts of the split (hash order)
    # Split the prompts into this many shards, each a Ray task (stages/services/shards.py; RAY_ADDRESS
    # names the cluster, else a local one starts). 1: in this process, no Ray.
    shards: int = Field(1, ge=1)
    # none; quark_best: prefix the best reward token; feedback: condition on `feedback` (NLF).
    conditioning: Literal["none", "quark_best", "feedback"] = "none"
    # Rounds before this one sample without conditioning: round 0's policy is the base model, which
    # has never seen a reward token or feedback (Quark's and NLF's initial pool). Evaluate always
    # conditions (it samples the trained policy).
    conditioning_from_round: int = Field(1, ge=0)
    # Tokens the policy may condition on but never writes (Quark's control tokens, as Quark's own
    # sampler bans them): filled from train.quark. The base vocabulary lacks them, so a sampled one
    # could not even be scored by the reference.
    suppress_tokens: list[str] = []
    control_token: str = "<|quark_0|>"  # conditioning quark_best: the token put before the prompt
    control_template: str = "{control}{prompt}"  # where it goes: train.quark.control_template's (filled from it)
    feedback: str = "Excellent."  # conditioning feedback: the feedback the policy is asked for
    # conditioning feedback: how feedback and prompt are joined; the text before {prompt} is the prefix.
    feedback_template: str = "feedback: {feedback} input: {prompt}"
    _template = field_validator("feedback_template")(conditioning_template)
    _control_template = field_validator("control_template")(control_prefix_template)


def _same_control_template(sampling: SampleConfig, where: str, template: str) -> None:
    """A sampler conditions on Quark's token where training put it: train.quark.control_template's
    place, filled in; one written differently is an error, not a policy asked in words it never saw."""
    if "control_template" in sampling.model_fields_set and sampling.control_template != template:
        raise ValueError(f"{where}.control_template {sampling.control_template!r} differs from "
                         f"train.quark.control_template {template!r} (set the latter only)")
    sampling.control_template = template


def _annotator_step():
    """One `annotate.steps[]` entry: the options of the annotator its `kind` names, from the
    registry (stages/annotators/, one file each)."""
    from stages.annotators import ANNOTATORS

    return Annotated[Union[tuple(cls.Options for cls in ANNOTATORS.values())], Field(discriminator="kind")]


AnnotatorStep = _annotator_step()


def annotator_step(**options) -> BaseModel:
    """An annotate step from its options: annotator_step(kind="rule", callable="pkg.fn")."""
    return TypeAdapter(AnnotatorStep).validate_python({"kind": "reward_model", **options})


class AnnotateConfig(Section):
    # Annotators applied in order, each by its `kind` (options below): a later scoring step replaces
    # the scores, a feedback step (template_feedback) words the scores so far.
    steps: list[AnnotatorStep] = Field(default_factory=lambda: [annotator_step()])
    shards: int = Field(1, ge=1)  # samples split over this many Ray tasks (as sample.shards)


class ReweightStrategy(Section):
    # uniform; reward_softmax: softmax(score / temperature) within each prompt; balance: equal
    # total weight per class (score above / below the median) or per score quantile; importance:
    # pi_train(y) / pi_sample(y), self-normalised and clipped; callable: f(rows) -> weights.
    kind: Literal["uniform", "reward_softmax", "balance", "importance", "callable"] = "uniform"
    temperature: float = Field(1.0, gt=0)  # reward_softmax: lower is greedier
    balance_by: Literal["median", "quantile"] = "median"  # balance: the classes to equalise
    quantiles: int = Field(5, ge=2)  # balance_by quantile: how many
    clip: float = Field(5.0, gt=0)  # importance weights are clipped at this (after normalising to mean 1)
    policy: str | None = None  # importance: the policy being trained (default: this round's starting policy)
    callable: str | None = None  # kind callable: "package.module.function", f(rows) -> one weight per row


class ReweightConfig(Section):
    # Applied in order; the weights multiply (renormalised to mean 1).
    strategies: list[ReweightStrategy] = Field(default_factory=lambda: [ReweightStrategy()])


class BuildPoolConfig(Section):
    # sft: prompt -> completion. reward_pairs: pairs of whole texts whose scores differ.
    # pairs: chosen vs rejected (given, or best vs worst completion of a prompt by score).
    # pointwise: desirable / undesirable (KTO). quark: reward-quantile control tokens.
    # nlf: feedback text per record. rl: scored samples grouped by prompt.
    kind: Literal["sft", "reward_pairs", "pairs", "pointwise", "quark", "nlf", "rl"] = "sft"
    min_score_gap: float = 1.0  # reward_pairs, and pairs built from scores
    # sft: train on every completion, or on each prompt's best-scored one (best-of-n distillation,
    # rejection-sampling fine-tuning: the offline SFT baseline on a scored pool).
    sft_selection: Literal["all", "best"] = "all"
    pairing: Literal["best_worst", "all_pairs"] = "best_worst"  # pairs from n scored samples per prompt
    # pointwise from scores: desirable when score > threshold (a number, "mean" or "median").
    desirable_threshold: float | Literal["mean", "median"] = "median"
    quantiles: int = Field(5, ge=2)  # quark: equal-size reward bins; the best bin gets token 0
    # quark / nlf: rank rewards over the whole pool, or among each prompt's own samples (a sample's
    # bin then says how it compares with its siblings, not how positive its prompt is).
    quantile_scope: Literal["global", "per_prompt"] = "global"
    # quark / nlf: a record's partner for the pairwise contrast (train.<objective>.pair_contrast_coef)
    # is its prompt's farthest-scored sample under another condition, if at least this far away.
    partner_min_gap: float = Field(0.0, ge=0)
    control_token: str = "<|quark_{k}|>"  # quark: the token of bin k, added to the policy's vocabulary
    # nlf without an annotator's feedback: one phrase per reward quantile, best first.
    feedback_phrases: list[str] = Field(default_factory=lambda: ["Excellent.", "Good.", "Okay.", "Poor.", "Terrible."])
    max_records: int | None = Field(None, gt=0)  # per split
    heldout_max_records: int | None = Field(None, gt=0)  # held-out split only; default max_records


class DataPoolConfig(Section):
    """The persistent pool of Quark / NLF rounds (stages/data/pool.py says what each option does)."""
    drop: float = Field(0.0, ge=0, le=1)  # fraction of the previous pool dropped per prompt, oldest first
    max_age: int | None = Field(None, ge=1)  # in rounds: 1 keeps this round's samples only
    max_per_prompt: int | None = Field(None, ge=1)  # the newest kept
    draw_per_quantile: int | None = Field(None, ge=1)  # per prompt and quantile; None: train on all
    # Filled from build_pool (the quantiles it turns into tokens or feedback phrases).
    quantiles: int | None = Field(None, ge=2)
    quantile_scope: Literal["global", "per_prompt"] | None = None  # filled from build_pool


class LoraOptions(Section):
    """peft's LoraConfig: ours are the usual four (peft's names lora_alpha and lora_dropout work too);
    any other LoraConfig field (use_rslora, bias, modules_to_save, init_lora_weights, use_dora, ...)
    passes through to it, and a key LoraConfig does not have is refused."""

    model_config = ConfigDict(extra="allow")
    r: int = Field(16, ge=1)  # the adapters' rank
    alpha: int = Field(32, ge=1, validation_alias="lora_alpha")  # their scale is alpha / r
    dropout: float = Field(0.0, ge=0, lt=1, validation_alias="lora_dropout")  # dropout on the adapters' input
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # layers that get adapters

    @model_validator(mode="after")
    def _peft_fields(self):
        if not self.model_extra:
            return self
        import dataclasses

        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig)} - {"r", "lora_alpha", "lora_dropout", "target_modules"}
        for key in self.model_extra:
            if key not in known:
                raise ValueError(f"{key}: not a field of peft's LoraConfig")
        return self

    def lora_config(self):
        """peft's LoraConfig of these options."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
                          **(self.model_extra or {}))


class TrainBase(Section):
    # The objective (stages/training/objectives/, one file each); its options are the section named like it
    # (train.dpo, train.kto, ...), declared next to its code. See TrainConfig below.
    objective: str = "sft"
    # "smollm2", "minilm", "tiny-llama", a local model folder, or a hub id (online only).
    model: str = "smollm2"
    learning_rate: float = Field(2e-5, gt=0)  # AdamW's peak learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW's decoupled weight decay
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("linear", validation_alias="lr_scheduler_type")  # the decay after warm-up (to 0 at the last step)
    warmup_steps: int = Field(0, ge=0)  # steps of linear warm-up from 0
    epochs: int = Field(1, ge=1, validation_alias="num_train_epochs")  # passes over the records (max_steps stops earlier)
    max_steps: int | None = Field(None, gt=0)  # caps the optimizer steps
    batch_size: int = Field(4, ge=1, validation_alias="per_device_train_batch_size")  # records per micro-batch (a pair counts as one; rl: prompt groups)
    grad_accum: int = Field(1, ge=1, validation_alias="gradient_accumulation_steps")  # micro-batches per optimizer step
    max_length: int = Field(128, ge=8)  # tokens: prompt (at most max_prompt_length) + completion
    max_prompt_length: int = Field(64, ge=1)  # a longer prompt keeps its last tokens
    group_by_length: bool = True  # batch similar lengths together: less padding
    max_grad_norm: float | None = 1.0  # gradients are clipped to this norm; None: no clipping
    # bf16: bfloat16 weights, activations and gradients, float32 master weights and optimizer state
    # (stages/training/precision.py); no: float32; auto: bf16 where the hardware runs it natively
    # (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32. fp16 is refused (see below).
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # bf16 only: where a step's micro-batch gradients are summed. bfloat16: on the model, as autograd
    # accumulates them, then one float32 copy for the optimizer after the step's last backward pass
    # (as torchtune does; a lower peak and less wall: docs/benchmarks.md). float32: each added into
    # its float32 master as backward forms it (exact sums, for many micro-batches a step).
    grad_sum_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # Recompute each layer's activations in the backward pass: less memory, roughly 15-30% slower.
    gradient_checkpointing: bool = False
    # Experiment trackers (accelerate's) that also get every step's metrics; off by default.
    # TensorBoard writes under the train artifact's tracking/; the others log where their own
    # settings say (MLFLOW_TRACKING_URI, WANDB_MODE, ...).
    log_with: list[Literal["tensorboard", "trackio", "mlflow", "wandb"]] = Field([], validation_alias="report_to")
    # Llama-style SwiGLU MLPs and RMSNorms that recompute cheap elementwise intermediates in the
    # backward pass instead of saving them, and (on CPU) sdpa's own GQA instead of expanded KV
    # copies: about 40% less activation memory, same numbers (stages/training/lean_layers.py).
    lean_layers: bool = True
    # DPO, KTO, RL: run each prompt of a batch once and all its completions on its KV cache
    # (gradients flow through the cache), instead of the prompt once per completion. Same numbers;
    # fewer tokens through the model. Off under gradient checkpointing (HF turns the cache off there).
    share_prompt: bool = True
    checkpoint_every: int = Field(50, ge=1, validation_alias="save_steps")  # optimizer steps between resumable checkpoints
    # Data-parallel training on this many processes (torch.distributed through `accelerate launch`;
    # gloo on CPU): each takes its shard of every micro-batch, and the losses match one process at
    # the same global batch. `accelerate_config`: an accelerate config file for the launch instead
    # (multi-GPU DDP, FSDP, DeepSpeed ZeRO; configs/accelerate/).
    processes: int = Field(1, ge=1)
    accelerate_config: str | None = None  # see processes above
    # Where reference log-probs come from: the pool's cached columns (the reference stage), a
    # resident reference model, or auto (cached when the pool has them).
    reference: Literal["auto", "cached", "resident"] = "auto"
    reference_model: str | None = None  # default: the model being trained, before training
    lora: LoraOptions | None = None  # train LoRA adapters (peft) instead of every weight; merged into the saved model

    @field_validator("log_with", mode="before")
    @classmethod
    def _report_to(cls, value):
        """TRL's report_to spellings: one name as a string, "none" for none."""
        if isinstance(value, str):
            value = [value]
        return [v for v in value if v != "none"] if isinstance(value, list) else value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_fp16(cls, value):
        if value == "fp16":
            raise ValueError("fp16 is not supported: it needs loss scaling to train at all; use bf16 (same memory, "
                             "float32's range; Ampere+ GPUs and CPUs with AVX512-BF16/AMX) or no")
        return value

    @model_validator(mode="after")
    def _lengths(self):
        from stages.training.objectives import OBJECTIVES

        classifier = OBJECTIVES[self.objective].model_kind == "sequence_classifier"  # scores whole texts
        if not classifier and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})")
        return self


def _train_config() -> type[TrainBase]:
    """TrainBase plus `objective` restricted to the registered objectives and one options section
    per objective, from the registry: a new objective file is all it takes to configure it."""
    from stages.training.objectives import OBJECTIVES

    clash = sorted(set(OBJECTIVES) & set(TrainBase.model_fields))
    if clash:
        raise TypeError(f"objective name {clash[0]!r} is also a train setting")
    options = {name: (cls.Options, Field(default_factory=cls.Options)) for name, cls in OBJECTIVES.items()}
    return create_model("TrainConfig", __base__=TrainBase, __module__=__name__,
                        objective=(Literal[tuple(OBJECTIVES)], "sft"), **options)


TrainConfig = _train_config()


class ReferenceConfig(Section):
    batch_size: int = Field(8, ge=1)  # sequences per forward pass
    shards: int = Field(1, ge=1)  # records split over this many Ray tasks (as sample.shards)
    # The reference columns computed (stages/data/schemas.py REFERENCE_COLUMNS); filled from what the
    # training objective reads (its `reference_columns`), so no record is scored for nothing.
    columns: list[Literal["reference_logp1", "reference_logp2", "reference_kl_logp", "reference_token_logps1"]] | None = None
    # Filled from train (model, max_length, max_prompt_length, mixed_precision) so tokenisation and
    # arithmetic match training: cached log-probs equal what a resident reference would compute.
    mixed_precision: Literal["auto", "no", "bf16"] | None = None
    model: str | None = None  # filled from train.reference_model, else train.model
    max_length: int | None = None  # filled from train
    max_prompt_length: int | None = None  # filled from train


class EvaluateConfig(Section):
    batch_size: int = Field(8, ge=1)  # records per forward pass on held-out records
    max_records: int | None = Field(200, gt=0)  # held-out pool records scored by the objective's own metrics
    samples_to_show: int = Field(5, ge=0)  # samples copied into the manifest and the report
    # Online flows (filled from sample / annotate; what generation sets overrides the sample
    # section's value): sample held-out prompts from the trained policy, score them, and report
    # the mean reward, KL to the reference and lengths.
    generation: SampleConfig | None = None
    annotate: AnnotateConfig | None = None  # how evaluate scores its samples; online flows: filled from annotate
    max_prompts: int | None = Field(50, gt=0)  # held-out prompts sampled
    # Samples per held-out prompt: the intervals resample prompts, each with the mean of its samples,
    # so more samples narrow them where the reward varies within a prompt more than between prompts.
    samples_per_prompt: int = Field(1, ge=1)
    compare_base: bool = False  # round 0 also samples and scores the base model, for a baseline
    # Sample `controllability_prompts` held-out prompts with each conditioning in `controls` (best
    # first; filled from build_pool's quantile tokens or feedback phrases) and report the reward of each.
    controllability: bool = False
    controllability_prompts: int = Field(40, ge=2)  # held-out prompts sampled under each control
    controls: list[str] | None = None  # the conditionings, best first; filled from build_pool
    # With controllability, the teacher-forced conditioning probe too: base samples of one held-out
    # prompt whose rewards differ by at least `probe_min_gap` form its pairs; `probe_records`
    # training records are scored under every control for the match on what the policy trained on.
    probe_min_gap: float = Field(0.2, ge=0)
    probe_records: int = Field(200, ge=1)  # see probe_min_gap


StageName = Literal["load_prompts", "sample", "annotate", "reweight", "data_pool", "build_pool", "reference", "train",
                    "evaluate"]


# An experiment's or a work pool's name: a folder name and part of lock and deployment names.
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class RunConfig(Section):
    # A folder name, and part of lock and resume folder names: 100 characters at most.
    experiment: str = Field(pattern=f"^{NAME}$", max_length=100)
    description: str = ""  # free text, shown in the UI with the deployment
    seed: int = 0  # every stage's random state derives from it (stages/pipeline/seeds.py)
    rounds: int = Field(1, ge=1)  # online flows: round k samples from round k-1's policy
    stages: list[StageName] = Field(default_factory=lambda: ["load_prompts", "build_pool", "train", "evaluate"])  # run in this order, each round
    load_prompts: LoadPromptsConfig = Field(default_factory=LoadPromptsConfig)
    build_pool: BuildPoolConfig = Field(default_factory=BuildPoolConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    reweight: ReweightConfig = Field(default_factory=ReweightConfig)
    data_pool: DataPoolConfig = Field(default_factory=DataPoolConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # Stage -> the Prefect work pool whose workers run it, in runs of deployments (`align deploy`):
    # e.g. {sample: gpu, evaluate: gpu, train: training}. The other stages run where the flow runs.
    pools: dict[StageName, str] = {}

    @field_validator("stages")
    @classmethod
    def _no_repeats(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        return stages

    @model_validator(mode="after")
    def _pools_name_stages_of_the_flow(self):
        for stage, pool in self.pools.items():
            if stage not in self.stages:
                raise ValueError(f"pools: {stage} is not a stage of this flow (stages: {', '.join(self.stages)})")
            if not re.fullmatch(NAME, pool):
                raise ValueError(f"pools.{stage}: {pool!r} is not a work pool name (letters, digits, . _ -)")
        return self

    @model_validator(mode="after")
    def _reference_follows_train(self):
        ref = self.reference
        if ref.model is None:
            ref.model = self.train.reference_model or self.train.model
        if ref.max_length is None:
            ref.max_length = self.train.max_length
        if ref.max_prompt_length is None:
            ref.max_prompt_length = self.train.max_prompt_length
        if ref.mixed_precision is None:
            ref.mixed_precision = self.train.mixed_precision
        if ref.columns is None:
            from stages.training.objectives import OBJECTIVES
            ref.columns = list(OBJECTIVES[self.train.objective].reference_columns)
        if self.sample.model is None:
            self.sample.model = self.train.model
        lp = self.load_prompts
        if lp.tokenizer is None and lp.format != "plain" and lp.chat_template == "auto":
            lp.tokenizer = self.sample.model  # only where it renders: another policy re-runs nothing else
        quark_tokens = [self.build_pool.control_token.format(k=k) for k in range(self.build_pool.quantiles)]
        quark = getattr(self.train, "quark", None)
        if self.build_pool.kind == "quark" and quark is not None and not quark.control_tokens:
            quark.control_tokens = quark_tokens
        if quark is not None and quark.control_init and len(quark.control_init) != len(quark.control_tokens):
            raise ValueError(f"train.quark.control_init: {len(quark.control_init)} words for "
                             f"{len(quark.control_tokens)} control tokens (one per quantile, best first)")
        if self.train.objective == "quark":
            if not self.sample.suppress_tokens:
                self.sample.suppress_tokens = list(self.train.quark.control_tokens)
            _same_control_template(self.sample, "sample", self.train.quark.control_template)
        if self.data_pool.quantiles is None:
            self.data_pool.quantiles = self.build_pool.quantiles
        if self.data_pool.quantile_scope is None:
            self.data_pool.quantile_scope = self.build_pool.quantile_scope
        if "sample" in self.stages:  # evaluate generates and scores like the round did, but for what it sets
            given = self.evaluate.generation
            like_the_round = self.sample.model_copy(update={"n": 1, "split": "heldout"})
            self.evaluate.generation = like_the_round if given is None else like_the_round.model_copy(
                update={k: getattr(given, k) for k in given.model_fields_set})
            if self.evaluate.annotate is None and "annotate" in self.stages:
                self.evaluate.annotate = self.annotate.model_copy()
        ev = self.evaluate
        if self.train.objective == "quark" and ev.generation is not None:
            if not ev.generation.suppress_tokens:
                ev.generation.suppress_tokens = list(self.train.quark.control_tokens)
            _same_control_template(ev.generation, "evaluate.generation", self.train.quark.control_template)
        if ev.controllability and ev.controls is None:
            if self.build_pool.kind == "quark":
                ev.controls = list(quark_tokens)
            elif self.build_pool.kind == "nlf":
                ev.controls = list(self.build_pool.feedback_phrases)
        if ev.controllability and "evaluate" in self.stages and (
                ev.generation is None or ev.generation.conditioning == "none" or not ev.controls):
            raise ValueError("evaluate.controllability needs conditioned sampling (sample.conditioning) and "
                             "controls (a quark or nlf build_pool, or evaluate.controls)")
        return self

    def section(self, stage: str) -> Section:
        return getattr(self, stage)


def _error_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    from stages.annotators import ANNOTATORS

    # a discriminated union puts the chosen tag in the path (steps.0.rule.callable): leave it out
    loc = [p for i, p in enumerate(first["loc"]) if not (i and isinstance(first["loc"][i - 1], int) and p in ANNOTATORS)]
    kind = first["type"]
    if not loc:  # a check across sections: its message names the fields; the input is the whole config
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    path = ".".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{path}'"
    if kind == "missing":
        return f"{source}: missing required key '{path}'"
    return f"{source}: bad value for '{path}': {first['msg']} (got {first.get('input')!r})"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3 is int, [a, b] a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-5")
    try:
        value = yaml_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise BadInput(f"--set {item!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


class _ConfigLoader(yaml.SafeLoader):
    """safe_load with YAML 1.2's booleans: only true/false (any case) are booleans. PyYAML follows
    YAML 1.1, where yes/no/on/off are too, so `mixed_precision: no` arrived as False and was refused."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def yaml_value(text: str) -> Any:
    """One YAML document under the config rules (YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader


class _UniqueKeyLoader(_ConfigLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one, so a
    second `train:` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A config file's mapping; every problem is one BadInput line naming the file."""
    if not path.is_file():
        raise BadInput(f"config file does not exist: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise BadInput(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:  # an empty file would run every default: a full SFT of SmolLM2
        raise BadInput(f"{path}: the config is empty (give at least `experiment:` and what to change)")
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a mapping of sections at the top level")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def compose(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config with its `extends:` chain resolved: `extends: bases/tiny_llama.yaml` (a path relative
    to the file, or a list of them, applied in order) is the base this file's keys go on top of."""
    if path.resolve() in seen:
        raise BadInput(f"{path}: extends itself (through {' -> '.join(p.name for p in seen)})")
    data = read_yaml(path)  # errors name the path as given
    bases = data.pop("extends", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise BadInput(f"{path}: 'extends' must be a config path or a list of them")
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, compose(path.parent / base, seen + (path.resolve(),)))
    merged.pop("experiment", None)  # an experiment's name is its own, never a base's
    return deep_merge(merged, data)


def load_config(path: str | Path, overrides: list[str] | None = None, experiment: str | None = None) -> RunConfig:
    """Read, compose (`extends:`), override and validate a YAML run configuration; every error is one
    BadInput line."""
    path = Path(path)
    data = compose(path)
    data = apply_overrides(data, overrides or [])
    if experiment:
        data["experiment"] = experiment
    data.setdefault("experiment", path.stem)
    return validate_config(data, str(path))


def validate_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise BadInput(_error_line(e, source)) from None
