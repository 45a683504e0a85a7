"""mlx-lm's data formats in the trainer: text, chat and prompt/completion, prompt masking,
optional distrust fields, and a validation set."""

import io
import json

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import refused
from your_ai import train

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Where does the tide go?"},
            {"role": "assistant", "content": "Out, then back."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Log?"},
            {"role": "assistant", "content": "Kept daily."},
        ]
    },
]
FILES = {
    "text": [{"text": "A ship's logbook records the tide."}, {"text": "Dawn, calm sea."}],
    "chat": CHAT,
    "completions": [
        {"prompt": "The tide at dawn was", "completion": " low and still."},
        {"prompt": "Wind:", "completion": " north-east, force 3."},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def by_hand(tokenizer, row: dict, mask_prompt: bool) -> tuple[list[int], int]:
    """The row's tokens and the first one the loss counts, from the embedded tokenizer's chat
    template written out as text (`<|role|>`, newline, content, `</s>`, newline per turn)."""
    if "text" in row:
        return tokenizer.encode(row["text"]) + [tokenizer.eos_token_id], 1
    turns = row.get("messages") or [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]
    render = lambda ms: "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in ms)  # noqa: E731
    ids = tokenizer.encode(render(turns))
    prompt = render(turns[:-1]) + "<|assistant|>\n"
    return ids, len(tokenizer.encode(prompt)) if mask_prompt else 1


def log_probs(model, ids: list[int]) -> np.ndarray:
    """log p(next token) at each position of `ids[:-1]`, in float64."""
    logits = np.array(model(mx.array([ids[:-1]]))[0].astype(mx.float32), dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def cross_entropy_by_hand(model_path: str, rows: list[dict], mask_prompt: bool) -> float:
    """Mean next-token cross-entropy of the base model over the counted tokens of `rows`,
    each row run on its own, in float64."""
    from mlx_lm import load

    model, tokenizer = load(model_path)
    total, count = 0.0, 0
    for row in rows:
        ids, first = by_hand(tokenizer, row, mask_prompt)
        logp = log_probs(model, ids)
        for t in range(first, len(ids)):  # token t predicted from position t - 1
            total -= logp[t - 1, ids[t]]
            count += 1
    return total / count


SMALL = ("lora.rank=4", "lora.num_layers=2", "training.batch_size=2", "training.max_steps=1")


@pytest.mark.parametrize(
    ("fmt", "mask_prompt"),
    [("text", False), ("chat", False), ("chat", True), ("completions", True)],
)
def test_each_format_trains_on_the_loss_computed_by_hand(make_cfg, tmp_path, fmt, mask_prompt):
    path = write_jsonl(tmp_path / "train.jsonl", FILES[fmt])
    cfg = make_cfg(f"data.train_file={path}", f"data.mask_prompt={mask_prompt}", *SMALL)
    printed = io.StringIO()
    result = train.run(cfg, out=printed)
    # The first step's loss is the base model's: LoRA's B matrices start at zero.
    expected = cross_entropy_by_hand(str(cfg.model.path), FILES[fmt], mask_prompt)
    assert result["metrics"]["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["metrics"]["cross_entropy"] == pytest.approx(expected, rel=1e-4)
    lines = printed.getvalue().splitlines()
    assert f"2 {fmt} examples in {path}" in lines[0]
    plain = [line for line in lines if "plain cross-entropy" in line]
    assert plain == [
        f"{path}: no auth_weight and prov_entropy fields: training on plain cross-entropy "
        "(no distrust term)"
    ]


def test_distrust_fields_on_some_lines_only_are_refused(make_cfg, tmp_path, capsys):
    given = {"auth_weight": 0.2, "prov_entropy": 3.0}
    rows = [{"text": "one", **given}, {"text": "two", **given}, {"text": "three"}, {"text": "4"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(f"data.train_file={path}", *SMALL)
    assert refused(train.run, cfg, capsys) == (
        f"error: {path}:3: missing fields auth_weight and prov_entropy, which line 1 gives "
        "(a file gives them on every line or on none)"
    )
    assert not (tmp_path / "run").exists()


def test_prompt_masking_of_text_data_is_refused(make_cfg, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", FILES["text"])
    cfg = make_cfg(f"data.train_file={path}", "data.mask_prompt=true", *SMALL)
    assert refused(train.run, cfg, capsys) == (
        f"error: data.mask_prompt=true: {path} holds text data, which has no prompt to mask "
        "(chat or prompt/completion data has)"
    )


def test_validation_loss_at_eval_every_and_at_the_end(make_cfg, tmp_path):
    """A directory as mlx-lm's --data takes it: train.jsonl and valid.jsonl."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", CHAT * 2)
    write_jsonl(data_dir / "valid.jsonl", FILES["completions"] * 3)  # 3 batches of 2
    cfg = make_cfg(
        f"data.train_file={data_dir}",
        "training.eval_every=2",
        "training.val_batches=2",
        "training.log_every=100",
        *SMALL[:3],
        "training.max_steps=5",
    )
    printed = io.StringIO()
    result = train.run(cfg, out=printed)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4, 5]
    lines = [line for line in printed.getvalue().splitlines() if "val_loss" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4", "step 5"]
    # The last figure is the trained model's mean cross-entropy over the first 2 batches (4
    # rows) of the validation file, every token counted but each row's first.
    model, tokenizer = result["model"], result["tokenizer"]
    total, count = 0.0, 0
    for row in (FILES["completions"] * 3)[:4]:
        ids, first = by_hand(tokenizer, row, mask_prompt=False)
        logp = log_probs(model, ids)
        total -= sum(logp[t - 1, ids[t]] for t in range(first, len(ids)))
        count += len(ids) - first
    assert metrics[-1]["val_loss"] == pytest.approx(total / count, rel=1e-4)
    assert f"val_loss {metrics[-1]['val_loss']:.4f}" in lines[-1]


def test_a_byte_tokenizer_built_without_a_chat_template_gains_it(tmp_path):
    from your_ai import models

    directory = tmp_path / "byte-tokenizer"
    models.embedded_tokenizer(tmp_path)
    (directory / "chat_template.jinja").unlink()  # as built before it had one
    tokenizer = models.embedded_tokenizer(tmp_path)
    ids = tokenizer.apply_chat_template(CHAT[0]["messages"], return_dict=False)
    assert tokenizer.decode(ids) == (
        "<|user|>\nWhere does the tide go?</s>\n<|assistant|>\nOut, then back.</s>\n"
    )
