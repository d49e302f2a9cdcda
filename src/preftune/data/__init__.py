"""The data stage: load and validate preference data, render it per tokenizer, tokenize it.

    loaded = load_examples("data/train.jsonl")                      # validated Examples
    tokenized, report = tokenize_dataset(loaded, tokenizer, max_length=1024)

Every bad row raises :class:`DataError` naming the file, row and field (or is skipped and recorded
with ``on_error="skip"``). See docs/data-formats.md.
"""

from .check import DataCheck, check_data
from .formatting import (
    DEFAULT_TEMPLATE,
    add_special_tokens_for,
    has_chat_template,
    render_example,
    render_unpaired,
    resolve_chat_template,
)
from .loading import examples_fingerprint, load_examples
from .records import Columns, DataError, Example, LoadedData, UnpairedExample
from .tokenize import (
    TokenizedExample,
    TokenizedUnpaired,
    TokenizeReport,
    tokenize_dataset,
    tokenize_example,
    tokenize_unpaired,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "Columns",
    "DataCheck",
    "DataError",
    "Example",
    "LoadedData",
    "TokenizeReport",
    "TokenizedExample",
    "TokenizedUnpaired",
    "UnpairedExample",
    "add_special_tokens_for",
    "check_data",
    "examples_fingerprint",
    "has_chat_template",
    "load_examples",
    "render_example",
    "render_unpaired",
    "resolve_chat_template",
    "tokenize_dataset",
    "tokenize_example",
    "tokenize_unpaired",
]
