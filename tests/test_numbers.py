"""Numbers worked out by hand: metrics on a few rows, the loss's reduction, and the best epoch
restored from a run whose epochs differ in ways the test controls."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from cockatoo_lib.evaluation.metrics import (
    label_confusion,
    macro_f1,
    mean_average_precision,
    report,
    sigmoid,
    sweep_thresholds,
)
from cockatoo_lib.training.losses import _reduce, masked_bce

# Six rows, three labels. Label 1 is not annotated on rows 2 and 3 (row 2 says positive, but
# that must not count); label 2 has no positive among its annotated rows (no support).
PROBS = np.array([[0.9, 0.6, 0.6], [0.8, 0.7, 0.1], [0.4, 0.9, 0.1],
                  [0.3, 0.2, 0.1], [0.7, 0.1, 0.1], [0.1, 0.4, 0.1]])
Y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
M = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]])


def test_macro_and_micro_f1_at_one_half_by_hand():
    # Label 0: tp rows 0, 4; fp row 1; fn row 2: F1 = 4 / 6. Label 1 on rows 0, 1, 4, 5:
    # tp row 1, fp row 0: F1 = 2 / 3. Label 2: no support, left out of the macro average.
    assert macro_f1(PROBS, Y, M, 0.5) == pytest.approx(2 / 3)
    result = report(PROBS, Y, M, ["a", "b", "c"], [0.5] * 3)
    assert result["labels_without_support"] == ["c"]
    # Micro: tp 2 + 1, fp 1 + 1 + 1 (label 2, row 0), fn 1: 6 / (6 + 3 + 1).
    assert result["micro_f1"] == pytest.approx(0.6)
    for j, label in enumerate("ab"):  # sklearn on the annotated rows agrees
        rows = M[:, j] == 1
        assert result["per_label"][label]["f1"] == pytest.approx(f1_score(Y[rows, j], PROBS[rows, j] >= 0.5))
    assert result["per_label"]["a"]["confusion_matrix"] == [[2, 1], [1, 2]]
    assert result["per_label"]["b"]["annotated"] == 4 and result["per_label"]["b"]["support"] == 1


def test_label_confusion_by_hand():
    # Rows truly positive for i (annotated) against predictions for j (annotated): label 0's
    # positives (rows 0, 2, 4) were predicted [1, 1, 1], [0, 0, 0] (row 2: label 1 not
    # annotated, so not counted), [1, 0, 0].
    assert label_confusion(PROBS, Y, M, [0.5] * 3) == [[2, 1, 1], [1, 1, 0], [0, 0, 0]]


def test_threshold_sweep_by_hand():
    thresholds, tuned = sweep_thresholds(PROBS, Y, M)
    grid = np.linspace(0, 1, 102)[1:-1]
    # Label 0: any threshold in (0.3, 0.4] keeps 0.9, 0.8, 0.7, 0.4: tp 3, fp 1: F1 6 / 7, the
    # best; the lowest grid point there is 31 / 101.
    assert thresholds[0] == pytest.approx(31 / 101, abs=1e-6) and grid[30] == pytest.approx(31 / 101)
    # Label 1 on its annotated rows: (0.6, 0.7] separates perfectly (row 2's 0.9 is masked).
    assert thresholds[1] == pytest.approx(61 / 101, abs=1e-6)
    # Label 2: no positive to tune on: 0.5, and marked untuned.
    assert thresholds[2] == 0.5 and tuned == [True, True, False]
    assert macro_f1(PROBS, Y, M, thresholds) == pytest.approx((6 / 7 + 1) / 2)


def test_flags_on_unannotated_rows_cost_a_share_of_a_false_positive_when_tuning():
    # One annotated positive (0.6), one annotated negative (0.2), two rows whose source does not
    # annotate the label (0.5, 0.55).
    probs, y, m = np.array([[0.6], [0.2], [0.5], [0.55]]), np.array([[1], [0], [0], [0]]), \
        np.array([[1], [1], [0], [0]])
    # Unannotated rows ignored: the lowest threshold above 0.2 is perfect.
    assert sweep_thresholds(probs, y, m)[0] == [pytest.approx(21 / 101, abs=1e-6)]
    # Each flag there a tenth of a false positive: F1 2 / (2 + 0.2) there, 1 above 0.55.
    for cost in (0.1, 1.0):
        tuned, _ = sweep_thresholds(probs, y, m, unannotated_flag_cost=cost)
        assert tuned == [pytest.approx(56 / 101, abs=1e-6)]


def test_threshold_ties_take_the_lowest():
    # Every threshold up to 0.2 gives F1 2/3; above, 0.
    thresholds, _ = sweep_thresholds(np.array([[0.2], [0.6]]), np.array([[1], [0]]), np.ones((2, 1)))
    assert thresholds == [pytest.approx(1 / 101, abs=1e-6)]


def test_sigmoid_by_hand():
    logits = np.array([0.0, np.log(3.0), -np.log(3.0), 800.0, -800.0], dtype=np.float32)
    with np.errstate(over="ignore"):
        probs = sigmoid(logits)
    assert probs.dtype == np.float64
    assert probs == pytest.approx([0.5, 0.75, 0.25, 1.0, 0.0])


def test_a_probability_equal_to_its_threshold_is_positive():
    probs, y, m = np.array([[0.5], [0.2]]), np.array([[1], [0]]), np.ones((2, 1))
    assert macro_f1(probs, y, m, 0.5) == 1.0
    assert report(probs, y, m, ["a"], [0.5])["per_label"]["a"]["recall"] == 1.0
    assert label_confusion(probs, y, m, [0.5]) == [[1]]


def test_f1_without_any_positive_or_prediction_is_zero_and_labels_without_support_average_zero():
    probs, y, m = np.array([[0.1], [0.2]]), np.zeros((2, 1)), np.ones((2, 1))
    assert macro_f1(probs, y, m, 0.5) == 0.0  # no label has support
    row = report(probs, y, m, ["a"], [0.5])
    assert (row["micro_f1"], row["per_label"]["a"]["precision"], row["per_label"]["a"]["f1"]) == (0, 0, 0)
    # One predicted positive, no true one: precision 0 (sklearn's zero_division=0), not 1.
    row = report(np.array([[0.9], [0.2]]), y, m, ["a"], [0.5])["per_label"]["a"]
    assert (row["precision"], row["recall"], row["roc_auc"], row["pr_auc"]) == (0.0, 0.0, None, None)


def test_mean_average_precision_by_hand():
    # Label 0 on rows 0-3 (row 4 unannotated): scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg):
    # AP = (1 + 2/3) / 2. Label 1: perfect ranking, AP 1. Label 2: one class only, left out.
    probs = np.array([[0.9, 0.8, 0.5], [0.8, 0.1, 0.5], [0.7, 0.9, 0.5], [0.1, 0.2, 0.5], [0.95, 0.3, 0.5]])
    y = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    m = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert mean_average_precision(probs, y, m) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert mean_average_precision(probs[:, 2:], y[:, 2:], m[:, 2:]) == 0.0  # nothing to rank


def test_the_sweep_never_offers_0_or_1_and_reaches_the_top_of_the_grid():
    # Only a threshold above 0.985 separates these: the highest grid point, 100 / 101.
    thresholds, tuned = sweep_thresholds(np.array([[0.995], [0.985]]), np.array([[1], [0]]), np.ones((2, 1)))
    assert thresholds == [pytest.approx(100 / 101, abs=1e-6)] and tuned == [True]


def test_report_agrees_with_sklearn_on_ranking_metrics_and_with_macro_f1():
    from sklearn.metrics import average_precision_score, roc_auc_score

    result = report(PROBS, Y, M, ["a", "b", "c"], [0.5] * 3)
    assert result["macro_f1"] == macro_f1(PROBS, Y, M, [0.5] * 3)
    y, p = Y[M[:, 0] == 1, 0], PROBS[M[:, 0] == 1, 0]
    assert result["per_label"]["a"]["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert result["per_label"]["a"]["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert result["per_label"]["c"]["roc_auc"] is None  # one class only


def test_label_confusion_counts_are_whole_numbers():
    assert all(type(v) is int for row in label_confusion(PROBS, Y, M, [0.5] * 3) for v in row)


def test_a_probability_on_a_grid_point_is_positive_at_that_threshold():
    grid = np.linspace(0, 1, 102)[1:-1]
    probs = np.array([[grid[30]], [grid[29]]])  # 31/101 (positive) and 30/101 (negative)
    thresholds, _ = sweep_thresholds(probs, np.array([[1], [0]]), np.ones((2, 1)))
    assert thresholds == [pytest.approx(31 / 101, abs=1e-6)]


@pytest.mark.parametrize("loss", ["asl", "bce"])
def test_label_weights_scale_each_labels_term(loss):
    from cockatoo_lib.training.losses import asymmetric_loss

    fn = asymmetric_loss if loss == "asl" else masked_bce
    logits, targets, mask = torch.tensor([[0.3, -1.2]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)
    single = [fn(logits[:, [j]], targets[:, [j]], mask[:, [j]]) for j in range(2)]
    weighted = fn(logits, targets, mask, weights=torch.tensor([2.0, 0.5]))
    assert weighted.item() == pytest.approx((2.0 * single[0].item() + 0.5 * single[1].item()) / 2)


def test_loss_is_the_mean_over_each_rows_annotated_labels_then_over_annotated_rows():
    per_element = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # Row 0: (1 + 2) / 2; row 1: 6; row 2 annotates nothing. Not 3.0 (masked mean over
    # elements), not 2.5 (over all rows).
    assert _reduce(per_element, mask).item() == pytest.approx((1.5 + 6) / 2)
    weights = torch.tensor([1.0, 2.0, 1.0])  # label weights scale their terms
    assert _reduce(per_element, mask, weights).item() == pytest.approx(((1 + 4) / 2 + 6) / 2)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = ((bce[0, 0] + bce[0, 2]) / 2 + bce[1, 2]) / 2
    assert masked_bce(logits, targets, mask).item() == pytest.approx(expected.item())


def test_the_restored_weights_are_the_best_epochs(tiny_models, small_data, tmp_path, monkeypatch):
    """Validation says epoch 2 is best (0.2, 0.9, 0.5): the saved weights are epoch 2's."""
    import cockatoo_lib.training.trainer as train_module
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize

    sequence = iter([0.2, 0.9, 0.5])  # then the final prediction on validation: 0
    monkeypatch.setattr(train_module, "_compute_metrics",
                        lambda pred, **_: {"f1": next(sequence, 0.0), "map": 0.0, "f1_at_0_5": 0.0})
    snapshots = []
    original = train_module.CockatooTrainer.evaluate

    def evaluate(self, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_module.CockatooTrainer, "evaluate", evaluate)
    plan = resolve_plan("deberta", {"num_epochs": 3, "batch_size": 16, "gradient_accumulation_steps": 1,
                                    "learning_rate": 1e-3, "dataloader_num_workers": 0,
                                    "base_model": str(tiny_models["deberta"])})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    info = train_module.train(tmp_path / "tok", plan, tmp_path / "model")
    assert info["best_epoch"] == 2 and info["best_validation_metric"] == 0.9
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert len(snapshots) == 3
    differs = [any(not torch.equal(saved[k], snap[k]) for k in saved) for snap in snapshots]
    assert differs == [True, False, True]


def test_spillover_counts_flags_on_rows_a_label_is_not_annotated_for():
    from cockatoo_lib.evaluation.metrics import spillover

    probs = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.9], [0.6, 0.1]])
    m = np.array([[1, 1], [0, 1], [0, 1], [0, 1]])
    out = spillover(probs, m, ["scam", "toxicity"], [0.5, 0.5])
    # scam: rows 1-3 unannotated, rows 1 and 3 flagged; row 0 is annotated and does not count.
    assert out["scam"] == {"rows": 3, "flagged": 2, "share": pytest.approx(2 / 3, abs=1e-6)}
    assert out["toxicity"] == {"rows": 0, "flagged": 0, "share": None}
    assert spillover(probs, m, ["scam", "toxicity"], [0.85, 0.5])["scam"]["flagged"] == 0


def test_bootstrap_over_a_stack_of_trainings_averages_their_macro_f1():
    from cockatoo_lib.evaluation.metrics import bootstrap_gain

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (300, 2)).astype(bool)
    m = np.ones_like(y)
    worse = y ^ (rng.random(y.shape) < 0.4)
    # One perfect and one poor training against the poor one: half the perfect one's gain.
    alone = bootstrap_gain(y, worse, y, m)
    pair = bootstrap_gain(np.stack([y, worse]), worse, y, m)
    assert pair == pytest.approx([alone[0] / 2, alone[1] / 2], abs=1e-6)
    assert bootstrap_gain(np.stack([y, y, y]), worse, y, m) == alone
