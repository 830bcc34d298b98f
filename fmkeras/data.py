"""Where data lives: the data directory and the files a recipe names.

The directory comes from `--data-dir`, then the recipe's `data.dir`, then the
`FMKERAS_DATA_DIR` environment variable. The project never ships data; the
README's "Data" section lists each dataset's official source.
"""

import glob
import os
import sys
from pathlib import Path

from fmkeras.errors import DataError

DATA_DIR_ENV = "FMKERAS_DATA_DIR"

SOURCES = {
    "gutenberg_en": "Project Gutenberg public-domain books (gutenberg.org)",
    "sst2": "GLUE SST-2 (gluebenchmark.com)",
    "conll2003": "CoNLL-2003 English NER (clips.uantwerpen.be/conll2003/ner)",
    "tatoeba_en_zh": "Tatoeba cmn-eng pairs (manythings.org/anki)",
    "multi30k_en_de": "Multi30k task 1 (github.com/multi30k/dataset)",
}


def resolve_data_dir(command_line=None, recipe=None):
    """Returns `(path, origin)`; `path` is None when nothing names a directory."""
    for value, origin in (
        (command_line, "--data-dir"),
        (recipe, "data.dir"),
        (os.environ.get(DATA_DIR_ENV), f"${DATA_DIR_ENV}"),
    ):
        if value:
            return Path(value).expanduser().resolve(), origin
    return None, None


def is_glob(pattern):
    """Whether a data path is a glob of shards (`books/*.txt`)."""
    return any(character in str(pattern) for character in "*?[")


def require_file(relative, data_dir, origin, allow_glob=False):
    """The path of a data file, or a `DataError` that says what was expected
    where; with `allow_glob`, a glob that matches at least one file (the
    absolute pattern is returned)."""
    path = Path(relative).expanduser()
    if not path.is_absolute():
        if data_dir is None:
            raise DataError(
                f"no data directory for {relative}: pass --data-dir DIR, set data.dir (in "
                f"the recipe, or the run's config.yaml), or export {DATA_DIR_ENV}=DIR (see "
                "README, 'Data')"
            )
        path = data_dir / path
    if allow_glob and is_glob(relative):
        if not any(Path(match).is_file() for match in glob.glob(str(path))):
            where = f"data directory {data_dir} (from {origin})" if data_dir else "that path"
            raise DataError(f"no file matches {relative} in {where}")
        return path
    if not path.is_file():
        where = f"data directory {data_dir} (from {origin})" if data_dir else "that path"
        dataset = Path(relative).parts[0] if not Path(relative).is_absolute() else None
        source = f" It belongs to {SOURCES[dataset]}." if dataset in SOURCES else ""
        raise DataError(
            f"expected the file {relative} in {where}, but it does not exist.{source} "
            f"Point --data-dir or ${DATA_DIR_ENV} at a directory laid out like the README's "
            "'Data' section."
        )
    return path


def read_lines(path, max_lines=None, keep_empty=False):
    """Stripped lines of a UTF-8 text file (empty ones dropped unless
    `keep_empty`, e.g. to keep two files aligned); bad bytes name the line."""
    lines = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if max_lines is not None and number > max_lines:
                break
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start}); "
                    "convert the file to UTF-8"
                ) from None
            if line or keep_empty:
                lines.append(line)
    if not lines:
        raise DataError(f"{path} contains no text")
    return lines


def read_input_texts(arguments, file=None, keep_empty=False):
    """Texts for the inference commands: `arguments`, then the lines of `file`
    (`-`: standard input); empty lines are kept only with `keep_empty` (so
    outputs stay aligned with input lines)."""
    texts = list(arguments)
    if file == "-":
        lines = [line.strip() for line in sys.stdin]
        texts += [line for line in lines if line or keep_empty]
    elif file:
        if not Path(file).is_file():
            raise DataError(f"input file {file} does not exist")
        texts += read_lines(file, keep_empty=keep_empty)
    return texts
