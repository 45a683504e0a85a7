"""JSONL reading, validation and batching. Files are streamed, never loaded whole."""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from your_ai.errors import UserError

FIELDS = ("text", "auth_weight", "prov_entropy")
MAX_AUTH_WEIGHT = 0.99
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Example:
    text: str
    auth_weight: float
    prov_entropy: float


@dataclass
class Batch:
    tokens: np.ndarray  # (batch, length) int32, padded with 0
    lengths: np.ndarray  # (batch,) real tokens per row
    auth_weight: np.ndarray  # (batch,) float32
    prov_entropy: np.ndarray  # (batch,) float32
    position: int = 0  # byte offset of the next unread line in the file

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def parse_line(raw: bytes, path: Path, line_no: int) -> Example | None:
    line = raw.strip()
    if not line:
        return None
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if hasattr(err, "msg") else err
        raise UserError(f"{where}: malformed JSON ({reason})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise UserError(f"{where}: missing field '{field}'")
    text, auth, entropy = (record[f] for f in FIELDS)
    if not isinstance(text, str) or not text:
        raise UserError(f"{where}: text must be a non-empty string")
    for name, value in (("auth_weight", auth), ("prov_entropy", entropy)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UserError(f"{where}: {name}={value!r} is not a number")
        # Batches hold float32: a larger integer or float would become infinite there.
        if not abs(value) <= FLOAT32_MAX:
            raise UserError(f"{where}: {name}={value!r} is not a finite float32 number")
    if not 0.0 <= auth <= MAX_AUTH_WEIGHT:
        raise UserError(f"{where}: auth_weight={auth} is outside [0, {MAX_AUTH_WEIGHT}]")
    if entropy < 0:
        raise UserError(f"{where}: prov_entropy={entropy} must be >= 0 and finite")
    return Example(text, float(auth), float(entropy))


def read_examples(path: str | Path, start: int = 0) -> Iterator[tuple[Example, int]]:
    """Yields each example with the byte offset just after its line, from byte offset `start`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.train_file={path}: no such file")
    with path.open("rb") as f:
        # Line numbers stay right after a resume: count the lines before `start` once.
        line_no = f.read(start).count(b"\n") if start else 0
        f.seek(start)
        while raw := f.readline():
            line_no += 1
            example = parse_line(raw, path, line_no)
            if example is not None:
                yield example, f.tell()


def validate(path: str | Path) -> int:
    """Checks every line before training starts; returns the number of examples."""
    count = sum(1 for _ in read_examples(path))
    if count == 0:
        raise UserError(f"data.train_file={path}: no examples")
    return count


def encode(tokenizer, text: str, max_seq_length: int) -> list[int]:
    ids = tokenizer.encode(text)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids[:max_seq_length]


def pad_length(longest: int, max_seq_length: int, multiple: int = 32) -> int:
    """Round up so a compiled step sees few distinct shapes."""
    return min(max_seq_length, multiple * math.ceil(longest / multiple))


def collate(rows: list[list[int]], examples: list[Example], length: int, position: int) -> Batch:
    tokens = np.zeros((len(rows), length), dtype=np.int32)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
    return Batch(
        tokens=tokens,
        lengths=np.array([len(r) for r in rows], dtype=np.int32),
        auth_weight=np.array([e.auth_weight for e in examples], dtype=np.float32),
        prov_entropy=np.array([e.prov_entropy for e in examples], dtype=np.float32),
        position=position,
    )


def iterate_batches(
    path: str | Path, tokenizer, batch_size: int, max_seq_length: int, start: int = 0
) -> Iterator[Batch]:
    """Batches in file order, endlessly (epoch after epoch); each knows where the next begins."""
    rows, examples = [], []
    while True:
        for example, position in read_examples(path, start):
            rows.append(encode(tokenizer, example.text, max_seq_length))
            examples.append(example)
            if len(rows) == batch_size:
                length = pad_length(max(len(r) for r in rows), max_seq_length)
                yield collate(rows, examples, length, position)
                rows, examples = [], []
        start = 0


def packed_batch(path: str | Path, tokenizer, batch_size: int, max_seq_length: int) -> Batch:
    """Real text packed into full-length rows: the worst case a training run can meet."""
    stream: list[int] = []
    examples = []
    need = batch_size * max_seq_length
    while len(stream) < need:
        before = len(stream)
        for example, _ in read_examples(path):
            stream.extend(encode(tokenizer, example.text, max_seq_length))
            examples.append(example)
            if len(stream) >= need:
                break
        if len(stream) == before:
            raise UserError(f"sweep.data=file: {path} holds no text")
    rows = [stream[i * max_seq_length : (i + 1) * max_seq_length] for i in range(batch_size)]
    return collate(rows, (examples * batch_size)[:batch_size], max_seq_length, 0)


def synthetic_batch(vocab_size: int, batch_size: int, max_seq_length: int, seed: int) -> Batch:
    """Random tokens at full length: memory and speed do not depend on the token values."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch_size, max_seq_length), dtype=np.int32)
    return Batch(
        tokens=tokens,
        lengths=np.full(batch_size, max_seq_length, dtype=np.int32),
        auth_weight=rng.uniform(0.0, MAX_AUTH_WEIGHT, batch_size).astype(np.float32),
        prov_entropy=rng.uniform(0.0, 8.0, batch_size).astype(np.float32),
    )
