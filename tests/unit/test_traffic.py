"""The traffic policy file (validation, hot reload keeping the last good policy) and the
shadow comparison arithmetic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sparseserve.errors import InvalidInput
from sparseserve.routing.shadow import compare
from sparseserve.routing.traffic import PolicyFile, TrafficPolicy, TrafficPolicyError
from sparseserve.settings import Settings

GOOD = """
families:
  digits-mlp:
    split: {dense: 1, pruned90: 3}
    shadow: {variants: [dense], fraction: 0.1}
  digits-cnn:
    default: dense
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_policy_round_trips_through_yaml(tmp_path: Path) -> None:
    policy = TrafficPolicy.read(write(tmp_path / "p.yaml", GOOD))
    mlp = policy.families["digits-mlp"]
    assert mlp.weights == {"dense": 0.25, "pruned90": 0.75}
    assert (mlp.shadow.variants, mlp.shadow.fraction) == (["dense"], 0.1)  # type: ignore[union-attr]
    assert policy.families["digits-cnn"].default == "dense"
    again = TrafficPolicy.read(write(tmp_path / "again.yaml", policy.to_yaml()))
    assert again == policy


def test_an_empty_file_is_an_empty_policy(tmp_path: Path) -> None:
    assert TrafficPolicy.read(write(tmp_path / "p.yaml", "")).families == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("families: {f: {default: a, split: {a: 1}}}", "not both"),
        ("families: {f: {split: {}}}", "split is empty"),
        ("families: {f: {split: {a: -1, b: 2}}}", "weights are >= 0"),
        ("families: {f: {split: {a: 0}}}", "sum to 0"),
        ("families: {f: {split: {a: .nan}}}", "weights are >= 0"),
        ("families: {f: {shadow: {variants: [], fraction: 0.5}}}", "at least 1"),
        ("families: {f: {shadow: {variants: [a, a]}}}", "more than once"),
        ("families: {f: {shadow: {variants: [a], fraction: -0.1}}}", "greater than or equal"),
        ("families: {f: {shadow: {variants: [a], sample: 1}}}", "sample"),
        ("families: {f: {defualt: a}}", "defualt"),
        ("family: {}", "family"),
        ("[1, 2]", "mapping"),
        ("families: {f: {default: ''}}", "at least 1 character"),
    ],
)
def test_bad_policies_are_rejected_saying_where(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path / "p.yaml", text)
    with pytest.raises(TrafficPolicyError) as info:
        TrafficPolicy.read(path)
    assert str(path) in str(info.value) and says in str(info.value)


def test_the_file_is_reread_only_when_it_changes_and_a_bad_one_keeps_the_last_good(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.yaml", "families: {f: {default: a}}")
    source = PolicyFile(path)
    assert source.policy.families["f"].default == "a" and not source.state.error
    first = source.state
    assert source.refresh() is False and source.state is first  # unchanged file

    write(tmp_path / "next.yaml", "families: {f: {default: b, oops: 1}}").replace(path)
    assert source.refresh() is False
    assert source.policy.families["f"].default == "a"  # kept
    assert "oops" in source.state.error and source.state.loaded_at == first.loaded_at

    path.unlink()
    assert source.refresh() is False and "cannot read" in source.state.error

    write(tmp_path / "next.yaml", "families: {f: {default: b}}").replace(path)
    assert source.refresh() is True
    assert source.policy.families["f"].default == "b" and not source.state.error


def test_a_missing_file_at_start_is_no_policy_and_says_why(tmp_path: Path) -> None:
    source = PolicyFile(tmp_path / "absent.yaml")
    assert source.policy.families == {} and "cannot read" in source.state.error
    assert PolicyFile(None).state.error == ""


def test_the_policy_file_setting_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPARSESERVE_TRAFFIC__POLICY_FILE", os.path.join("etc", "traffic.yaml"))
    settings = Settings.load()
    assert settings.traffic.policy_file == Path("etc/traffic.yaml")
    assert settings.traffic.shadow_queue_size == 64 and settings.traffic.shadow_concurrency == 1


# -- comparison ---------------------------------------------------------------------------


def test_identical_outputs_agree_fully() -> None:
    scores = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    result = compare({"y": scores}, {"y": scores.copy()}, classifier=True)
    assert result.rows == 5 and result.top1_agreements == 5
    np.testing.assert_allclose(result.cosine, 1.0)
    np.testing.assert_array_equal(result.max_abs_diff, 0.0)


def test_rows_are_compared_one_by_one() -> None:
    answer = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    shadow = np.array([[0.0, 1.0, 0.0], [0.0, 2.5, 0.5], [0.0, 0.0, 0.0]])
    result = compare({"y": answer}, {"y": shadow}, classifier=True)
    np.testing.assert_allclose(result.cosine, [0.0, 2.5 * 2 / (2 * np.hypot(2.5, 0.5)), 1.0])
    np.testing.assert_allclose(result.max_abs_diff, [1.0, 0.5, 0.0])
    assert result.top1_agreements == 2  # rows 2 and 3 (all-zero rows: class 0 both)
    assert compare({"y": answer}, {"y": shadow}, classifier=False).top1_agreements is None


def test_every_common_output_counts_and_top1_reads_the_first() -> None:
    answer = {"logits": np.array([[1.0, 3.0]]), "extra": np.array([[5.0]])}
    shadow = {"logits": np.array([[1.0, 3.0]]), "extra": np.array([[7.0]])}
    result = compare(answer, shadow, classifier=True)
    assert result.max_abs_diff.tolist() == [2.0] and result.top1_agreements == 1
    assert result.cosine[0] < 1.0


def test_outputs_that_cannot_be_compared_raise() -> None:
    with pytest.raises(InvalidInput, match="shape"):
        compare({"y": np.zeros((2, 3))}, {"y": np.zeros((2, 4))}, classifier=False)
    text = np.array([b"a"], dtype=object)
    with pytest.raises(InvalidInput, match="no numeric output"):
        compare({"t": text}, {"t": text}, classifier=False)


def test_non_finite_outputs_do_not_break_the_histograms() -> None:
    answer = np.array([[np.nan, 1.0], [np.inf, 1.0]])
    result = compare({"y": answer}, {"y": np.ones((2, 2))}, classifier=False)
    assert np.isfinite(result.cosine).all()
    assert (result.max_abs_diff == np.inf).all()


def test_zero_rows_compare_to_nothing() -> None:
    result = compare({"y": np.zeros((0, 3))}, {"y": np.zeros((0, 3))}, classifier=True)
    assert (result.rows, result.top1_agreements, result.cosine.size) == (0, 0, 0)
