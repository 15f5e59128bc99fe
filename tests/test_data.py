import json
import os

import pytest
from datasets import Dataset, DatasetDict

from gradprune_deploy.data import IGNORE_INDEX, CompletionCollator, Example, data_name, encode_prompt, read_examples, tokenize_examples
from gradprune_deploy.errors import DataError
from tests.conftest import SHARED_DATA

ROWS = [
    {"id": "a", "prompt": "Is water wet?", "completion": "yes", "choices": ["yes", "no"]},
    {"id": "b", "prompt": "Is fire cold?", "completion": "no", "choices": ["yes", "no"]},
]


def test_jsonl_csv_split_folder_and_datasets_dir_agree(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (tmp_path / "rows.csv").write_text("prompt,completion,choices\nIs water wet?,yes,yes|no\nIs fire cold?,no,yes|no\n")
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "hfds"))
    expected = [(r["prompt"], r["completion"], tuple(r["choices"])) for r in ROWS]
    for source in (tmp_path / "train.jsonl", tmp_path, tmp_path / "rows.csv", tmp_path / "hfds"):
        assert [(e.prompt, e.completion, e.choices) for e in read_examples(source)] == expected, source


def test_bundled_gsm8k_has_fixed_disjoint_splits():
    train, test = read_examples("bundled:gsm8k"), read_examples("bundled:gsm8k", split="test")
    assert len(train) == 1000 and len(test) == 319
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert "####" in train[0].completion


def test_shared_task_reads_choices():
    rows = read_examples(SHARED_DATA / "pubmedqa", split="test", limit=3)
    assert len(rows) == 3 and set(rows[0].choices) == {"yes", "no", "maybe"}


def test_loss_only_on_completion_tokens_with_chat_template(tokenizer):
    example = Example(prompt="Is water wet?", completion="yes")
    (feature,) = tokenize_examples([example], tokenizer, max_length=128)
    n_prompt = len(encode_prompt(tokenizer, example.prompt))
    assert feature["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    completion = tokenizer.decode(feature["input_ids"][n_prompt:])
    assert completion.startswith("yes") and "<|im_end|>" in completion  # the turn's end is learned too
    assert feature["labels"][n_prompt:] == feature["input_ids"][n_prompt:]


def test_without_chat_template_appends_eos(tokenizer):
    (feature,) = tokenize_examples([Example("Q: 2+2?\nA:", " 4")], tokenizer, max_length=64, chat_template=False)
    assert feature["input_ids"][-1] == tokenizer.eos_token_id and feature["labels"][-1] == tokenizer.eos_token_id


def test_long_prompts_dropped_and_completions_truncated(tokenizer):
    long = Example(prompt="word " * 200, completion="yes")
    short = Example(prompt="hi", completion="a b c d e f g h i j k l m n o p " * 10)
    features = tokenize_examples([long, short], tokenizer, max_length=64)
    assert len(features) == 1 and len(features[0]["input_ids"]) == 64
    with pytest.raises(DataError, match="raise --max-length"):
        tokenize_examples([long], tokenizer, max_length=64)


def test_collator_pads_and_masks():
    batch = CompletionCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    "text, message", [("", "no rows"), ('{"prompt": "x"}\n', "no completion"), ("[1, 2]\n", "JSON object"), ("{oops\n", "not valid JSON")]
)
def test_bad_data(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_malformed_rows_are_one_line_data_errors(tmp_path):
    cases = {
        "choices.jsonl": ('{"prompt": "a", "completion": "b", "choices": 5}\n', "`choices` must be a list of strings"),
        "choices2.jsonl": ('{"prompt": "a", "completion": "b", "choices": ["b", 3]}\n', "`choices` must be a list of strings"),
        "columns.csv": ("question,answer\nq,a\n", "no prompt or completion column"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            read_examples(tmp_path / name)
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(tmp_path / "binary.jsonl")


def test_data_name_is_the_short_name_eval_files_use():
    """One rule (eval's result files; the model card builds its display name on it)."""
    assert data_name("bundled:gsm8k") == "gsm8k"
    assert data_name(SHARED_DATA / "sst2") == "sst2"
    assert data_name(SHARED_DATA / "sst2" / "test.jsonl") == "sst2"  # a file named for a split: its folder
    assert data_name("my data/headlines.csv") == "headlines"


def test_a_byte_order_mark_is_read_as_one(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: it must not become part of the first column's name."""
    expected = [(r["prompt"], r["completion"], tuple(r["choices"])) for r in ROWS]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,completion,choices\r\nIs water wet?,yes,yes|no\r\nIs fire cold?,no,yes|no\r\n")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    for name in ("bom.csv", "bom.jsonl"):
        assert [(e.prompt, e.completion, e.choices) for e in read_examples(tmp_path / name)] == expected, name


def test_prompt_only_rows_are_read_where_only_prompts_are_needed(tmp_path):
    """bench --prompts takes rows with a prompt alone (its help says so); training data still needs completions."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Tell me a story."}\n{"prompt": "Why?", "completion": "Because."}\n')
    (tmp_path / "prompts.csv").write_text("prompt\nTell me a story.\nWhy?\n")
    for name in ("prompts.jsonl", "prompts.csv"):
        rows = read_examples(tmp_path / name, prompts_only=True)
        assert [e.prompt for e in rows] == ["Tell me a story.", "Why?"], name
        with pytest.raises(DataError, match="row 1 has no completion"):
            read_examples(tmp_path / name)


def test_a_fifo_or_device_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    for source in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match="not a regular file"):
            read_examples(source)
