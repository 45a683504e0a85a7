"""JSONL reading, validation and batching in mlx-lm's data formats. Files are streamed, never
loaded whole.

A file's format is detected from its first example as mlx-lm detects it: `prompt` and
`completion` (the pair as a user turn and an assistant turn, through the tokenizer's chat
template), `messages` (chat, through the chat template), else `text`. The distrust fields
`auth_weight` and `prov_entropy` are optional, but on every line or on none.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from your_ai.errors import UserError

FORMATS = ("text", "chat", "completions")
DISTRUST_FIELDS = ("auth_weight", "prov_entropy")
MAX_AUTH_WEIGHT = 0.99
FLOAT32_MAX = float(np.finfo(np.float32).max)
# mlx-lm's names: the fields each format reads.
READS = {"text": ("text",), "chat": ("messages",), "completions": ("prompt", "completion")}


@dataclass
class Example:
    content: dict  # the fields its format reads (and `tools`, which chat templates take)
    auth_weight: float | None = None  # None: the file has no distrust fields
    prov_entropy: float | None = None

    @property
    def text(self) -> str:
        return self.content["text"]


@dataclass
class DataFile:
    """What validation found: the format, whether the distrust fields are given, how many."""

    path: Path
    format: str
    distrust: bool
    examples: int


@dataclass
class Batch:
    tokens: np.ndarray  # (batch, length) int32, padded with 0
    lengths: np.ndarray  # (batch,) real tokens per row
    auth_weight: np.ndarray  # (batch,) float32 (0 where the file has no distrust fields)
    prov_entropy: np.ndarray  # (batch,) float32
    position: int = 0  # byte offset of the next unread line in the file
    # (batch,) the first token the loss counts (data.mask_prompt: where the completion starts)
    offsets: np.ndarray | None = field(default=None)

    def __post_init__(self):
        if self.offsets is None:
            self.offsets = np.zeros(len(self.lengths), dtype=np.int32)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def detect_format(record: dict) -> str | None:
    """mlx-lm's `create_dataset` order: prompt/completion, then messages, then text."""
    if "prompt" in record and "completion" in record:
        return "completions"
    if "messages" in record:
        return "chat"
    if "text" in record:
        return "text"
    return None


def _load(raw: bytes, where: str) -> dict | None:
    line = raw.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if hasattr(err, "msg") else err
        raise UserError(f"{where}: malformed JSON ({reason})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _check_content(record: dict, fmt: str, where: str) -> dict:
    for name in READS[fmt]:
        if name not in record:
            needs = ", ".join(READS[fmt])
            raise UserError(f"{where}: missing field '{name}' ({fmt} data: {needs})")
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: messages must be a non-empty list")
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise UserError(
                    f"{where}: messages[{i}] must be an object with a string role and content"
                )
        content = {"messages": messages}
        if record.get("tools") is not None:
            content["tools"] = record["tools"]
        return content
    for name in READS[fmt]:
        value = record[name]
        if not isinstance(value, str) or (name != "prompt" and not value):
            raise UserError(f"{where}: {name} must be a non-empty string")
    return {name: record[name] for name in READS[fmt]}


def _check_distrust(record: dict, where: str) -> tuple[float, float] | None:
    given = [f for f in DISTRUST_FIELDS if f in record]
    if not given:
        return None
    for name in DISTRUST_FIELDS:
        if name not in record:
            raise UserError(f"{where}: missing field '{name}'")
    auth, entropy = (record[f] for f in DISTRUST_FIELDS)
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
    return float(auth), float(entropy)


def parse_line(raw: bytes, path: Path, line_no: int, fmt: str | None = None) -> Example | None:
    """One line as an example of format `fmt` (detected from this line when None)."""
    where = f"{path}:{line_no}"
    record = _load(raw, where)
    if record is None:
        return None
    fmt = fmt or detect_format(record)
    if fmt is None:
        raise UserError(
            f"{where}: no text, messages or prompt/completion field (mlx-lm's data formats)"
        )
    content = _check_content(record, fmt, where)
    distrust = _check_distrust(record, where)
    if distrust is None:
        return Example(content)
    return Example(content, *distrust)


def file_format(path: Path) -> str:
    """The format of the file's first example, as mlx-lm decides it for a whole file."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            example = parse_line(raw, path, line_no)
            if example is not None:
                return detect_format(example.content) or "text"
    raise UserError(f"data.train_file={path}: no examples")


def read_examples(
    path: str | Path, start: int = 0, fmt: str | None = None
) -> Iterator[tuple[Example, int]]:
    """Yields each example with the byte offset just after its line, from byte offset `start`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.train_file={path}: no such file")
    fmt = fmt or file_format(path)
    with path.open("rb") as f:
        # Line numbers stay right after a resume: count the lines before `start` once.
        line_no = f.read(start).count(b"\n") if start else 0
        f.seek(start)
        while raw := f.readline():
            line_no += 1
            example = parse_line(raw, path, line_no, fmt)
            if example is not None:
                yield example, f.tell()


def inspect(path: str | Path, mask_prompt: bool = False, key: str = "data.train_file") -> DataFile:
    """Checks every line before training starts: each in the file's format, and the distrust
    fields on every line or on none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file")
    fmt = file_format(path)
    if mask_prompt and fmt == "text":
        raise UserError(
            f"data.mask_prompt=true: {path} holds text data, which has no prompt to mask "
            "(chat or prompt/completion data has)"
        )
    count, with_fields, without = 0, None, None
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            example = parse_line(raw, path, line_no, fmt)
            if example is None:
                continue
            count += 1
            if example.auth_weight is None:
                without = without or line_no
            else:
                with_fields = with_fields or line_no
            if with_fields and without:
                raise UserError(
                    f"{path}:{without}: missing fields auth_weight and prov_entropy, which line "
                    f"{with_fields} gives (a file gives them on every line or on none)"
                )
    if count == 0:
        raise UserError(f"{key}={path}: no examples")
    return DataFile(path, fmt, with_fields is not None, count)


def validate(path: str | Path) -> int:
    """Checks every line before training starts; returns the number of examples."""
    return inspect(path).examples


def encode(tokenizer, text: str, max_seq_length: int) -> list[int]:
    ids = tokenizer.encode(text)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids[:max_seq_length]


def _chat(tokenizer, messages: list, tools, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tools=tools, return_dict=False, **kwargs))


def tokens_of(example: Example, tokenizer, max_seq_length: int, mask_prompt: bool = False):
    """(token ids, offset): the ids as mlx-lm's datasets make them, and the first one the loss
    counts (the completion's, or the last turn's, with `mask_prompt`; else 0)."""
    content = example.content
    if "text" in content:
        return encode(tokenizer, content["text"], max_seq_length), 0
    if "messages" in content:
        messages = content["messages"]
    else:
        messages = [
            {"role": "user", "content": content["prompt"]},
            {"role": "assistant", "content": content["completion"]},
        ]
    tools = content.get("tools")
    ids = _chat(tokenizer, messages, tools)
    offset = 0
    if mask_prompt:
        # As mlx-lm: the prompt is the conversation before the last message, with the
        # assistant's header when the last message is the assistant's.
        header = messages[-1].get("role") == "assistant"
        offset = len(_chat(tokenizer, messages[:-1], tools, add_generation_prompt=header))
    return ids[:max_seq_length], offset


def pad_length(longest: int, max_seq_length: int, multiple: int = 32) -> int:
    """Round up so a compiled step sees few distinct shapes."""
    return min(max_seq_length, multiple * math.ceil(longest / multiple))


def collate(
    rows: list[list[int]],
    examples: list[Example],
    length: int,
    position: int,
    offsets: list[int] | None = None,
) -> Batch:
    tokens = np.zeros((len(rows), length), dtype=np.int32)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
    return Batch(
        tokens=tokens,
        lengths=np.array([len(r) for r in rows], dtype=np.int32),
        auth_weight=np.array([e.auth_weight or 0.0 for e in examples], dtype=np.float32),
        prov_entropy=np.array([e.prov_entropy or 0.0 for e in examples], dtype=np.float32),
        position=position,
        offsets=np.array(offsets or [0] * len(rows), dtype=np.int32),
    )


def iterate_batches(
    path: str | Path,
    tokenizer,
    batch_size: int,
    max_seq_length: int,
    start: int = 0,
    mask_prompt: bool = False,
    loop: bool = True,
) -> Iterator[Batch]:
    """Batches in file order, endlessly (epoch after epoch) unless `loop` is false, when a last
    short batch ends it; each knows where the next begins."""
    fmt = file_format(Path(path))
    rows, examples, offsets = [], [], []
    position = start
    while True:
        for example, position in read_examples(path, start, fmt):
            ids, offset = tokens_of(example, tokenizer, max_seq_length, mask_prompt)
            rows.append(ids), examples.append(example), offsets.append(offset)
            if len(rows) == batch_size:
                length = pad_length(max(len(r) for r in rows), max_seq_length)
                yield collate(rows, examples, length, position, offsets)
                rows, examples, offsets = [], [], []
        start = 0
        if not loop:
            if rows:
                length = pad_length(max(len(r) for r in rows), max_seq_length)
                yield collate(rows, examples, length, position, offsets)
            return


def packed_batch(path: str | Path, tokenizer, batch_size: int, max_seq_length: int) -> Batch:
    """Real text packed into full-length rows: the worst case a training run can meet."""
    stream: list[int] = []
    examples = []
    need = batch_size * max_seq_length
    while len(stream) < need:
        before = len(stream)
        for example, _ in read_examples(path):
            stream.extend(tokens_of(example, tokenizer, max_seq_length)[0])
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
