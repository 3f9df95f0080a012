import bitsandbytes as bnb
import pytest
import torch

from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.training.losses import asymmetric_loss, masked_bce
from cockatoo_lib.training.models import load_base_model
from cockatoo_lib.training.optim import build_optimizer, parameter_depths, parameter_groups

LABELS = ["scam", "violence", "toxicity"]


@pytest.mark.parametrize("loss", [asymmetric_loss, masked_bce])
def test_masked_labels_contribute_nothing(loss):
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    value = loss(logits, targets, mask)
    value.backward()
    assert (logits.grad[mask == 0] == 0).all()
    assert (logits.grad[mask == 1] != 0).all()
    # Changing what a masked element says changes nothing.
    assert loss(logits.detach(), 1 - targets * mask, mask) != value.detach()
    flipped = torch.where(mask == 1, targets, 1 - targets)
    assert torch.isclose(loss(logits.detach(), flipped, mask), value.detach())


def test_loss_averages_over_each_rows_annotated_labels():
    logits = torch.zeros(2, 2)
    targets = torch.ones(2, 2)
    # Row 0 annotates one label, row 1 two: each row weighs the same.
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    per_element = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.isclose(masked_bce(logits, targets, mask), per_element[0, 0])


def test_bce_uses_pos_weight():
    logits, targets, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    plain = masked_bce(logits, targets, mask)
    weighted = masked_bce(logits, targets, mask, pos_weight=torch.tensor([3.0, 3.0]))
    assert torch.isclose(weighted, 3 * plain)


def test_asl_down_weights_easy_negatives():
    targets, mask = torch.zeros(1, 1), torch.ones(1, 1)
    easy, hard = torch.tensor([[-4.0]]), torch.tensor([[2.0]])
    bce_ratio = masked_bce(easy, targets, mask) / masked_bce(hard, targets, mask)
    asl_ratio = asymmetric_loss(easy, targets, mask) / asymmetric_loss(hard, targets, mask)
    assert asl_ratio < bce_ratio / 100
    # Negatives below the clip margin cost nothing at all.
    assert asymmetric_loss(torch.tensor([[-5.0]]), targets, mask) == 0


def _groups_by_name(model, plan):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr"], g["weight_decay"])
            for g in parameter_groups(model, plan) for p in g["params"]}


@pytest.mark.parametrize("model_type, layer, layers", [
    ("deberta", "deberta.encoder.layer.{}.attention.self.query_proj.weight", 2),
    ("modernbert", "model.layers.{}.attn.Wqkv.weight", 2),
])
def test_llrd_group_learning_rates(model_type, layer, layers, tiny_models):
    plan = resolve_plan(model_type, {"base_model": str(tiny_models[model_type]), "use_llrd": True,
                                     "learning_rate": 1e-4, "llrd_decay_factor": 0.5})
    model = load_base_model(plan, LABELS)
    groups = _groups_by_name(model, plan)
    assert groups["classifier.weight"] == (1e-4, 0.01)  # head: full rate
    assert groups["classifier.bias"] == (1e-4, 0.0)  # biases: no decay
    for i in range(layers):  # top layer at depth 1, bottom layer at depth N
        assert groups[layer.format(i)][0] == pytest.approx(1e-4 * 0.5 ** (layers - i))
    embeddings = next(n for n in groups
                      if "embeddings" in n and n.endswith("weight") and "norm" not in n.lower())
    assert groups[embeddings][0] == pytest.approx(1e-4 * 0.5 ** (layers + 1))
    norms = [n for n in groups if "norm" in n.lower() and n.endswith("weight")]
    assert norms and all(groups[n][1] == 0.0 for n in norms)


def test_llrd_covers_both_clip_towers(tiny_models):
    plan = resolve_plan("clip-vit", {"base_model": str(tiny_models["clip-vit"]), "use_llrd": True,
                                     "learning_rate": 1e-4, "llrd_decay_factor": 0.5})
    model = load_base_model(plan, LABELS)
    depths = parameter_depths(model)
    groups = _groups_by_name(model, plan)
    for tower in ("text_model", "vision_model"):  # each tower counted on its own
        assert depths[f"clip.{tower}.encoder.layers.1.mlp.fc1.weight"] == 1
        assert depths[f"clip.{tower}.encoder.layers.0.mlp.fc1.weight"] == 2
        assert groups[f"clip.{tower}.encoder.layers.1.mlp.fc1.weight"][0] == pytest.approx(5e-5)
        assert groups[f"clip.{tower}.encoder.layers.0.self_attn.q_proj.weight"][0] == pytest.approx(2.5e-5)
    for name in ("head.0.weight", "head.3.weight", "head.3.bias"):  # the head at full rate
        assert depths[name] == 0 and groups[name][0] == 1e-4
    assert depths["clip.text_model.embeddings.token_embedding.weight"] == 3
    assert groups["clip.vision_model.embeddings.patch_embedding.weight"][0] == pytest.approx(1.25e-5)


def test_without_llrd_every_group_has_the_plan_rate(tiny_models):
    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"])})
    model = load_base_model(plan, LABELS)
    assert {lr for lr, _ in _groups_by_name(model, plan).values()} == {2e-5}


@pytest.mark.parametrize("name, cls", [
    ("adamw_8bit", bnb.optim.AdamW8bit), ("adamw", torch.optim.AdamW),
    ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizers_step_on_cpu(name, cls, tiny_models):
    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"]), "optimizer": name})
    model = load_base_model(plan, LABELS)
    optimizer = build_optimizer(model, plan)
    assert type(optimizer) is cls
    assert {g["lr"] for g in optimizer.param_groups} == {plan.learning_rate}
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.9
    before = model.classifier.weight.detach().clone()
    model(input_ids=torch.randint(5, 100, (2, 8))).logits.sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.classifier.weight)
    if name == "adamw_8bit":  # the big tensors' state really is 8-bit
        state = optimizer.state[model.deberta.embeddings.word_embeddings.weight]
        assert state["state1"].dtype == torch.uint8


@pytest.mark.parametrize("bits, dtype", [(8, torch.uint8), (32, torch.float32)])
def test_embedding_state_bits_choose_the_embeddings_optimizer_state(bits, dtype, tiny_models):
    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"]),
                                    "embedding_state_bits": bits})
    model = load_base_model(plan, LABELS)
    optimizer = build_optimizer(model, plan)
    model(input_ids=torch.randint(5, 100, (2, 8))).logits.sum().backward()
    optimizer.step()
    assert optimizer.state[model.deberta.embeddings.word_embeddings.weight]["state1"].dtype == dtype


def test_asl_keeps_pulling_a_badly_wrong_positive():
    """log(p) through logsigmoid: at logit -20 a positive still gets a gradient of about -1
    (a clamp at 1e-8 gave -3.8e-8), and elsewhere the loss is the textbook formula."""
    logits = torch.tensor([[-20.0, -17.0, 0.3, 2.0]], requires_grad=True)
    targets = torch.ones_like(logits)
    mask = torch.ones_like(logits)
    asymmetric_loss(logits, targets, mask, gamma_neg=4, gamma_pos=0, clip=0.05).backward()
    grad = logits.grad[0] * 4  # the loss is a mean over the row's four labels
    assert grad[0].item() == pytest.approx(-1.0, abs=1e-6) and grad[1].item() == pytest.approx(-1.0, abs=1e-6)
    x = torch.tensor([[0.3, -1.2]])
    p = torch.sigmoid(x)
    y = torch.tensor([[1.0, 0.0]])
    p_neg = (p - 0.05).clamp(min=0)
    textbook = -(y * torch.log(p) * (1 - p) + (1 - y) * torch.log(1 - p_neg) * p_neg ** 4).mean()
    loss = asymmetric_loss(x, y, torch.ones_like(x), 4, 1, 0.05)
    assert loss.item() == pytest.approx(textbook.item(), rel=1e-6)


def test_unannotated_labels_train_as_weak_negatives_only_when_the_plan_says_so():
    """unannotated_weight 0 (the default) masks a label's unannotated rows; w > 0 adds them as
    negatives with weight w, in the loss and in the rows the step's mean is over."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.training.trainer import CockatooTrainer

    logits = torch.tensor([[2.0, 0.0], [1.0, -1.0]])
    batch = {"labels": torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
             "label_mask": torch.tensor([[0.0, 1.0], [0.0, 0.0]])}

    def loss(weight):
        trainer = SimpleNamespace(plan=resolve_plan("minilm", {"loss": "bce", "unannotated_weight": weight}),
                                  pos_weight=None, loss_weights=None, args=SimpleNamespace(world_size=1))
        rows = CockatooTrainer._get_num_items_in_batch(trainer, [dict(batch)], "cpu")
        inputs = {**batch, "input_ids": torch.zeros(2, 1)}
        return rows, CockatooTrainer.compute_loss(trainer, lambda **_: SimpleNamespace(logits=logits), inputs,
                                                  num_items_in_batch=rows)

    bce = lambda z, t: F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(t)).item()  # noqa: E731
    rows, masked = loss(0.0)
    assert rows == 1 and masked.item() == pytest.approx(bce(0.0, 1.0))  # row 2 annotates nothing
    rows, weak = loss(0.5)
    first = (0.5 * bce(2.0, 0.0) + bce(0.0, 1.0)) / 1.5
    second = (bce(1.0, 0.0) + bce(-1.0, 0.0)) / 2  # a row of weak negatives only now counts
    assert rows == 2 and weak.item() == pytest.approx((first + second) / 2, rel=1e-5)


@pytest.mark.parametrize("schedule, at_end", [("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)])
def test_the_learning_rate_after_warmup_follows_the_plans_schedule(schedule, at_end, tmp_path):
    """Held ("constant", minilm's: early stopping ends its training) or down to 0 at the last step."""
    from transformers import get_scheduler

    from cockatoo_lib.training.trainer import training_arguments

    plan = resolve_plan("minilm", {"lr_scheduler": schedule, "learning_rate": 1e-3, "warmup_ratio": 0.1})
    args = training_arguments(plan, str(tmp_path), cuda=False)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=plan.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(100),
                              num_training_steps=100)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[10] == pytest.approx(1e-3)  # warmup: 10% of the steps
    assert scheduler.get_last_lr()[0] == pytest.approx(at_end * 1e-3)
