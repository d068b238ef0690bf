"""Loading sources into canonical rows: file:line problems, every file kind, dataset folders, mixtures."""

import json
import os
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toolkit.data.loading import DataSource, check_file, load_mixture, load_source, mixture_counts
from toolkit.errors import DataError


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow caches go under the test's folder, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, rows):
    """Rows are dicts (one JSON line each) or raw strings written as they are."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


BAD_JSONL = [
    chat("hi", "hello"),  # 1
    "",  # 2: blank lines are skipped
    "   ",  # 3
    '{"messages": [}',  # 4: malformed
    {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},  # 5
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},  # 6
    "[1, 2]",  # 7
    chat("fine", "too"),  # 8
    {"messages": [{"role": "user", "content": "hi"}]},  # 9
]
BAD_JSONL_PROBLEMS = [
    ":4: malformed JSON: Expecting value (column 15)",
    ":5: messages[1].role is 'bot'; expected one of system, user, assistant",
    ":6: messages[0] has no 'content'",
    ":7: a line holds a list; expected one JSON object per line",
    ":9: 'messages' ends with a user message; SFT needs the assistant's answer last",
]


def test_check_file_reports_every_problem_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_JSONL)
    assert check_file(path) == [path + p for p in BAD_JSONL_PROBLEMS]
    assert check_file(path, kind="messages") == [path + p for p in BAD_JSONL_PROBLEMS]


def test_load_source_refuses_bad_rows_listing_them_all(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_JSONL)
    with pytest.raises(DataError) as info:
        load_source(DataSource(path), "messages")
    assert str(info.value).splitlines() == [path + p for p in BAD_JSONL_PROBLEMS]


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"^{missing}: no such file or folder$"):
        load_source(DataSource(missing), "text")
    assert check_file(missing) == [f"{missing}: no such file or folder"]


def test_clean_file_loads_as_canonical_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add.", "input": "2+3", "output": "5"},
            "",
            {"instruction": "Hi.", "output": "Hello."},
        ],
    )
    assert check_file(path) == []
    ds = load_source(DataSource(path), "messages")
    assert ds.column_names == ["messages"]
    assert ds.to_list() == [
        {"messages": [{"role": "user", "content": "Add.\n\n2+3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
    ]


def test_format_that_does_not_feed_the_kind(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [chat("hi", "hello")])
    problems = check_file(path, kind="text")
    assert problems == [
        f"{path}:1: rows in the messages format feed kind 'messages', not 'text'; kind 'text' takes the formats text (text)"
    ]
    with pytest.raises(DataError, match="not 'preference'"):
        load_source(DataSource(path, format="messages"), "preference")


def test_undetectable_columns_suggest_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "response": "r"}])
    [problem] = check_file(path)
    assert problem.startswith(
        f"{path}:1: cannot tell the format from the columns question, response; expected"
    )
    assert "alpaca (instruction)" in problem


def test_preference_rows_may_mix_strings_and_message_lists(tmp_path):
    # pyarrow alone cannot read this file: `prompt` is a string in one row and a list in the other.
    path = write_jsonl(
        tmp_path / "dpo.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {
                "prompt": [{"role": "user", "content": "3+3?"}],
                "chosen": "6",
                "rejected": [{"role": "assistant", "content": "7"}],
            },
        ],
    )
    rows = load_source(DataSource(path), "preference").to_list()
    assert rows[1] == {
        "prompt": [{"role": "user", "content": "3+3?"}],
        "chosen": [{"role": "assistant", "content": "6"}],
        "rejected": [{"role": "assistant", "content": "7"}],
    }


def test_json_array_rows_are_named_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": ""},\n\n  {\n    "text": 3\n  }\n]\n')
    assert check_file(str(path)) == [
        f"{path}:3: 'text' is empty",
        f"{path}:5: 'text' is a number; expected a string",
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "one"},\n  {"text": }\n]\n')
    assert check_file(str(broken)) == [f"{broken}:3: malformed JSON: Expecting value (column 12)"]


def test_json_lines_under_a_json_name(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", [{"text": "a"}, {"text": "b"}])
    assert load_source(DataSource(path), "text")["text"] == ["a", "b"]


def test_csv_lines_count_the_header_and_multiline_cells(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text(
        'instruction,input,output\nSay hi.,,Hi!\n"Two\nlines",x,\nCount.,,007\n', encoding="utf-8"
    )
    assert check_file(str(path)) == [f"{path}:3: 'output' is empty"]
    path.write_text(
        'instruction,input,output\nSay hi.,,Hi!\n"Two\nlines",x,y\nCount.,,007\n', encoding="utf-8"
    )
    rows = load_source(DataSource(str(path)), "messages")["messages"]
    assert rows[2][1] == {"role": "assistant", "content": "007"}  # cells stay strings


def test_undecodable_lines_and_surplus_cells(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok"}\n')
    assert check_file(str(jsonl)) == [
        f"{jsonl}:2: not UTF-8 text (invalid continuation byte at byte 13 of the line)"
    ]
    table = tmp_path / "rows.csv"
    table.write_text("text\nfine\ntoo,many\n", encoding="utf-8")
    assert check_file(str(table)) == [f"{table}:3: 2 cells; the header has 1"]


def test_txt_lines_are_text_rows(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond 🙂 line\n", encoding="utf-8")
    assert load_source(DataSource(str(path)), "text").to_list() == [
        {"text": "first line"},
        {"text": "second 🙂 line"},
    ]
    with pytest.raises(DataError, match="a .txt file holds plain text"):
        load_source(DataSource(str(path), format="alpaca"), "messages")


def test_parquet_rows_are_named_by_index(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a", "", "c"]}), path)
    assert check_file(str(path)) == [f"{path}: row 1: 'text' is empty"]


def test_column_renames_and_extra_columns_for_rl_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl", [{"question": "6*7?", "answer": "42"}, {"question": "1+1?", "answer": "2"}]
    )
    source = DataSource.from_dict({"path": path, "columns": {"question": "prompt"}}, "data.sources[0]")
    assert load_source(source, "prompt").to_list()[0] == {
        "prompt": [{"role": "user", "content": "6*7?"}],
        "answer": "42",
    }


def test_extra_columns_keep_one_type(tmp_path):
    path = write_jsonl(
        tmp_path / "rl.jsonl",
        [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": None}, {"prompt": "c", "answer": "x"}],
    )
    assert check_file(path) == [
        f"{path}:3: 'answer' is a string here but an integer at {path}:1; a column holds one type"
    ]


def test_max_rows_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(10)] + ['{"text": '])
    assert load_source(DataSource(path, max_rows=3), "text")["text"] == ["0", "1", "2"]


def test_where_keeps_the_rows_of_a_family_and_max_rows_counts_those(tmp_path):
    rows = [{"text": str(i), "task": ["a", "b", "c"][i % 3]} for i in range(12)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert load_source(DataSource(path, where={"task": "b"}), "text")["text"] == ["1", "4", "7", "10"]
    assert load_source(DataSource(path, where={"task": ["a", "c"]}, max_rows=3), "text")["text"] == [
        "0",
        "2",
        "3",
    ]
    renamed = DataSource(path, columns={"task": "family"}, where={"family": "c"})
    assert load_source(renamed, "text")["text"] == ["2", "5", "8", "11"]
    with pytest.raises(DataError, match=r"where is 'b'; expected a mapping from column"):
        DataSource.from_dict({"path": path, "where": "b"}, "data.sources[0]")


def test_an_edited_file_is_read_again(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "old"}])
    assert load_source(DataSource(path), "text")["text"] == ["old"]
    write_jsonl(tmp_path / "t.jsonl", [{"text": "new"}, {"text": "rows"}])
    os.utime(path, ns=(0, 10**18))  # a different mtime even on coarse clocks
    assert load_source(DataSource(path), "text")["text"] == ["new", "rows"]


def test_saved_dataset_folder_is_loaded_like_a_hub_dataset(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [chat("hi", "hello"), {"messages": [{"role": "user", "content": "x"}]}]
            ),
            "test": datasets.Dataset.from_list(
                [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
            ),
        }
    ).save_to_disk(folder)
    test = load_source(DataSource(str(folder), split="test"), "messages")
    assert test.to_list() == [chat("q", "a")]
    assert check_file(str(folder)) == [
        f"{folder}[train] row 1: 'messages' ends with a user message; SFT needs the assistant's answer last"
    ]
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_source(DataSource(str(folder), split="validation"), "messages")


def test_folder_of_jsonl_files_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "hub_style"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(folder / "test.jsonl", [{"text": "c"}])
    assert load_source(DataSource(str(folder)), "text")["text"] == ["a", "b"]
    assert load_source(DataSource(str(folder), split="test"), "text")["text"] == ["c"]


def test_data_source_from_dict_names_the_bad_key():
    source = DataSource.from_dict({"path": "a.jsonl", "weight": 2, "max_rows": 5}, "data.sources[0]")
    assert (source.weight, source.max_rows, source.format) == (2, 5, "auto")
    with pytest.raises(
        DataError, match=r"^unknown key 'wieght' in data.sources\[1\] \(did you mean 'weight'\?\)$"
    ):
        DataSource.from_dict({"path": "a.jsonl", "wieght": 2}, "data.sources[1]")
    with pytest.raises(DataError, match=r"^data.sources\[0\].weight is -1; expected a positive number$"):
        DataSource.from_dict({"path": "a.jsonl", "weight": -1}, "data.sources[0]")
    with pytest.raises(DataError, match=r"format is 'sharegtp'; .* \(did you mean 'sharegpt'\?\)$"):
        DataSource.from_dict({"path": "a.jsonl", "format": "sharegtp"}, "data.sources[0]")
    with pytest.raises(DataError, match="missing 'path'"):
        DataSource.from_dict({"weight": 1}, "data.sources[0]")


def test_mixture_counts_are_exact_shares():
    assert mixture_counts([3, 1], 400) == [300, 100]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]  # largest remainder, ties to the first
    assert mixture_counts([0.5, 0.25, 0.25], 7) == [3, 2, 2]  # exact 3.5, 1.75, 1.75


def _sources(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(300)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(100)])
    return big, small


def test_mixture_respects_weights_and_is_deterministic(tmp_path):
    big, small = _sources(tmp_path)
    sources = [DataSource(big, weight=1), DataSource(small, weight=1)]
    mixed = load_mixture(sources, "text", seed=3)
    assert len(mixed) == 400  # the sources' total
    origins = Counter(text.split()[0] for text in mixed["text"])
    assert origins == {"big": 200, "small": 200}
    # The small source is repeated: every row twice. The big one is subsampled without repetition.
    assert set(Counter(t for t in mixed["text"] if t.startswith("small")).values()) == {2}
    assert max(Counter(t for t in mixed["text"] if t.startswith("big")).values()) == 1
    # Shuffled: the first hundred rows are not all from one source, but close to half and half.
    assert 30 < sum(t.startswith("big") for t in mixed["text"][:100]) < 70
    assert load_mixture(sources, "text", seed=3)["text"] == mixed["text"]
    assert load_mixture(sources, "text", seed=4)["text"] != mixed["text"]


def test_mixture_size_and_uneven_weights(tmp_path):
    big, small = _sources(tmp_path)
    mixed = load_mixture(
        [DataSource(big, weight=0.9), DataSource(small, weight=0.1)], "text", seed=0, size=50
    )
    assert Counter(text.split()[0] for text in mixed["text"]) == {"big": 45, "small": 5}


def test_prompt_mixture_aligns_extra_columns(tmp_path):
    math_rows = write_jsonl(tmp_path / "math.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    task_rows = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "Name a colour.", "task": "colour"}])
    mixed = load_mixture([DataSource(math_rows), DataSource(task_rows)], "prompt")
    assert mixed.column_names == ["prompt", "answer", "task"]
    assert sorted(mixed.to_list(), key=lambda r: r["prompt"][0]["content"]) == [
        {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "task": None},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": None, "task": "colour"},
    ]
