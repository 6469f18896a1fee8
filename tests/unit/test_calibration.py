"""Temperature scaling of exit confidences (tiers/calibration.py): pure numpy, no I/O."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tierflow.tiers import calibration as cal

Floats = npt.NDArray[np.float64]


def softmax(z: Floats) -> Floats:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: Floats = e / e.sum(axis=1, keepdims=True)
    return out


def overconfident_split(rng: np.random.Generator, n: int, k: float, classes: int = 10
                        ) -> tuple[Floats, npt.NDArray[np.int64]]:
    """Labels drawn from softmax(z), the model's output softmax(k * z): T = k undoes the sharpening."""
    z = rng.normal(0.0, 1.5, (n, classes))
    truth = softmax(z)
    labels = (truth.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return softmax(k * z).astype(np.float32), labels.astype(np.int64)


# -- the acceptance test: a known temperature is recovered and the test-split ECE at least halves -------------


@pytest.mark.parametrize("k", [2.5, 4.0, 0.5])
def test_a_known_temperature_is_recovered_within_10_percent_and_test_ece_at_least_halves(k: float) -> None:
    rng = np.random.default_rng(7)
    val_p, val_y = overconfident_split(rng, 20_000, k)
    test_p, test_y = overconfident_split(rng, 20_000, k)

    # Fit on the validation split, measure on the test split.
    (exit0,) = cal.calibrate_exits([val_p], val_y, [test_p], test_y)

    assert abs(exit0.temperature - k) / k < 0.10
    assert exit0.ece_after <= exit0.ece_before / 2
    assert exit0.nll_after < exit0.nll_before
    assert exit0.n_fit == exit0.n_measured == 20_000
    assert exit0.accuracy == pytest.approx(float((test_p.argmax(axis=1) == test_y).mean()))


def test_a_well_calibrated_exit_keeps_a_temperature_near_one() -> None:
    rng = np.random.default_rng(3)
    p, y = overconfident_split(rng, 20_000, 1.0)
    assert cal.fit_temperature(p, y) == pytest.approx(1.0, abs=0.05)


def test_the_fitted_temperature_minimises_the_negative_log_likelihood() -> None:
    rng = np.random.default_rng(11)
    p, y = overconfident_split(rng, 5_000, 3.0)
    t = cal.fit_temperature(p, y)
    best = cal.nll(p, y, t)
    for other in (t * 0.97, t * 1.03, 1.0, 10.0):
        assert best <= cal.nll(p, y, other)


def test_every_sample_right_and_certain_wants_the_smallest_temperature() -> None:
    p = np.array([[0.99, 0.01], [0.02, 0.98]])
    assert cal.fit_temperature(p, np.array([0, 1])) == cal.T_MIN


def test_uniform_outputs_give_temperature_one() -> None:
    assert cal.fit_temperature(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0])) == 1.0


# -- confidence -------------------------------------------------------------------------------------------------


def test_calibrated_confidence_is_the_maximum_of_the_calibrated_probabilities() -> None:
    rng = np.random.default_rng(1)
    p, _ = overconfident_split(rng, 100, 3.0)
    for t in (0.5, 1.0, 3.0):
        q = cal.calibrated_probs(p, t)
        assert np.allclose(q.sum(axis=1), 1.0)
        assert np.allclose(cal.calibrated_confidence(p, t), q.max(axis=1), rtol=1e-12)
        assert (q.argmax(axis=1) == p.argmax(axis=1)).all()  # scaling never changes the class


def test_temperature_one_leaves_probabilities_as_they_are() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    assert np.allclose(cal.calibrated_confidence(p, 1.0), [0.7, 0.5])


def test_a_higher_temperature_lowers_the_confidence() -> None:
    p = np.array([[0.9, 0.05, 0.05]])
    assert cal.calibrated_confidence(p, 2.0)[0] < 0.9 < cal.calibrated_confidence(p, 0.5)[0]


def test_exact_zeros_are_clipped_not_infinite() -> None:
    p = np.array([[1.0, 0.0, 0.0]])
    assert np.isfinite(cal.log_probs(p)).all()
    assert cal.calibrated_confidence(p, 50.0)[0] < 1.0


# -- expected calibration error -----------------------------------------------------------------------------


def test_ece_by_hand() -> None:
    # 0.05 falls in bin 1 of 15 ((0, 1/15]); both 0.95s in bin 15 ((14/15, 1]), half of them right.
    ece = cal.expected_calibration_error([0.05, 0.95, 0.95], [False, True, False])
    assert ece == pytest.approx(1 / 3 * 0.05 + 2 / 3 * abs(0.5 - 0.95))


def test_ece_bins_are_closed_on_the_right() -> None:
    # 1/15 belongs with 0.01 in bin 1: |mean(correct) - mean(conf)| is taken over both together.
    ece = cal.expected_calibration_error([1 / 15, 0.01], [True, False])
    assert ece == pytest.approx(abs(0.5 - (1 / 15 + 0.01) / 2))
    assert cal.expected_calibration_error([0.0], [False]) == 0.0  # 0 goes to the first bin


def test_a_perfectly_calibrated_exit_has_zero_ece() -> None:
    assert cal.expected_calibration_error([0.5, 0.5, 1.0], [True, False, True]) == pytest.approx(0.0)


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("probs", "labels", "match"), [
    (np.array([[0.5, np.nan]]), np.array([0]), "NaN"),
    (np.array([0.5, 0.5]), np.array([0]), "2-D"),
    (np.array([[0.5, 0.5]]), np.array([2]), "class indices"),
    (np.array([[0.5, 0.5]]), np.array([0, 1]), "1 class indices"),
    (np.zeros((0, 2)), np.zeros(0, np.int64), "no samples"),
])
def test_bad_input_is_refused_with_a_clear_error(probs: Floats, labels: npt.NDArray[np.int64], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cal.fit_temperature(probs, labels)


def test_bad_temperatures_and_bins_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        cal.calibrated_confidence(np.array([[0.5, 0.5]]), 0.0)
    with pytest.raises(ValueError, match="n_bins"):
        cal.expected_calibration_error([0.5], [True], n_bins=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cal.expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError, match="same, non-zero number"):
        cal.calibrate_exits([np.array([[0.5, 0.5]])], np.array([0]), [], np.array([0]))


def test_the_record_of_an_exit_is_json_ready() -> None:
    rng = np.random.default_rng(5)
    p, y = overconfident_split(rng, 500, 2.0)
    (record,) = [e.to_json() for e in cal.calibrate_exits([p], y, [p], y)]
    assert set(record) >= {"exit", "temperature", "accuracy", "ece_before", "ece_after", "n_fit", "n_measured"}
    assert all(isinstance(v, int | float) for v in record.values())
