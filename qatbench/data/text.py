"""A text corpus that ships with qatbench, tokenized into fixed-length LM sequences.

The corpus is English technical prose with code examples: the docstrings of a fixed list of
Python standard-library modules, taken once from CPython 3.11 by
:func:`build_stdlib_corpus` and shipped gzipped as package data
(``qatbench/data/corpus/stdlib_docs.txt.gz``, about 500 KB of text; CPython's license is
beside it). Shipping the snapshot rather than reading docstrings at run time keeps the
text, and therefore every perplexity, identical on every machine and Python version.

Tokenization is byte-level by default (vocabulary 256, nothing to train or download);
``tokenizer`` may instead name a local Hugging Face tokenizer directory. The token stream
is cut into blocks of 16 sequences; every 20th block is held out for evaluation, so the
evaluation text comes from all over the corpus and never overlaps training. Calibration
sequences are drawn from the training blocks, as for the labelled datasets.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import inspect
from importlib import resources
from typing import Any

import torch

from qatbench.data.datasets import TaskData
from qatbench.errors import ConfigError

CORPUS_FILE = "stdlib_docs.txt.gz"
BYTES = "bytes"
SEQUENCES_PER_BLOCK = 16
EVAL_EVERY = 20  # one block in 20 is evaluation text

# The modules whose docstrings make the shipped corpus, in this order.
_STDLIB_MODULE_NAMES = """
abc argparse ast asyncio base64 bisect calendar cmd codecs collections
concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib
doctest email enum filecmp fnmatch fractions ftplib functools getopt gettext glob gzip
hashlib heapq hmac html html.parser http.client http.server imaplib inspect io ipaddress
itertools json logging mailbox mimetypes numbers operator optparse os pathlib pickle
pkgutil platform poplib pprint profile queue random re reprlib sched secrets selectors
shelve shlex shutil signal smtplib socket socketserver sqlite3 statistics string struct
subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback typing
unittest urllib.parse urllib.request uuid warnings weakref wsgiref xml.dom.minidom
xml.etree.ElementTree zipfile zipimport
"""
STDLIB_MODULES = tuple(_STDLIB_MODULE_NAMES.split())


def build_stdlib_corpus(modules: tuple[str, ...] | list[str] = STDLIB_MODULES) -> str:
    """The docstrings (longer than 80 characters, each text once) of ``modules`` and of
    their public classes, methods and functions, in a fixed order, separated by blank
    lines.

    This is how the shipped file was made (CPython 3.11.7); run on another Python version
    it gives a slightly different text, which is why the snapshot ships.
    """
    parts: list[str] = []
    seen: set[str] = set()

    def add(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80 and doc not in seen:  # inherited docstrings repeat
            seen.add(doc)
            parts.append(doc)

    for name in modules:
        module = importlib.import_module(name)
        add(module)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj):
                add(obj)
                for member_name, member in sorted(vars(obj).items()):
                    if not member_name.startswith("_") and inspect.isfunction(member):
                        add(member)
            elif inspect.isfunction(obj):
                add(obj)
    return "\n\n".join(parts) + "\n"


@functools.cache
def corpus_text() -> str:
    """The shipped corpus as text."""
    blob = resources.files("qatbench.data").joinpath("corpus", CORPUS_FILE).read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def corpus_digest() -> str:
    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()[:12]


def tokenize(text: str, tokenizer: str = BYTES) -> torch.Tensor:
    """Token ids of ``text``: its UTF-8 bytes, or a local Hugging Face tokenizer's ids."""
    if tokenizer == BYTES:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            f"data.tokenizer: {tokenizer!r} needs the optional 'transformers' package "
            "(pip install 'qatbench[llm]'); 'bytes' needs nothing"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except OSError as exc:
        raise ConfigError(
            f"data.tokenizer: {tokenizer!r} is not a local Hugging Face tokenizer "
            f"directory: {str(exc).splitlines()[0]}"
        ) from None
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def vocab_size(tokenizer: str = BYTES) -> int | None:
    return 256 if tokenizer == BYTES else None


def text_input_problem(example: torch.Tensor, seq_len: int | None) -> str | None:
    """Why ``text`` cannot feed a model with this example input (token ids [batch, time],
    at least ``seq_len`` long), or None."""
    if example.dtype.is_floating_point or example.dim() != 2:
        return (
            "data.dataset: 'text' needs a language model whose example input is token ids "
            f"[batch, time]; this model's is {example.dtype} {list(example.shape)}"
        )
    context = int(example.shape[-1])
    if seq_len is not None and seq_len > context:
        return f"data.seq_len: {seq_len} is longer than the model's context of {context} tokens"
    return None


def load_text(
    seq_len: int | None,
    calibration_samples: int,
    eval_samples: int,
    example: torch.Tensor,
    seed: int,
    tokenizer: str = BYTES,
) -> TaskData:
    """Splits of ``seq_len``-token sequences (default: the model's example length)."""
    problem = text_input_problem(example, seq_len)
    if problem:
        raise ConfigError(problem)
    seq_len = seq_len or int(example.shape[-1])
    tokens = _tokens(tokenizer)
    span = seq_len + 1  # inputs and their next-token targets
    block = SEQUENCES_PER_BLOCK * span
    blocks = tokens[: len(tokens) // block * block].view(-1, SEQUENCES_PER_BLOCK, span)
    held_out = torch.arange(len(blocks)) % EVAL_EVERY == EVAL_EVERY // 2
    train, evaluation = blocks[~held_out].flatten(0, 1), blocks[held_out].flatten(0, 1)
    gen = torch.Generator().manual_seed(seed)
    calib = train[torch.randperm(len(train), generator=gen)[:calibration_samples]]
    chosen = torch.randperm(len(evaluation), generator=gen)[:eval_samples].sort().values
    evaluation = evaluation[chosen]
    name = f"text[{_tokenizer_id(tokenizer)},{corpus_digest()},s{seq_len}]"
    return TaskData(
        name=name,
        train_x=train[:, :-1].contiguous(),
        train_y=train[:, 1:].contiguous(),
        calib_x=calib[:, :-1].contiguous(),
        eval_x=evaluation[:, :-1].contiguous(),
        eval_y=evaluation[:, 1:].contiguous(),
        num_classes=vocab_size(tokenizer),
        task="language_modelling",
    )


@functools.cache
def _tokens(tokenizer: str) -> torch.Tensor:
    return tokenize(corpus_text(), tokenizer)


def _tokenizer_id(tokenizer: str) -> str:
    if tokenizer == BYTES:
        return BYTES
    return "hf-" + hashlib.sha256(tokenizer.encode()).hexdigest()[:8]


def decode_bytes(ids: torch.Tensor) -> str:
    """Byte-level ids back to text (invalid UTF-8 replaced), for showing samples."""
    return bytes(int(i) for i in ids.flatten()).decode("utf-8", errors="replace")
