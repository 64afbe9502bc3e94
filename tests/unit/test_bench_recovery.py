"""bench/recovery_explore.py's arm settings and batch splitting (the run itself needs the
real MiniLM and minutes of training: it is an exploration, its results in bench/results)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [sparsify] extra")

from bench.recovery_explore import arm_label, curve_lines, parse_arm, split  # noqa: E402


def test_an_arm_fills_in_the_defaults_and_parses_each_setting() -> None:
    assert parse_arm("", 150) == {
        "lr": 3e-4, "steps": 150, "batch": 32, "hidden": 1.0, "relation": 1.0, "precision": "auto",
    }  # fmt: skip
    arm = parse_arm("lr=1e-3,batch=16,steps=300,hidden=0,relation=0.5,precision=fp32", 150)
    assert arm == {
        "lr": 1e-3, "steps": 300, "batch": 16, "hidden": 0.0, "relation": 0.5, "precision": "fp32",
    }  # fmt: skip
    assert arm_label(arm) == "lr 0.001, steps 300, batch 16, hidden 0, relation 0.5, precision fp32"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("depth=3", "unknown setting 'depth'"),
        ("batch=12", "batch must be 8, 16 or 32"),
        ("precision=fp16", "precision must be auto, fp32 or bf16"),
    ],
)
def test_a_bad_arm_is_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        parse_arm(text, 150)


def test_split_cuts_every_batch_into_parts_keeping_rows_and_padding() -> None:
    ids = torch.arange(32 * 5).reshape(32, 5)
    batches = [{"input_ids": ids, "attention_mask": torch.ones(32, 5)}]
    parts = split(batches, 16)
    assert [tuple(p["input_ids"].shape) for p in parts] == [(16, 5), (16, 5)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), ids)
    assert all(p["attention_mask"].shape == (16, 5) for p in parts)


def test_a_learning_curve_is_a_table_per_arm_that_has_one() -> None:
    def fidelity(mean: float) -> dict[str, float]:
        return {"cosine_mean": mean, "cosine_min": mean - 0.2, "top1_agreement": 0.5}

    rows = {
        "cut": {"fidelity": {}},
        "lr 0.0003": {"curve": [[250, {"chunks": fidelity(0.91), "literature": fidelity(0.9)}]]},
        "lr 0.001": {"curve": []},
    }
    lines = curve_lines(rows)
    assert lines[0] == "While it trained: lr 0.0003"
    assert "| 250 | 0.9100 / 0.9000 | 0.710 / 0.700 | 0.500 / 0.500 |" in lines
    assert not any("lr 0.001" in line for line in lines)


def test_a_curve_measured_on_training_chunks_too_has_their_column() -> None:
    """`--measure-train`: each point also gives the fidelity on training chunks, the
    column that tells a student short of text (it fits what it saw far better) from one
    short of capacity."""

    def fidelity(mean: float) -> dict[str, float]:
        return {"cosine_mean": mean, "cosine_min": mean - 0.2, "top1_agreement": 0.5}

    point = {"chunks": fidelity(0.95), "literature": fidelity(0.94), "training": fidelity(0.99)}
    lines = curve_lines({"steps 12000": {"curve": [[3000, point]]}})
    assert "| step | cosine mean | cosine min | top-1 | cosine mean, training chunks |" in lines
    assert "| 3000 | 0.9500 / 0.9400 | 0.750 / 0.740 | 0.500 / 0.500 | 0.9900 |" in lines


def test_fidelities_measure_training_chunks_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import minilm_setup
    from sparseserve.sparsify.catalog import LabelledData

    def batch(rows: int, first: int) -> dict[str, np.ndarray]:
        ids = np.arange(first, first + rows)[:, None].repeat(3, axis=1)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    data = LabelledData([batch(4, 0), batch(4, 4)], None, [batch(2, 100)], None, "held out",
                        [batch(2, 200)])  # fmt: skip
    monkeypatch.setattr(minilm_setup, "run_torch", lambda model, rows: rows)
    monkeypatch.setattr(minilm_setup, "fidelity", lambda dense, got: len(got))
    plain = minilm_setup.Fidelities.of(None, data)  # type: ignore[arg-type]
    assert set(plain.tests) == {"chunks", "literature"}
    measured = minilm_setup.Fidelities.of(None, data, training=6)  # type: ignore[arg-type]
    rows = measured.tests["training"]
    assert sum(len(b["input_ids"]) for b in rows) == 8  # whole batches holding 6 or more
    assert rows[0]["input_ids"][0, 0] == 0  # the first training chunks
    assert set(measured.measure(None)) == {"chunks", "literature", "training"}  # type: ignore[arg-type]
