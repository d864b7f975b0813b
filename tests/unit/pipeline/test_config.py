
import pytest

from conftest import ROOT
from stages.config import apply_overrides, load_config, validate_config
from stages.pipeline.errors import BadInput


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "experiment: e\ntrain:\n  batch_size: 2\n"),
                      ["train.learning_rate=1e-4", "load_prompts.columns.prompt=question", "stages=[load_prompts]"])
    assert cfg.train.batch_size == 2 and cfg.train.learning_rate == 1e-4
    assert cfg.load_prompts.columns == {"prompt": "question"}
    assert cfg.stages == ["load_prompts"]


def test_experiment_defaults_to_file_stem(tmp_path):
    assert load_config(write(tmp_path, "seed: 3\n", "my_run.yaml")).experiment == "my_run"


@pytest.mark.parametrize("text, expected", [
    ("train: [unclosed\n", "malformed YAML at line"),
    ("experiment: e\ntrain:\n  lr: 1\n", "unknown key 'train.lr'"),
    ("experiment: e\ntrain:\n  batch_size: many\n", "bad value for 'train.batch_size'"),
    ("experiment: e\nstages: [load_prompts, sampling]\n", "bad value for 'stages.1'"),
    ("experiment: 'bad name!'\n", "bad value for 'experiment'"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(BadInput) as e:
        load_config(write(tmp_path, text))
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(BadInput, match="config file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override():
    with pytest.raises(BadInput, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(BadInput, match="'experiment' is not a section"):
        apply_overrides({"experiment": "x"}, ["experiment.name=y"])


def test_stage_listed_twice():
    with pytest.raises(BadInput, match="listed twice"):
        validate_config({"experiment": "e", "stages": ["train", "train"]})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.experiment


def test_extends_merges_sections_key_by_key(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases/a.yaml").write_text("experiment: never_inherited\nseed: 3\n"
                                           "train: {model: tiny-llama, learning_rate: 0.5, max_length: 48}\n"
                                           "stages: [load_prompts, build_pool, train]\n")
    (tmp_path / "bases/b.yaml").write_text("extends: a.yaml\ntrain: {learning_rate: 0.25}\n")
    (tmp_path / "run.yaml").write_text("extends: [bases/b.yaml]\ntrain: {batch_size: 2}\nstages: [load_prompts, build_pool]\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.max_length=80"])
    assert (cfg.experiment, cfg.seed) == ("run", 3)
    assert (cfg.train.model, cfg.train.learning_rate, cfg.train.batch_size, cfg.train.max_length) == \
        ("tiny-llama", 0.25, 2, 80)
    assert cfg.stages == ["load_prompts", "build_pool"]  # lists are replaced, not merged


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(BadInput, match=r"loop\.yaml: extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(BadInput, match=r"config file does not exist: .*nowhere\.yaml"):
        load_config(tmp_path / "gone.yaml")
    (tmp_path / "bad.yaml").write_text("extends: {a: 1}\n")
    with pytest.raises(BadInput, match="'extends' must be a config path"):
        load_config(tmp_path / "bad.yaml")


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latin.yaml").write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    with pytest.raises(BadInput, match=r"latin\.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin.yaml")


@pytest.mark.parametrize("text, overrides", [
    ("experiment: e\ntrain:\n  mixed_precision: no\n", []),  # YAML 1.1 would read `no` as false
    ("experiment: e\n", ["train.mixed_precision=no"]),
    ("experiment: e\ntrain:\n  mixed_precision: 'no'\n", []),
])
def test_mixed_precision_no_is_typed_as_users_write_it(tmp_path, text, overrides):
    cfg = load_config(write(tmp_path, text), overrides)
    assert cfg.train.mixed_precision == "no"
    assert cfg.reference.mixed_precision == "no"  # the reference stage computes like training


def test_yaml_words_and_numbers_stay_text_where_text_is_expected(tmp_path):
    """Only true/false are booleans (YAML 1.2); a number given for a text field is that text."""
    cfg = load_config(write(tmp_path, "experiment: e\nsample:\n  feedback: yes\nload_prompts:\n  hub_split: 2024\n"
                                      "train:\n  group_by_length: true\n  share_prompt: False\n"), ["sample.control_token=on"])
    assert cfg.sample.feedback == "yes" and cfg.load_prompts.hub_split == "2024" and cfg.sample.control_token == "on"
    assert cfg.train.group_by_length is True and cfg.train.share_prompt is False


def test_fp16_is_refused_with_the_reason(tmp_path):
    with pytest.raises(BadInput, match=r"bad value for 'train.mixed_precision': .*fp16 is not supported: it needs loss "
                                       r"scaling.*use bf16"):
        load_config(write(tmp_path, "experiment: e\ntrain:\n  mixed_precision: fp16\n"))


def test_trls_and_pefts_names_are_accepted_beside_ours(tmp_path):
    """A TRL user's keys work as they write them (in YAML and in --set), and dump as ours."""
    path = tmp_path / "trl.yaml"
    path.write_text("experiment: trl\ntrain:\n  objective: dpo\n  per_device_train_batch_size: 8\n"
                    "  gradient_accumulation_steps: 2\n  num_train_epochs: 3\n  lr_scheduler_type: cosine\n"
                    "  save_steps: 10\n  report_to: none\n  dpo: {loss_type: ipo}\n"
                    "  lora: {r: 4, lora_alpha: 8, lora_dropout: 0.1}\n")
    train = load_config(path, ["train.report_to=tensorboard"]).train
    assert (train.batch_size, train.grad_accum, train.epochs, train.lr_scheduler, train.checkpoint_every,
            train.dpo.loss, train.lora.alpha, train.lora.dropout) == (8, 2, 3, "cosine", 10, "ipo", 8, 0.1)
    assert train.log_with == ["tensorboard"]
    assert load_config(path).train.log_with == []  # report_to: none
    dumped = train.model_dump()
    assert dumped["batch_size"] == 8 and "per_device_train_batch_size" not in dumped
    with pytest.raises(BadInput, match="train.per_device_batch_size"):  # a misspelling is still an error
        validate_config({"experiment": "x", "train": {"per_device_batch_size": 8}})


def test_the_whole_lora_section_reaches_peft():
    """Any LoraConfig field passes through (use_rslora scales by alpha / sqrt(r)); others are refused."""
    import math

    cfg = validate_config({"experiment": "x", "train": {"lora": {"r": 4, "alpha": 8, "use_rslora": True,
                                                                  "bias": "lora_only"}}})
    lora = cfg.train.lora.lora_config()
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.bias) == (4, 8, True, "lora_only")
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    peft_model = get_peft_model(tiny, lora)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    with pytest.raises(BadInput, match="rank_dropout: not a field of peft's LoraConfig"):
        validate_config({"experiment": "x", "train": {"lora": {"rank_dropout": 0.1}}})


def test_evaluate_samples_like_the_round_but_for_what_it_sets():
    """An online flow's evaluate.generation is the round's sampler (one sample, held-out prompts);
    what evaluate.generation sets itself (nlf_movies.yaml, quark_movies.yaml: the protocol's top-p 0.9 / top-k 50
    while its rounds sample at top-p 1) overrides just that."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["sample.top_p=0.8"])
    assert cfg.evaluate.generation.top_p == 0.8 and cfg.evaluate.generation.split == "heldout"
    cfg = load_config(ROOT / "configs" / "nlf_movies.yaml", ["sample.top_p=0.8"])
    gen = cfg.evaluate.generation
    assert (gen.top_p, gen.top_k, gen.n, gen.split, gen.conditioning, gen.feedback) == (
        0.9, 50, 1, "heldout", "feedback", "Excellent.")
    assert gen.max_new_tokens == cfg.sample.max_new_tokens and (cfg.sample.top_p, cfg.sample.n) == (0.8, 4)
