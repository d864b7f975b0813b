"""stages/preference_formats: hub preference schemas -> prompt/chosen/rejected, through Parquet and JSONL files."""

import json

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest

from stages.pipeline.errors import BadInput
from stages.data.preference_formats import FORMATS, render_prompt, to_pairs

# --- hand-made rows in each hub schema -------------------------------------------------------------

HH_PROMPT = ("\n\nHuman: What's a good way to keep basil alive indoors?"
             "\n\nAssistant: Give it a sunny windowsill and water it when the top of the soil is dry."
             "\n\nHuman: How often should I pinch it back?"
             "\n\nAssistant:")
HH_ROWS = [
    {"chosen": HH_PROMPT + " Pinch off the top pair of leaves every week or two, just above a leaf node.",
     "rejected": HH_PROMPT + " Never, basil grows best if you leave it alone."},
    {"chosen": "\n\nHuman: Tell me a joke about cats.\n\nAssistant: Why did the cat sit on the computer? "
               "To keep an eye on the mouse.",
     "rejected": "\n\nHuman: Tell me a joke about cats.\n\nAssistant: I don't know any jokes."},
    # An empty final answer (present in the real data): dropped.
    {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?"},
]


def msg(role, content):
    return {"role": role, "content": content}


# trl-lib/ultrafeedback_binarized: no prompt column; chosen/rejected hold the user turn too.
UF_TRL_ROWS = [
    {"chosen": [msg("user", "Name three primary colors."), msg("assistant", "Red, yellow and blue.")],
     "rejected": [msg("user", "Name three primary colors."), msg("assistant", "Green, purple and orange.")],
     "score_chosen": 9.0, "score_rejected": 3.0},
    {"chosen": [msg("user", "Translate 'thank you' to French."), msg("assistant", "Merci.")],
     "rejected": [msg("user", "Translate 'thank you' to French."), msg("assistant", "Gracias.")],
     "score_chosen": 10.0, "score_rejected": 2.0},
    # An empty rejected answer: dropped.
    {"chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],
     "rejected": [msg("user", "Say hi."), msg("assistant", "")],
     "score_chosen": 8.0, "score_rejected": 1.0},
]

# HuggingFaceH4/ultrafeedback_binarized: the same plus prompt, prompt_id and messages; multi-turn here.
UF_H4_ROWS = [
    {"prompt": "Is 17 prime?", "prompt_id": "a1",
     "chosen": [msg("system", "Answer briefly."), msg("user", "Is 15 prime?"), msg("assistant", "No, 15 = 3 x 5."),
                msg("user", "Is 17 prime?"), msg("assistant", "Yes, 17 is prime.")],
     "rejected": [msg("system", "Answer briefly."), msg("user", "Is 15 prime?"), msg("assistant", "No, 15 = 3 x 5."),
                  msg("user", "Is 17 prime?"), msg("assistant", "No, 17 = 2 x 8.5.")],
     "messages": [msg("user", "Is 17 prime?"), msg("assistant", "Yes, 17 is prime.")],
     "score_chosen": 9.5, "score_rejected": 1.0},
    {"prompt": "What is the capital of Australia?", "prompt_id": "a2",
     "chosen": [msg("user", "What is the capital of Australia?"), msg("assistant", "Canberra.")],
     "rejected": [msg("user", "What is the capital of Australia?"), msg("assistant", "Sydney.")],
     "messages": [msg("user", "What is the capital of Australia?"), msg("assistant", "Canberra.")],
     "score_chosen": 10.0, "score_rejected": 4.0},
]

TLDR_PROMPT = ("SUBREDDIT: r/relationships\n\nTITLE: My roommate keeps eating my food\n\nPOST: We agreed to "
               "label our groceries, but my yogurt keeps disappearing and she denies it.\n\nTL;DR:")
TLDR_ROWS = [
    {"prompt": TLDR_PROMPT, "chosen": " Roommate eats my labelled food and denies it; how do I bring it up?",
     "rejected": " Food."},
    {"prompt": "SUBREDDIT: r/running\n\nTITLE: First half marathon\n\nPOST: Finished in 2:05 after training "
               "for 12 weeks.\n\nTL;DR:",
     "chosen": " Ran my first half marathon in 2:05 after 12 weeks of training.", "rejected": " "},  # dropped
]

# trl-internal-testing/tldr-preference-trl-style: prompt string, conversational chosen/rejected.
TLDR_CONV_ROWS = [
    {"prompt": TLDR_PROMPT,
     "chosen": [msg("user", TLDR_PROMPT), msg("assistant", " Roommate eats my labelled food.")],
     "rejected": [msg("user", TLDR_PROMPT), msg("assistant", " Yogurt.")],
     "choice": 0},
]

PAIRS_ROWS = [
    {"prompt": "The movie was", "chosen": " a delight from start to finish.", "rejected": " a waste of time."},
    {"prompt": None, "chosen": "Great soup.", "rejected": "Cold soup."},
    {"prompt": "Describe the weather.", "chosen": None, "rejected": "Rainy."},  # dropped
]


def round_trips(rows, tmp_path, name):
    """The rows written to Parquet and to JSONL, and read back with pyarrow (as a user's file would be)."""
    parquet, jsonl = tmp_path / f"{name}.parquet", tmp_path / f"{name}.jsonl"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"parquet": pq.read_table(parquet), "jsonl": pj.read_json(jsonl)}


@pytest.fixture(params=["parquet", "jsonl"])
def kind(request):
    return request.param


# --- conversions -----------------------------------------------------------------------------------

def test_formats_listed():
    assert FORMATS == ("hh_rlhf", "ultrafeedback", "tldr_preference", "pairs")


def test_hh_rlhf(tmp_path, kind):
    table = round_trips(HH_ROWS, tmp_path, "hh")[kind]
    assert to_pairs(table, "hh_rlhf") == [
        {"prompt": HH_PROMPT,
         "chosen": " Pinch off the top pair of leaves every week or two, just above a leaf node.",
         "rejected": " Never, basil grows best if you leave it alone."},
        {"prompt": "\n\nHuman: Tell me a joke about cats.\n\nAssistant:",
         "chosen": " Why did the cat sit on the computer? To keep an eye on the mouse.",
         "rejected": " I don't know any jokes."},
    ]


def test_hh_rlhf_answers_sharing_their_first_words():
    """The shared prefix runs into the answers ("I ..."); the prompt still ends at the marker."""
    table = pa.table({"chosen": ["\n\nHuman: Can you help?\n\nAssistant: I can, what do you need?"],
                      "rejected": ["\n\nHuman: Can you help?\n\nAssistant: I cannot."]})
    assert to_pairs(table, "hh_rlhf") == [{"prompt": "\n\nHuman: Can you help?\n\nAssistant:",
                                           "chosen": " I can, what do you need?", "rejected": " I cannot."}]


def test_ultrafeedback_trl_lib(tmp_path, kind):
    table = round_trips(UF_TRL_ROWS, tmp_path, "uf")[kind]
    assert "prompt" not in table.column_names
    assert to_pairs(table, "ultrafeedback") == [
        {"prompt": "User: Name three primary colors.\nAssistant:",
         "chosen": " Red, yellow and blue.", "rejected": " Green, purple and orange."},
        {"prompt": "User: Translate 'thank you' to French.\nAssistant:",
         "chosen": " Merci.", "rejected": " Gracias."},
    ]


def test_ultrafeedback_h4_multi_turn(tmp_path, kind):
    table = round_trips(UF_H4_ROWS, tmp_path, "h4")[kind]
    assert to_pairs(table, "ultrafeedback") == [
        {"prompt": "System: Answer briefly.\nUser: Is 15 prime?\nAssistant: No, 15 = 3 x 5.\n"
                   "User: Is 17 prime?\nAssistant:",
         "chosen": " Yes, 17 is prime.", "rejected": " No, 17 = 2 x 8.5."},
        {"prompt": "User: What is the capital of Australia?\nAssistant:",
         "chosen": " Canberra.", "rejected": " Sydney."},
    ]


def test_ultrafeedback_explicit_prompt_layout():
    """TRL's explicit-prompt layout: chosen/rejected hold only the answer; the prompt column gives the turns."""
    table = pa.Table.from_pylist([{"prompt": "What color is the sky?", "chosen": [msg("assistant", "Blue.")],
                                   "rejected": [msg("assistant", "Green.")]}])
    assert to_pairs(table, "ultrafeedback") == [
        {"prompt": "User: What color is the sky?\nAssistant:", "chosen": " Blue.", "rejected": " Green."}]
    listed = pa.Table.from_pylist([{"prompt": [msg("system", "Be terse."), msg("user", "2+2?")],
                                    "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]}])
    assert to_pairs(listed, "ultrafeedback") == [
        {"prompt": "System: Be terse.\nUser: 2+2?\nAssistant:", "chosen": " 4", "rejected": " 5"}]


class FakeTokenizer:
    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        body = "".join(f"<|{m['role']}|>{m['content']}</s>" for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")


def test_ultrafeedback_with_tokenizer(tmp_path, kind):
    table = round_trips(UF_TRL_ROWS, tmp_path, "uf")[kind]
    tok = FakeTokenizer()
    rows = to_pairs(table, "ultrafeedback", tokenizer=tok)
    assert rows[0] == {"prompt": "<|user|>Name three primary colors.</s><|assistant|>",
                       "chosen": "Red, yellow and blue.", "rejected": "Green, purple and orange."}
    assert tok.calls[0] == ([msg("user", "Name three primary colors.")], False, True)


def test_hh_rlhf_with_tokenizer_is_a_conversation(tmp_path, kind):
    """With a tokenizer an hh-rlhf transcript becomes user/assistant messages (each turn stripped, the
    answer's empty turn left out) rendered by the template; the answers are stripped too."""
    table = round_trips(HH_ROWS, tmp_path, "hh")[kind]
    tok = FakeTokenizer()
    rows = to_pairs(table, "hh_rlhf", tokenizer=tok)
    assert tok.calls[0] == ([msg("user", "What's a good way to keep basil alive indoors?"),
                             msg("assistant", "Give it a sunny windowsill and water it when the top of the soil is dry."),
                             msg("user", "How often should I pinch it back?")], False, True)
    assert rows[1] == {"prompt": "<|user|>Tell me a joke about cats.</s><|assistant|>",
                       "chosen": "Why did the cat sit on the computer? To keep an eye on the mouse.",
                       "rejected": "I don't know any jokes."}
    with pytest.raises(BadInput, match=r"row 0: the transcript does not start with"):
        to_pairs(pa.table({"chosen": ["Intro\n\nHuman: Hi\n\nAssistant: Yes."],
                           "rejected": ["Intro\n\nHuman: Hi\n\nAssistant: No."]}), "hh_rlhf", tokenizer=tok)


def test_real_chat_template():
    """A transformers tokenizer built in place (no download) with a ChatML template."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = to_pairs(pa.Table.from_pylist(UF_TRL_ROWS[:1]), "ultrafeedback", tokenizer=tok)
    assert rows[0]["prompt"] == "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"


def test_tldr_preference(tmp_path, kind):
    table = round_trips(TLDR_ROWS, tmp_path, "tldr")[kind]
    assert to_pairs(table, "tldr_preference") == [
        {"prompt": TLDR_PROMPT, "chosen": " Roommate eats my labelled food and denies it; how do I bring it up?",
         "rejected": " Food."}]


def test_tldr_preference_conversational(tmp_path, kind):
    table = round_trips(TLDR_CONV_ROWS, tmp_path, "tldr_conv")[kind]
    assert to_pairs(table, "tldr_preference") == [
        {"prompt": f"User: {TLDR_PROMPT}\nAssistant:", "chosen": " Roommate eats my labelled food.",
         "rejected": " Yogurt."}]


def test_pairs(tmp_path, kind):
    table = round_trips(PAIRS_ROWS, tmp_path, "pairs")[kind]
    assert to_pairs(table, "pairs") == [
        {"prompt": "The movie was", "chosen": " a delight from start to finish.", "rejected": " a waste of time."},
        {"prompt": "", "chosen": "Great soup.", "rejected": "Cold soup."},
    ]


def test_render_prompt_plain():
    assert render_prompt([msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Name a fruit.")]) == \
        "User: Hi\nAssistant: Hello!\nUser: Name a fruit.\nAssistant:"


def test_empty_table():
    empty = pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                      "rejected": pa.array([], pa.string())})
    assert all(to_pairs(empty, fmt) == [] for fmt in ("hh_rlhf", "tldr_preference", "pairs"))


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, rows, col", [
    ("hh_rlhf", [{"chosen": "\n\nHuman: a\n\nAssistant: b"}], "rejected"),
    ("ultrafeedback", [{"rejected": [msg("user", "a"), msg("assistant", "b")]}], "chosen"),
    ("tldr_preference", [{"chosen": "a", "rejected": "b"}], "prompt"),
    ("pairs", [{"prompt": "p", "chosen": "a"}], "rejected"),
])
def test_missing_column(fmt, rows, col):
    with pytest.raises(BadInput) as e:
        to_pairs(pa.Table.from_pylist(rows), fmt, source="prefs.parquet")
    assert str(e.value) == f"prefs.parquet: format '{fmt}' needs column '{col}'"


def test_ultrafeedback_strings_without_prompt_column():
    with pytest.raises(BadInput, match="format 'ultrafeedback' needs column 'prompt'"):
        to_pairs(pa.table({"chosen": ["a"], "rejected": ["b"]}), "ultrafeedback")


def test_unknown_format():
    with pytest.raises(BadInput) as e:
        to_pairs(pa.table({"chosen": ["a"]}), "shp", source="x.jsonl")
    assert str(e.value) == ("x.jsonl: unknown preference format 'shp' "
                            "(known formats: hh_rlhf, ultrafeedback, tldr_preference, pairs)")


def test_hh_diverging_before_last_assistant_turn():
    good = HH_ROWS[0]
    diverged = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Name a fruit.\n\nAssistant: No."}
    with pytest.raises(BadInput, match=r"^hh\.jsonl: row 1: 'chosen' and 'rejected' diverge before the last"):
        to_pairs(pa.Table.from_pylist([good, diverged]), "hh_rlhf", source="hh.jsonl")


def test_hh_no_shared_assistant_marker():
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello!"}]
    with pytest.raises(BadInput, match=r"^data: row 0: 'chosen' and 'rejected' share no prefix ending with"):
        to_pairs(pa.Table.from_pylist(rows), "hh_rlhf")
    with pytest.raises(BadInput, match="row 0: .* share no prefix"):
        to_pairs(pa.table({"chosen": ["just text"], "rejected": ["just text too"]}), "hh_rlhf")


def test_conversation_errors():
    differ = [{"chosen": [msg("user", "Is 7 prime?"), msg("assistant", "Yes.")],
               "rejected": [msg("user", "Is 9 prime?"), msg("assistant", "No.")]}]
    with pytest.raises(BadInput, match="row 0: 'chosen' and 'rejected' differ before the final assistant message"):
        to_pairs(pa.Table.from_pylist(differ), "ultrafeedback")
    not_assistant = [{"chosen": [msg("user", "Hi")], "rejected": [msg("user", "Hi")]}]
    with pytest.raises(BadInput, match="row 0: 'chosen' must end with an assistant message"):
        to_pairs(pa.Table.from_pylist(not_assistant), "ultrafeedback")
    no_prompt = [{"chosen": [msg("assistant", "Blue.")], "rejected": [msg("assistant", "Green.")]}]
    with pytest.raises(BadInput, match="row 0: no prompt"):
        to_pairs(pa.Table.from_pylist(no_prompt), "ultrafeedback")


def test_wrong_column_types():
    with pytest.raises(BadInput, match="column 'chosen' must hold strings, it holds int64"):
        to_pairs(pa.table({"prompt": ["p"], "chosen": [1], "rejected": ["r"]}), "pairs")
    with pytest.raises(BadInput, match="column 'rejected' must hold strings"):
        to_pairs(pa.Table.from_pylist([{"chosen": "a", "rejected": [msg("assistant", "b")]}]), "hh_rlhf")
    with pytest.raises(BadInput, match="'chosen' and 'rejected' must both hold strings or both hold lists"):
        to_pairs(pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": [msg("assistant", "b")]}]),
                 "tldr_preference")


def test_chat_template_failure_is_bad_input():
    class Strict:
        def apply_chat_template(self, messages, **kw):
            raise ValueError("System role not supported")

    rows = [{"chosen": [msg("system", "s"), msg("user", "u"), msg("assistant", "a")],
             "rejected": [msg("system", "s"), msg("user", "u"), msg("assistant", "b")]}]
    with pytest.raises(BadInput, match="row 0: the tokenizer's chat template failed.*System role not supported"):
        to_pairs(pa.Table.from_pylist(rows), "ultrafeedback", tokenizer=Strict())
