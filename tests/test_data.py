"""JSONL validation, streaming and batching."""

import json

import pytest

from tests.conftest import ROOT, refused
from your_ai import data
from your_ai.errors import UserError

GOOD = {"text": "A ship's logbook records the tide.", "auth_weight": 0.1, "prov_entropy": 4.0}

BAD_LINES = [
    ('{"text": "unterminated", ', "malformed JSON"),
    (json.dumps({"text": "no weight", "prov_entropy": 1.0}), "missing field 'auth_weight'"),
    (json.dumps({"text": "x", "auth_weight": 0.1}), "missing field 'prov_entropy'"),
    (json.dumps({**GOOD, "auth_weight": 1.0}), "auth_weight=1.0 is outside [0, 0.99]"),
    (json.dumps({**GOOD, "auth_weight": -0.1}), "auth_weight=-0.1 is outside [0, 0.99]"),
    (json.dumps({**GOOD, "prov_entropy": -2}), "prov_entropy=-2 must be >= 0"),
    (json.dumps({**GOOD, "auth_weight": "high"}), "auth_weight='high' is not a number"),
    (json.dumps({**GOOD, "text": ""}), "text must be a non-empty string"),
    ('{"text": "x", "auth_weight": 0.1, "prov_entropy": 1' + "0" * 400 + "}", "not a finite"),
    ('{"text": "x", "auth_weight": 0.1, "prov_entropy": Infinity}', "not a finite"),
]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "train.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), line])
    with pytest.raises(UserError) as err:
        data.validate(path)
    assert str(err.value).startswith(f"{path}:4: ")
    assert message in str(err.value)


def test_sample_file_is_valid():
    assert data.validate(ROOT / "data" / "sample.jsonl") >= 200


def test_batches_stream_and_resume_from_a_position(tmp_path):

    lines = [json.dumps({**GOOD, "text": f"line number {i}"}) for i in range(10)]
    path = write(tmp_path / "train.jsonl", lines)

    class Bytes:  # a byte tokenizer is enough to check positions
        eos_token_id = 0

        def encode(self, text):
            return list(text.encode())

    straight = data.iterate_batches(path, Bytes(), 3, 64)
    first, second, third = next(straight), next(straight), next(straight)
    resumed = next(data.iterate_batches(path, Bytes(), 3, 64, start=first.position))
    assert (resumed.tokens == second.tokens).all()
    # Endless: the fourth batch wraps into the next epoch.
    fourth = next(straight)
    assert fourth.lengths.shape == (3,)
    assert third.position == len(path.read_bytes()) - len(lines[-1]) - 1
    # Padding is excluded by lengths; rows are padded to a multiple of 32, at most max_seq_length.
    assert first.tokens.shape[1] == 32 and first.lengths.max() <= 32


def test_training_refuses_bad_data_with_one_line(make_cfg, tmp_path, capsys):
    from your_ai import train

    path = write(
        tmp_path / "bad.jsonl",
        [json.dumps(GOOD)] * 3 + ['{"text": "x", "auth_weight": 2, "prov_entropy": 1}'],
    )
    cfg = make_cfg(f"data.train_file={path}", "training.max_steps=2")
    assert refused(train.run, cfg, capsys) == (
        f"error: {path}:4: auth_weight=2 is outside [0, 0.99]"
    )
    assert not (tmp_path / "run" / "adapters").exists()  # paths.output_dir
