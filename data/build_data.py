"""Rebuild the datasets shipped in data/, byte for byte.

    python data/build_data.py                # task datasets: sft/, thoughts/, preference/, rl/, eval/
    python data/build_data.py --debs DIR     # also corpus/, from the Debian packages in DIR

The task datasets come from `toolkit/data/tasks.py` with fixed seeds. The corpus needs the two Debian
packages named in `SOURCES`; fetch them with

    apt-get download python3.11-doc=3.11.2-6+deb12u9 jargon-text=4.4.7-4.1

Pure standard library: a .deb is an `ar` archive holding `data.tar.xz`, which `tarfile` reads. `tasks.py` is
loaded by path, so the script runs without installing the toolkit or its heavy dependencies.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import random
import re
import sys
import tarfile
from pathlib import Path

DATA = Path(__file__).resolve().parent
TASKS_PY = DATA.parent / "toolkit" / "data" / "tasks.py"


def _load_tasks():
    spec = importlib.util.spec_from_file_location("forge_tasks", TASKS_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tasks = _load_tasks()


def _load_thoughts():
    # thoughts.py reads the task families from toolkit.data.tasks: the module loaded above stands in for it.
    sys.modules.setdefault("toolkit.data.tasks", tasks)
    spec = importlib.util.spec_from_file_location("forge_thoughts", TASKS_PY.parent / "thoughts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


thoughts = _load_thoughts()

# One seed per file, so growing one file never changes another.
SEEDS = {
    "sft": 1,
    "preference": 2,
    "rl": 3,
    "alpaca": 4,
    "sharegpt": 5,
    "corpus_facts": 6,
    "facts": 7,
    "tools": 8,
    "perspectives": 9,
    "unpaired": 10,
    "thoughts": 11,
    "eval": 1000,
}
SIZES = {
    "sft": 3000,
    "preference": 1500,
    "unpaired": 1000,
    "rl": 1000,
    "alpaca": 20,
    "sharegpt": 25,
    "eval": 300,
}

# package -> (version, sha256 of the .deb). Another version still builds, with a slightly different corpus.
SOURCES = {
    "python3.11-doc": (
        "3.11.2-6+deb12u9",
        "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
    ),
    "jargon-text": ("4.4.7-4.1", "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),
}
PYTHON_DOCS = "./usr/share/doc/python3.11/html/_sources/"
# Prose-heavy parts of the Python documentation; the C API, distutils and changelogs are mostly names.
PYTHON_DOC_PARTS = ("tutorial/", "faq/", "howto/", "reference/", "glossary", "using/", "library/")
PYTHON_DOCS_BUDGET = 2_000_000  # characters; library/ pages are taken in sorted order until this is met
JARGON = "./usr/share/doc/jargon-text/jargon.txt.gz"
FACT_SHARE = 0.15  # share of the corpus given to task statements, so pretraining sees the task domain
VALID_EVERY = 20  # one document in 20 goes to valid.jsonl
# corpus/facts.jsonl: statements only, for recipes that weight the task domain up in pretraining (a small model
# learns to copy digits and words from its context much sooner on this than on prose).
FACTS_BUDGET = 800_000  # characters
# corpus/tools.jsonl and corpus/perspectives.jsonl: task problems written with the markup tokens a recipe adds
# to its tokenizer (`<tool>`, `<perspective>`; see recipes/codette-pretrain.yaml), one source each in a mixture.
MARKUP_BUDGET = 300_000  # characters per file


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(DATA)}: {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB")


# --- task datasets --------------------------------------------------------------------------------------

SYSTEM = "You answer with the result only."


def build_task_files() -> list[dict]:
    """Write sft/, preference/, rl/ and eval/; return the rows whose statements go into the corpus."""
    rng = random.Random(0)
    sft = tasks.make_examples(SIZES["sft"], SEEDS["sft"])
    write_jsonl(
        DATA / "sft" / "train.jsonl",
        [{"messages": _chat(r["prompt"], r["answer"]), "task": r["task"]} for r in sft],
    )

    alpaca = tasks.make_examples(SIZES["alpaca"], SEEDS["alpaca"])
    write_jsonl(DATA / "sft" / "alpaca_sample.jsonl", [_alpaca(r) for r in alpaca])

    sharegpt = tasks.make_examples(SIZES["sharegpt"], SEEDS["sharegpt"])
    write_jsonl(DATA / "sft" / "sharegpt_sample.jsonl", _sharegpt(sharegpt))

    preference = tasks.make_examples(SIZES["preference"], SEEDS["preference"])
    write_jsonl(
        DATA / "preference" / "train.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["answer"]}],
                "rejected": [{"role": "assistant", "content": tasks.wrong_answer(r, rng)}],
                "task": r["task"],
            }
            for r in preference
        ],
    )

    # Unpaired (KTO): each prompt has one answer, right or wrong with equal chance, and a label saying which.
    unpaired = tasks.make_examples(SIZES["unpaired"], SEEDS["unpaired"])
    labels = random.Random(SEEDS["unpaired"])
    unpaired_rows = []
    for r in unpaired:
        good = labels.random() < 0.5
        answer = r["answer"] if good else tasks.wrong_answer(r, labels)
        unpaired_rows.append(
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": answer}],
                "label": good,
                "task": r["task"],
            }
        )
    write_jsonl(DATA / "preference" / "unpaired.jsonl", unpaired_rows)

    # The SFT problems again, each answer with a reasoning trace in the thought-token format.
    write_jsonl(DATA / "thoughts" / "train.jsonl", thoughts.make_traces(sft, SEEDS["thoughts"]))

    # RL prompts are problems the SFT set does not hold. An RL stage starts from an SFT model, and on a problem
    # it was trained on its sampled answers mostly all score alike: no reward variance, nothing to learn, and a
    # training reward that measures recall. Held-out gains come from problems it has to solve.
    rl = tasks.make_examples(SIZES["rl"], SEEDS["rl"], exclude={_problem(r) for r in sft})
    write_jsonl(
        DATA / "rl" / "prompts.jsonl",
        [
            {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"], "task": r["task"]}
            for r in rl
        ],
    )

    facts = corpus_fact_rows()
    train = sft + alpaca + sharegpt + preference + unpaired + rl + facts
    heldout = tasks.make_examples(SIZES["eval"], SEEDS["eval"], split="heldout")
    # Disjoint by construction (held-out problems are never drawn for training); checked here all the same,
    # on the exact prompts and on the problems behind them.
    seen = {r["prompt"] for r in train} | {_problem(r) for r in train}
    leaked = [r["prompt"] for r in heldout if r["prompt"] in seen or _problem(r) in seen]
    if leaked:
        raise SystemExit(f"held-out prompts also in training data: {leaked[:5]}")
    write_jsonl(DATA / "eval" / "heldout.jsonl", heldout)
    return facts


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _problem(row: dict) -> str:
    return tasks.problem_key(row["task"], tasks.parse_prompt(row["task"], row["prompt"]))


def _alpaca(row: dict) -> dict:
    # Copy rows show the `input` field in use: the instruction says what to do, the input is the material.
    if row["task"] == "copy":
        text = tasks.parse_prompt("copy", row["prompt"])["text"]
        return {"instruction": "Repeat the input exactly.", "input": text, "output": row["answer"]}
    return {"instruction": row["prompt"], "input": "", "output": row["answer"]}


def _sharegpt(rows: list[dict]) -> list[dict]:
    # Every third conversation opens with a system turn and every fourth has two exchanges, so the sample
    # shows each shape the format allows.
    conversations = []
    i = 0
    while i < len(rows):
        turns = [{"from": "system", "value": SYSTEM}] if len(conversations) % 3 == 0 else []
        for row in rows[i : i + (2 if len(conversations) % 4 == 3 else 1)]:
            turns += [{"from": "human", "value": row["prompt"]}, {"from": "gpt", "value": row["answer"]}]
        i += 2 if len(conversations) % 4 == 3 else 1
        conversations.append({"conversations": turns})
    return conversations


# --- corpus: task statements ----------------------------------------------------------------------------

FACT_BATCHES = 40  # make_examples calls of 600 rows each (prompts are distinct within a call only)


def corpus_fact_rows(seed: int = SEEDS["corpus_facts"]) -> list[dict]:
    rows = []
    for batch in range(FACT_BATCHES):
        rows += tasks.make_examples(600, seed * 1000 + batch)
    return rows


def fact_documents(rows: list[dict], budget: int, seed: int = SEEDS["corpus_facts"]) -> list[str]:
    """Paragraphs of 8 to 30 statements from one family each, until `budget` characters."""
    rng = random.Random(seed)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    queues = {name: iter(group) for name, group in sorted(by_task.items())}
    documents, size = [], 0
    while size < budget:
        name = rng.choice(sorted(queues))
        sentences = [tasks.statement(row, rng) for row in itertools.islice(queues[name], rng.randint(8, 30))]
        if not sentences:
            raise SystemExit(f"not enough {name} statements for a corpus share of {FACT_SHARE}")
        documents.append(" ".join(sentences))
        size += len(documents[-1])
    return documents


# --- corpus: markup documents --------------------------------------------------------------------------


def tool_documents(seed: int = SEEDS["tools"], budget: int = MARKUP_BUDGET) -> list[str]:
    """Requests followed by the call that answers them, inside `<tool>...</tool>`, 4 to 12 per document."""
    rng = random.Random(seed)
    rows = iter(tasks.make_examples(4000, seed, tasks=["tool_call"]))
    documents, size = [], 0
    while size < budget:
        calls = [
            f"{r['prompt']} <tool>{r['answer']}</tool>" for r in itertools.islice(rows, rng.randint(4, 12))
        ]
        if not calls:
            raise SystemExit("not enough tool_call problems for corpus/tools.jsonl")
        documents.append("\n".join(calls))
        size += len(documents[-1])
    return documents


def perspective_documents(seed: int = SEEDS["perspectives"], budget: int = MARKUP_BUDGET) -> list[str]:
    """Each problem seen twice: stated as a fact, then asked and answered, each part opened by a
    `<perspective>` tag; 3 to 8 problems of one family per document."""
    rng = random.Random(seed)
    names = [name for name in tasks.TASKS if name != "tool_call"]
    queues = {
        name: iter(tasks.make_examples(900, seed * 100 + i, tasks=[name])) for i, name in enumerate(names)
    }
    documents, size = [], 0
    while size < budget:
        name = rng.choice(names)
        parts = [
            f"<perspective>fact</perspective> {tasks.statement(r, rng)} "
            f"<perspective>question</perspective> {r['prompt']} {r['answer']}"
            for r in itertools.islice(queues[name], rng.randint(3, 8))
        ]
        if not parts:
            raise SystemExit(f"not enough {name} problems for corpus/perspectives.jsonl")
        documents.append("\n".join(parts))
        size += len(documents[-1])
    return documents


# --- corpus: Debian packages ----------------------------------------------------------------------------


def deb_files(path: Path) -> dict[str, bytes]:
    """Member name -> bytes of a .deb's data.tar.xz (an `ar` archive: 8-byte magic, 60-byte headers)."""
    blob = path.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise SystemExit(f"{path}: not a .deb (no ar header)")
    offset = 8
    while offset < len(blob):
        name = blob[offset : offset + 16].decode().strip().rstrip("/")
        size = int(blob[offset + 48 : offset + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[offset + 60 : offset + 60 + size])) as tar:
                return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        offset += 60 + size + size % 2  # members are 2-byte aligned
    raise SystemExit(f"{path}: no data.tar member")


def find_deb(debs: Path, package: str) -> Path:
    version, sha256 = SOURCES[package]
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise SystemExit(
            f"{debs}: no {package}_*.deb; fetch it with: apt-get download {package}={version}"
            " (see data/corpus/README.md)"
        )
    if hashlib.sha256(found[-1].read_bytes()).hexdigest() != sha256:
        print(
            f"warning: {found[-1].name} is not {package} {version}; the corpus will differ from the shipped one"
        )
    return found[-1]


# Typographic characters folded to ASCII: fewer rare symbols for a small byte-level vocabulary.
ASCII_FOLD = str.maketrans(
    {"‘": "'", "’": "'", "“": '"', "”": '"', "—": " - ", "–": "-", "…": "...", "\u00a0": " ", "·": ""}
)


def tidy(text: str) -> str:
    return " ".join(text.translate(ASCII_FOLD).split())


def is_prose(paragraph: str) -> bool:
    # Tables, signatures and leftovers of markup are mostly symbols; prose is mostly letters and spaces.
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return len(paragraph.split()) >= 3 and letters >= 0.8 * len(paragraph)


def chunk(paragraphs: list[str], target: int = 1500, limit: int = 4000) -> list[str]:
    """Group consecutive paragraphs into documents of about `target` characters (at most `limit`)."""
    documents, current = [], []
    for paragraph in paragraphs:
        if current and len("\n\n".join(current + [paragraph])) > limit:
            documents.append("\n\n".join(current))
            current = []
        current.append(paragraph[:limit])
        if len("\n\n".join(current)) >= target:
            documents.append("\n\n".join(current))
            current = []
    if current:
        documents.append("\n\n".join(current))
    return [d for d in documents if len(d) >= 200]


# reStructuredText: directives whose body is prose keep the body; every other directive, comment and literal
# block is dropped whole.
PROSE_DIRECTIVES = {
    "note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "important", "tip",
    "attention", "caution", "hint", "impl-detail", "admonition", "glossary", "function", "method", "class",
    "attribute", "data", "exception", "decorator", "describe", "classmethod", "staticmethod", "module",
}  # fmt: skip
DIRECTIVE = re.compile(r"^(\s*)\.\.(?:\s+([\w:-]+)::|\s|$)")
ADORNMENT = re.compile(r"""^\s*([=\-~^"'`#*+<>_.:])\1{2,}\s*$""")
SIMPLE_TABLE = re.compile(r"^\s*=+( +=+)+\s*$")
BULLET = re.compile(r"^(\s*)([*+-]|#\.|\d+\.)\s+")
INLINE = [
    (re.compile(r":[\w:-]+:`~(?:[^`<]*\.)?([^`<.]+)`"), r"\1"),  # :func:`~os.path.join` -> join
    (re.compile(r":[\w:-]+:`!?([^`<]+?)`"), r"\1"),  # :func:`os.path.join` -> os.path.join
    (re.compile(r":[\w:-]+:`([^`<]+?)\s*<[^`]*>`"), r"\1"),  # :ref:`title <target>` -> title
    (re.compile(r"`([^`<]+?)\s*<[^`]*>`_{1,2}"), r"\1"),  # `text <url>`_ -> text
    (re.compile(r"``(.+?)``"), r"\1"),
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),
    (re.compile(r"(?<=[A-Za-z0-9])_(?=[\s.,;:)]|$)"), ""),  # named references: pyblake2_ -> pyblake2
    (re.compile(r"\s*\[(?:#\w*|\d+)\]_"), ""),  # footnote references
    (re.compile(r"\*\*(\S.*?)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*(?![\s*])([^*]+?)(?<!\s)\*(?![\w*])"), r"\1"),
    (re.compile(r"\|(release|version)\|"), "3.11"),
    (re.compile(r"\\ ?"), ""),
]


def rst_paragraphs(text: str) -> list[str]:
    """The prose of a reST page, one string per paragraph, markup removed."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_deeper_than: int | None = None  # inside a dropped block: skip lines indented past this

    def flush() -> None:
        nonlocal skip_deeper_than
        if current:
            joined = " ".join(current)
            if joined.endswith("::"):  # "For example::" introduces a literal block
                skip_deeper_than = indent_of_first
                joined = joined[:-2].rstrip() + (":" if not joined[:-2].endswith(" ") else "")
            for pattern, replacement in INLINE:
                joined = pattern.sub(replacement, joined)
            joined = tidy(joined)
            if joined and not joined.startswith(">>>") and is_prose(joined):
                paragraphs.append(joined)
            current.clear()

    indent_of_first = text_indent = 0
    in_table = False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if SIMPLE_TABLE.match(line):  # a table runs from its top border to a border followed by a blank line
            flush()
            in_table = not (in_table and (i + 1 == len(lines) or not lines[i + 1].strip()))
            continue
        if in_table:
            continue
        if not line.strip() or ADORNMENT.match(line) or line.lstrip().startswith(("+-", "|")):
            flush()
            if line.lstrip().startswith(("+-", "|")):
                skip_deeper_than = indent - 1  # a grid table: drop to its end
            continue
        directive = DIRECTIVE.match(line)
        if directive:
            flush()
            if directive.group(2) not in PROSE_DIRECTIVES:
                skip_deeper_than = indent
            continue
        if line.lstrip().startswith(":") and re.match(r"^\s*:[\w -]+:(\s|$)", line) and not current:
            continue  # directive options (:noindex:, :synopsis: ...) and field-list names
        bullet = BULLET.match(line)
        # A list item, or a line indented past the paragraph's text (a definition under its term), starts
        # a new paragraph.
        if current and (bullet or indent > text_indent):
            flush()
        if not current:
            indent_of_first = indent
            text_indent = bullet.end() if bullet else indent
        current.append(line.strip())
    flush()
    return paragraphs


def python_doc_documents(files: dict[str, bytes]) -> list[str]:
    documents, size = [], 0
    for part in PYTHON_DOC_PARTS:
        for name in sorted(f for f in files if f.startswith(PYTHON_DOCS + part) and f.endswith(".rst.txt")):
            if size >= PYTHON_DOCS_BUDGET:
                return documents
            pages = chunk(rst_paragraphs(files[name].decode("utf-8")))
            documents += pages
            size += sum(len(p) for p in pages)
    return documents


def jargon_documents(files: dict[str, bytes]) -> list[str]:
    """The Jargon File's prose (introduction, lexicon, appendices); its tables of contents are dropped."""
    text = gzip.decompress(files[JARGON]).decode("utf-8")
    body = text[text.index("Welcome to the Jargon File", text.index("Welcome to the Jargon File") + 1) :]
    paragraphs, headword = [], ""
    for block in re.split(r"\n\s*\n", body):
        if any(c in block for c in "│┌├└═"):
            continue  # box-drawing tables
        # Cross references are written {entry}; the braces are a convention of the File, not of English.
        paragraph = re.sub(r"\{([^{}]+)\}", r"\1", tidy(block))
        entry = re.match(r"^:(.+?):\s*(.*)$", paragraph)
        if entry:  # a lexicon headword ":cruft: n." opens the entry's first paragraph as "cruft, n."
            headword = ", ".join(part for part in entry.groups() if part and part != "//")
        elif "\n" not in block.strip() and not re.search(r"[.!?:;)\"']$", paragraph):
            continue  # a line of a table of contents, or a title
        elif is_prose(paragraph):
            paragraphs.append(f"{headword}: {paragraph}" if headword else paragraph)
            headword = ""
    return chunk(paragraphs)


def build_corpus(debs: Path, facts: list[dict]) -> None:
    documents = python_doc_documents(deb_files(find_deb(debs, "python3.11-doc")))
    documents += jargon_documents(deb_files(find_deb(debs, "jargon-text")))
    text_size = sum(len(d) for d in documents)
    documents += fact_documents(facts, int(text_size * FACT_SHARE / (1 - FACT_SHARE)))
    random.Random(SEEDS["corpus_facts"]).shuffle(documents)
    valid = [d for i, d in enumerate(documents) if i % VALID_EVERY == 0]
    train = [d for i, d in enumerate(documents) if i % VALID_EVERY != 0]
    write_jsonl(DATA / "corpus" / "train.jsonl", [{"text": d} for d in train])
    write_jsonl(DATA / "corpus" / "valid.jsonl", [{"text": d} for d in valid])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debs", type=Path, help="folder with the .deb files the corpus is made from")
    args = parser.parse_args(argv)
    facts = build_task_files()
    documents = fact_documents(corpus_fact_rows(SEEDS["facts"]), FACTS_BUDGET, SEEDS["facts"])
    write_jsonl(DATA / "corpus" / "facts.jsonl", [{"text": d} for d in documents])
    write_jsonl(DATA / "corpus" / "tools.jsonl", [{"text": d} for d in tool_documents()])
    write_jsonl(DATA / "corpus" / "perspectives.jsonl", [{"text": d} for d in perspective_documents()])
    if args.debs:
        build_corpus(args.debs, facts)
    else:
        print("corpus/: kept as shipped (pass --debs DIR to rebuild it; see data/corpus/README.md)")


if __name__ == "__main__":
    main()
