"""Data sources into canonical rows: local files, dataset folders and Hub datasets, one at a time or mixed by weight.

Every source is read row by row together with where the row is, so that each problem names its place:

    .jsonl     one JSON object per line; blank lines are skipped          "train.jsonl:12: ..."
    .json      a JSON array of objects (each named by the line it starts on), or JSON lines under a .json name
    .csv       a header line, then one record per row (Python's csv module: line numbers stay right across quoted
               multi-line cells, and cells stay strings, so an answer "007" is not read as 7)
    .txt       every non-empty line is one `text` row
    .parquet   "data.parquet: row 3" (0-based, as `dataset[3]`)
    a folder written by `save_to_disk`, any other dataset folder, or a Hub dataset id: through `datasets`
    (`load_from_disk`, `load_dataset(path, name, split=...)`), "path[train] row 3"

Rows are then normalised (`toolkit.data.formats`) and written to Arrow with `Dataset.from_generator`, cached under
a fingerprint of the source (path, size, modification time, options) and of this package's code: a second run
reads the cache, an edited file is read again.

Single files are not read with `load_dataset("json", ...)`: pyarrow wants one type per column, so a preference
file whose prompts are sometimes strings and sometimes message lists (both valid) would fail, and its errors name
no line.

A source with any bad row is refused as a whole, with every problem listed: training on a silently filtered
subset hides mistakes. `check_file` gives the same list without loading.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
from datasets import Features, List, Value
from datasets.exceptions import DatasetGenerationError

from toolkit.data import formats
from toolkit.data.formats import FORMATS, KINDS, describe_formats, detect_format, formats_for, to_canonical
from toolkit.errors import DataError, ToolkitError, nearest, unknown_key_message

# A load_source error lists this many problems; check_file returns them all.
MAX_LISTED_PROBLEMS = 20

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
# The canonical columns of each kind. `prompt` rows keep their sources' extra columns, so theirs are inferred.
KIND_FEATURES: dict[str, Features | None] = {
    "text": Features({"text": Value("string")}),
    "messages": Features({"messages": _MESSAGES}),
    "preference": Features({"prompt": _MESSAGES, "chosen": _MESSAGES, "rejected": _MESSAGES}),
    "unpaired": Features({"prompt": _MESSAGES, "completion": _MESSAGES, "label": Value("bool")}),
    "prompt": None,
}

# Files that mark a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass
class DataSource:
    """One entry of a recipe's `data.sources` list."""

    path: str  # local file (jsonl/json/csv/txt/parquet), local dataset folder, or Hub dataset id
    format: str = "auto"  # auto | text | alpaca | sharegpt | messages | preference | unpaired | prompt
    weight: float = 1.0  # relative share in a mixture: 2.0 gives twice the rows of a 1.0 source
    split: str = "train"  # for folders and Hub datasets; a single file is one split
    name: str | None = None  # Hub dataset config
    max_rows: int | None = None  # keep only the first N rows, in file order
    # Column renames applied before anything else, e.g. {"question": "prompt"} for a dataset whose RL prompts sit in
    # a `question` column; a renamed column replaces a column of the same name.
    columns: dict[str, str] = field(default_factory=dict)
    # Keep only the rows whose column has this value (or one of these values), e.g. {task: addition} for one
    # task family of a mixed file; tested after the renames, before max_rows.
    where: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> DataSource:
        """Build from a recipe mapping; `where` (e.g. `data.sources[1]`) prefixes every error."""
        if not isinstance(d, dict):
            raise DataError(f"{where} is {formats.json_type(d)}; expected a mapping with at least 'path'")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise DataError(unknown_key_message(key, names, where))
        if "path" not in d:
            raise DataError(f"{where}: missing 'path' (a data file, a dataset folder or a Hub dataset id)")
        for key, value in d.items():
            is_valid, expected = _FIELD_RULES[key]
            if not is_valid(value):
                guess = (
                    nearest(value, _FORMAT_CHOICES) if key == "format" and isinstance(value, str) else None
                )
                hint = f" (did you mean '{guess}'?)" if guess else ""
                raise DataError(f"{where}.{key} is {value!r}; expected {expected}{hint}")
        return cls(**d)


def _is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


_FORMAT_CHOICES = ("auto", *FORMATS)
# field -> (check, what a valid value is)
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "path": (_is_text, "a data file, a dataset folder or a Hub dataset id"),
    "format": (lambda v: v in _FORMAT_CHOICES, f"one of {', '.join(_FORMAT_CHOICES)}"),
    "weight": (_is_positive_number, "a positive number"),
    "split": (_is_text, "a split name such as 'train'"),
    "name": (lambda v: v is None or _is_text(v), "a dataset config name"),
    "max_rows": (lambda v: v is None or (type(v) is int and v > 0), "a positive whole number"),
    "columns": (
        lambda v: isinstance(v, dict) and all(_is_text(k) and _is_text(n) for k, n in v.items()),
        "a mapping from source column to new name, e.g. {question: prompt}",
    ),
    "where": (
        lambda v: isinstance(v, dict) and all(_is_text(k) for k in v),
        "a mapping from column to the value (or list of values) of the rows to keep, e.g. {task: addition}",
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Readers: each yields every row of a source with its location; a row that cannot be read carries a problem.


class RawRow(NamedTuple):
    where: str  # "file:line" or "path[split] row N"
    data: dict | None  # None when the row could not be read
    problem: str | None = None


def _lines(path: str) -> Iterator[tuple[str, str | None, str | None]]:
    """(location, text, problem) for every line, so that one undecodable line does not hide the rest."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield (
                    f"{path}:{line_no}",
                    None,
                    f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)",
                )
                continue
            # A byte-order mark some editors write.
            yield f"{path}:{line_no}", text.removeprefix("\ufeff") if line_no == 1 else text, None


def _read_jsonl(path: str) -> Iterator[RawRow]:
    for where, line, problem in _lines(path):
        if problem is not None:
            yield RawRow(where, None, problem)
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRow(where, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        if isinstance(data, dict):
            yield RawRow(where, data)
        else:
            yield RawRow(
                where, None, f"a line holds {formats.json_type(data)}; expected one JSON object per line"
            )


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _read_json(path: str) -> Iterator[RawRow]:
    text = _read_utf8(path).removeprefix("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            yield from _read_jsonl(path)
        else:
            yield RawRow(f"{path}:{exc.lineno}", None, f"malformed JSON: {exc.msg} (column {exc.colno})")
        return
    if not isinstance(data, list):
        raise DataError(f"{path}: holds {formats.json_type(data)}; expected a JSON array of row objects")
    # The text parsed, so walk it again element by element to learn the line each one starts on.
    decoder = json.JSONDecoder()
    pos = _JSON_WHITESPACE.match(text, 0).end() + 1  # just past "["
    line, counted = 1, 0
    for element in data:
        pos = _JSON_WHITESPACE.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        _, end = decoder.raw_decode(text, pos)
        where = f"{path}:{line}"
        if isinstance(element, dict):
            yield RawRow(where, element)
        else:
            yield RawRow(where, None, f"element is {formats.json_type(element)}; expected an object")
        pos = _JSON_WHITESPACE.match(text, end).end() + 1  # past ","


def _read_csv(path: str) -> Iterator[RawRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets start files with a BOM
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames is None:
                return
            start = reader.line_num + 1
            for record in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if None in record:  # DictReader files surplus cells under the key None
                    cells = len(reader.fieldnames) + len(record[None])
                    yield RawRow(where, None, f"{cells} cells; the header has {len(reader.fieldnames)}")
                else:
                    yield RawRow(where, record)
        except (UnicodeDecodeError, csv.Error) as exc:  # the reader cannot go on past either
            raise DataError(f"{path}:{reader.line_num + 1}: cannot read on as CSV: {exc}") from exc


def _read_txt(path: str) -> Iterator[RawRow]:
    for where, line, problem in _lines(path):
        if problem is not None:
            yield RawRow(where, None, problem)
        elif line.strip():
            yield RawRow(where, {"text": line})


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
        for index, row in enumerate(rows):
            yield RawRow(f"{path}: row {index}", row)
    except OSError as exc:  # pyarrow's ArrowInvalid is an OSError too
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc


FILE_READERS: dict[str, Callable[[str], Iterator[RawRow]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".txt": _read_txt,
    ".parquet": _read_parquet,
}


def _read_utf8(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _load_dataset(source: DataSource) -> tuple[datasets.Dataset, str]:
    """A dataset folder or Hub dataset through `datasets`, and the label its rows are named by."""
    path = Path(source.path).expanduser()
    label = f"{source.path}[{source.split}]"
    try:
        if path.is_dir() and any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            if not isinstance(loaded, datasets.DatasetDict):
                return loaded, source.path  # a saved Dataset is one split
            if source.split not in loaded:
                raise DataError(f"{source.path}: no split '{source.split}'; it has {', '.join(loaded)}")
            return loaded[source.split], label
        return datasets.load_dataset(
            str(path) if path.is_dir() else source.path, source.name, split=source.split
        ), label
    except ToolkitError:
        raise
    except Exception as exc:  # datasets raises many types here: missing split, bad config, no connection...
        what = "dataset folder" if path.is_dir() else "Hub dataset (no such local file or folder)"
        raise DataError(f"{source.path}: cannot load split '{source.split}' of this {what}: {exc}") from exc


def _dataset_rows(dataset: datasets.Dataset, label: str) -> Iterator[RawRow]:
    for index, row in enumerate(dataset):
        yield RawRow(f"{label} row {index}", row)


def local_path_problem(path: str, folder: bool = False) -> str | None:
    """Why `path` (a data source, or with `folder` a model or tokenizer) cannot be found, when that can be told
    without the network: it names a local file or folder that is not there. A name that can be a Hub id is
    left to the loader, which asks the Hub."""
    local = Path(path).expanduser()
    if local.is_dir() or (local.is_file() and not folder):
        return None
    looks_local = path.startswith(("/", ".", "~")) or (not folder and local.suffix.lower() in FILE_READERS)
    if looks_local or not _HUB_ID.fullmatch(path):
        return f"no such {'folder' if folder else 'file or folder'}"
    return None


def open_source(source: DataSource) -> tuple[Callable[[], Iterator[RawRow]], str]:
    """Where a source's rows come from: a function that reads them afresh, and an id of the content for caching."""
    path = Path(source.path).expanduser()
    if path.is_file():
        reader = FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"{source.path}: cannot read '{path.suffix}' files; use {', '.join(FILE_READERS)}, "
                "a dataset folder or a Hub dataset id"
            )
        stat = path.stat()
        return functools.partial(reader, source.path), f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if problem := local_path_problem(source.path):
        raise DataError(f"{source.path}: {problem}")
    dataset, label = _load_dataset(source)
    return functools.partial(_dataset_rows, dataset, label), dataset._fingerprint


# ---------------------------------------------------------------------------------------------------------------
# Scanning: raw rows -> canonical rows and problems.

# Arrow stores one type per column, and an integer column cannot take 2.5 later on.
_VALUE_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a decimal number",
    str: "a string",
    list: "a list",
}


def _rename(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    renamed = {new: row[old] for old, new in columns.items() if old in row}
    return {**{k: v for k, v in row.items() if k not in columns}, **renamed}


def _check_feeds(fmt: str, kind: str | None, where: str) -> None:
    if kind is not None and FORMATS[fmt].kind != kind:
        raise DataError(
            f"{where}: rows in the {fmt} format feed kind '{FORMATS[fmt].kind}', not '{kind}'; "
            f"kind '{kind}' takes the formats {describe_formats(formats_for(kind))}"
        )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        guess = nearest(kind, KINDS)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        raise DataError(f"unknown data kind '{kind}'; expected one of {', '.join(KINDS)}{hint}")


def _scan(
    source: DataSource, kind: str | None, rows: Callable[[], Iterator[RawRow]]
) -> Iterator[tuple[str, dict | None, list[str]]]:
    """(location, canonical row, problems) for each row; the format is detected from the first readable row."""
    fmt = None if source.format == "auto" else source.format
    if fmt is not None:
        _check_feeds(fmt, kind, source.path)
        if fmt != "text" and Path(source.path).suffix.lower() == ".txt":
            raise DataError(
                f"{source.path}: a .txt file holds plain text; '{fmt}' rows need jsonl, json, csv or parquet"
            )
    column_types: dict[str, tuple[str, str]] = {}  # extra column -> (type name, where first seen)
    for raw, row in itertools.islice(_selected(rows(), source), source.max_rows):
        if raw.data is None:
            yield raw.where, None, [raw.problem]
            continue
        if fmt is None:
            fmt = detect_format(row)
            if fmt is None:
                raise DataError(
                    f"{raw.where}: cannot tell the format from the columns {', '.join(row) or '(none)'}; "
                    f"expected the columns of {describe_formats()}, or name the format"
                )
            _check_feeds(fmt, kind, raw.where)
        canonical, problems = to_canonical(row, fmt)
        if FORMATS[fmt].keeps_extra_columns:
            problems += _extra_column_problems(canonical, raw.where, column_types)
        yield raw.where, canonical, problems


def _selected(rows: Iterator[RawRow], source: DataSource) -> Iterator[tuple[RawRow, dict | None]]:
    """Each row with its columns renamed, those that `source.where` leaves out skipped (unreadable rows are
    kept, so that their problems are reported)."""
    wanted = {k: v if isinstance(v, list) else [v] for k, v in source.where.items()}
    for raw in rows:
        row = None if raw.data is None else _rename(raw.data, source.columns)
        if row is None or all(row.get(column) in values for column, values in wanted.items()):
            yield raw, row


def _extra_column_problems(row: dict, where: str, seen: dict[str, tuple[str, str]]) -> list[str]:
    problems = []
    for key, value in row.items():
        if key == "prompt" or value is None:
            continue
        name = _VALUE_TYPES.get(type(value), "an object")
        first = seen.setdefault(key, (name, where))
        if first[0] != name:
            problems.append(f"'{key}' is {name} here but {first[0]} at {first[1]}; a column holds one type")
    return problems


def _summary(problems: list[str]) -> str:
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    return "\n".join([*listed, f"... and {more} more ({len(problems)} in all)"] if more else listed)


@functools.cache
def _code_digest() -> str:
    """Changes whenever the normalisation code does, so that cached datasets built by older code are not reused."""
    return hashlib.sha256(Path(formats.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()


def load_source(source: DataSource, kind: str) -> datasets.Dataset:
    """One source as a dataset of `kind` canonical rows; any bad row raises a DataError listing every problem."""
    _check_kind(kind)
    rows, content_id = open_source(source)
    options = json.dumps([dataclasses.asdict(source), kind, content_id, _code_digest()], sort_keys=True)

    def generate() -> Iterator[dict]:
        problems: list[str] = []
        count = 0
        for where, row, row_problems in _scan(source, kind, rows):
            problems += [f"{where}: {p}" for p in row_problems]
            if not problems:
                count += 1
                yield row
        if problems:
            raise DataError(_summary(problems))
        if count == 0:
            raise DataError(f"{source.path}: no rows")

    try:
        return datasets.Dataset.from_generator(
            generate, features=KIND_FEATURES[kind], fingerprint=hashlib.sha256(options.encode()).hexdigest()
        )
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, ToolkitError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise DataError(f"{source.path}: cannot store the rows as a dataset: {exc.__cause__}") from exc


def check_file(path: str, format: str = "auto", kind: str | None = None) -> list[str]:
    """Every problem in a data file (or folder, or Hub dataset), one `file:line: ...` string each; [] when clean.

    Reports instead of raising, so that one pass shows everything to fix. `kind`, when given, also checks that
    the file's format feeds that kind.
    """
    problems: list[str] = []
    try:
        if format not in _FORMAT_CHOICES:
            guess = nearest(format, _FORMAT_CHOICES)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise DataError(f"unknown format '{format}'; expected one of {', '.join(_FORMAT_CHOICES)}{hint}")
        if kind is not None:
            _check_kind(kind)
        source = DataSource(path=path, format=format)
        rows, _ = open_source(source)
        count = 0
        for where, _row, row_problems in _scan(source, kind, rows):
            count += 1
            problems += [f"{where}: {p}" for p in row_problems]
        if count == 0:
            problems.append(f"{path}: no rows")
    except DataError as exc:
        problems.append(str(exc))
    return problems


def preview_problems(source: DataSource, kind: str, rows: int = 8) -> list[str]:
    """The problems of a local source's first `rows` rows as `kind` (that its format feeds the kind, that the
    rows parse): what a recipe check can tell in milliseconds, before any stage runs. Hub datasets and
    folders are left to the stage (reading them may take the network and minutes)."""
    if not Path(source.path).expanduser().is_file():
        return []
    try:
        reader, _ = open_source(source)
        found = itertools.islice(_scan(source, kind, reader), rows)
        return [f"{where}: {p}" for where, _row, row_problems in found for p in row_problems]
    except DataError as exc:
        return [str(exc)]


def iter_texts(path: str) -> Iterator[str]:
    """The text of every row of a text file (.txt lines, or rows with a `text` column), streamed."""
    source = DataSource(path=path, format="text")
    rows, _ = open_source(source)
    for where, row, problems in _scan(source, "text", rows):
        if problems:
            raise DataError(f"{where}: {problems[0]}")
        yield row["text"]


# ---------------------------------------------------------------------------------------------------------------
# Mixtures


def mixture_counts(weights: Iterable[float], total: int) -> list[int]:
    """Rows per source: `total` split in proportion to `weights`, rounded by largest remainder to sum exactly."""
    weights = list(weights)
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(length: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices out of `length`: without repetition while they last, then whole shuffled passes again."""
    passes = [rng.permutation(length) for _ in range(count // length)]
    return np.concatenate([*passes, rng.permutation(length)[: count % length]])


def _align_columns(parts: list[datasets.Dataset], sources: list[DataSource]) -> list[datasets.Dataset]:
    """Give every part the union of the parts' columns (missing ones as nulls): `prompt` rows keep extra columns."""
    common: dict[str, tuple[Any, str]] = {}  # column -> (feature, path of the source that fixed it)
    for part, source in zip(parts, sources, strict=True):
        for column, feature in part.features.items():
            known = common.get(column)
            if known is None or known[0] == Value("null"):
                common[column] = (feature, source.path)
            elif feature != known[0] and feature != Value("null"):
                raise DataError(
                    f"column '{column}' holds {feature} in {source.path} but {known[0]} in {known[1]}; "
                    "sources mixed together need the same type per column"
                )
    features = Features({column: feature for column, (feature, _) in common.items()})
    aligned = []
    for part in parts:
        for column in features:
            if column not in part.column_names:
                part = part.add_column(column, [None] * len(part))
        aligned.append(part.select_columns(list(features)).cast(features))
    return aligned


def load_mixture(
    sources: list[DataSource], kind: str, seed: int = 0, *, size: int | None = None
) -> datasets.Dataset:
    """The sources mixed by weight into one shuffled dataset of `kind` rows, the same for the same seed.

    Weights are shares of the mixture: source i gives `round(size * weight_i / sum(weights))` rows (largest
    remainder, so the counts add up to `size`). `size` defaults to the sources' total row count, so a mixture is
    as large as its sources together and only the proportions change. A source whose share is below its size
    gives a random subset of its rows; one whose share is above it is repeated: every row once per full pass,
    then a random subset for the remainder.
    """
    if not sources:
        raise DataError("no data sources to mix")
    parts = [load_source(source, kind) for source in sources]
    total = sum(len(part) for part in parts) if size is None else size
    if total < 1:
        raise DataError(f"a mixture needs at least one row, not {total}")
    rng = np.random.default_rng(seed)
    counts = mixture_counts([source.weight for source in sources], total)
    drawn = [part.select(_draw(len(part), count, rng)) for part, count in zip(parts, counts, strict=True)]
    if any(part.features != drawn[0].features for part in drawn):
        drawn = _align_columns(drawn, sources)
    return datasets.concatenate_datasets(drawn).shuffle(seed=seed)
