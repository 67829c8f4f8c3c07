from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scheme_helpers import CLASSES, DIM, TinyCNN, blobs
from torch import nn

import kdistill.experiment
from kdistill.checkpoint import load_weights
from kdistill.config import OptimConfig, config_from_dict
from kdistill.data.loader import TensorBatchLoader
from kdistill.losses import cross_entropy, hint_loss, kd_loss
from kdistill.models import build_model
from kdistill.schemes import AuxiliaryHeads, born_again, train_scheme
from kdistill.trainer import evaluate


@pytest.fixture
def synthetic_data(monkeypatch: pytest.MonkeyPatch) -> tuple:
    train, test = blobs(96), blobs(48, seed=1)
    monkeypatch.setattr(kdistill.experiment, "load_data", lambda cfg: (train, test))
    return train, test


def tiny_config(output_dir: Path, **extra) -> object:
    return config_from_dict(
        {
            "output_dir": str(output_dir),
            "data": {"batch_size": 32, "augment": False},
            "student": {
                "model": "mlp",
                "kwargs": {"in_features": DIM, "num_classes": CLASSES, "hidden": [8]},
            },
            "distill": {"temperature": 2.0, "alpha": 0.5},
            "optim": {"lr": 0.01, "schedule": "constant"},
            "train": {"epochs": 1, "progress": False},
            **extra,
        }
    )


def test_born_again_generation_k_teaches_generation_k_plus_one(
    tmp_path: Path, synthetic_data
) -> None:
    _, (test_x, test_y) = synthetic_data
    rows = born_again(tiny_config(tmp_path), generations=2, ensemble=True)
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert rows[0]["teacher"] is None
    for k in (1, 2):
        assert rows[k]["teacher"] == rows[k - 1]["weights"]
        summary = json.loads((tmp_path / f"gen{k}" / "summary.json").read_text())
        assert summary["config"]["teacher"]["checkpoint"] == rows[k - 1]["weights"]
        assert summary["config"]["student"] == summary["config"]["teacher"] | {"checkpoint": None}
        # the teacher that was loaded is generation k-1's final student, weight for weight
        previous = build_model("mlp", in_features=DIM, num_classes=CLASSES, hidden=[8])
        previous.load_state_dict(load_weights(rows[k - 1]["weights"]))
        acc = evaluate(previous, [(test_x, test_y)])["accuracy"]
        assert summary["teacher"]["test_accuracy"] == pytest.approx(acc)
        assert rows[k]["test_accuracy"] == summary["student"]["test_accuracy"]
        assert "ensemble_test_accuracy" in rows[k]
    gen0 = json.loads((tmp_path / "gen0" / "summary.json").read_text())
    assert gen0["teacher"] is None and [t["name"] for t in gen0["terms"]] == ["ce"]
    assert json.loads((tmp_path / "born_again.json").read_text()) == rows
    assert rows[1]["ensemble_test_accuracy"] == pytest.approx(rows[1]["test_accuracy"])


def test_a_given_teacher_is_generation_zero(tmp_path: Path, synthetic_data) -> None:
    first = born_again(tiny_config(tmp_path / "a"), generations=1)
    cfg = tiny_config(
        tmp_path / "b",
        teacher={
            "model": "mlp",
            "kwargs": {"in_features": DIM, "num_classes": CLASSES, "hidden": [8]},
            "checkpoint": first[1]["weights"],
        },
    )
    rows = born_again(cfg, generations=1)
    assert rows[0]["weights"] == first[1]["weights"] and rows[1]["teacher"] == first[1]["weights"]
    assert rows[0]["test_accuracy"] == pytest.approx(first[1]["test_accuracy"])
    assert not (tmp_path / "b" / "gen0").exists()


def images_and_labels(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def test_auxiliary_heads_loss_is_ce_plus_per_head_ce_and_kd_from_the_final_head() -> None:
    model = TinyCNN()
    x, y = images_and_labels()
    scheme = AuxiliaryHeads(
        model,
        {"conv1": "auto", "pool": nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES))},
        example=x,
        temperature=3.0,
        alpha=0.4,
        aux_weight=0.5,
    )
    assert set(scheme.heads) == {"conv1", "pool"}
    out = scheme(x, y)
    with torch.no_grad():
        z, aux = scheme.head_logits(x)
    expected = cross_entropy(z, y)
    for name in ("conv1", "pool"):
        ce, kd = cross_entropy(aux[name], y), kd_loss(aux[name], z, 3.0)
        torch.testing.assert_close(out[f"aux_{name}_ce_loss"], ce)
        torch.testing.assert_close(out[f"aux_{name}_kd_loss"], kd)
        expected = expected + 0.5 * (0.6 * ce + 0.4 * kd)
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(out["logits"], z)


def test_the_final_head_is_not_pulled_towards_the_auxiliary_heads() -> None:
    model = TinyCNN()
    x, y = images_and_labels()
    scheme = AuxiliaryHeads(model, {"conv1": "auto"}, example=x, alpha=1.0)
    scheme(x, y)["loss"].backward()
    got = model.fc.weight.grad.clone()
    assert model.conv1[0].weight.grad is not None
    model.zero_grad()
    cross_entropy(model(x), y).backward()  # fc only sees the final CE
    torch.testing.assert_close(got, model.fc.weight.grad)


def test_heads_are_checkpointed_but_not_part_of_the_student(tmp_path: Path) -> None:
    model = TinyCNN()
    x, y = images_and_labels(64)
    scheme = AuxiliaryHeads(
        model,
        {"conv1": "auto", "conv2": "auto"},
        example=x[:4],
        hint_layer="conv2",
        hint_weight=0.1,
    )
    state = scheme.trainable_state_dict()
    assert any(k.startswith("heads.conv1.") for k in state)
    assert any(k.startswith("hint_adapters.conv1.") for k in state)
    assert scheme.student is model and scheme.export() is model
    params = set(scheme.trainable_parameters())
    assert set(scheme.heads.parameters()) <= params and set(model.parameters()) <= params
    out = scheme(x[:8], y[:8])
    assert "aux_conv1_hint_loss" in out
    with torch.no_grad():
        taps = {}
        h1 = model.conv1.register_forward_hook(lambda m, i, o: taps.__setitem__("conv1", o))
        h2 = model.conv2.register_forward_hook(lambda m, i, o: taps.__setitem__("conv2", o))
        model(x[:8])
        h1.remove(), h2.remove()
        expected = hint_loss(scheme.hint_adapters["conv1"](taps["conv1"]), taps["conv2"])
    torch.testing.assert_close(out["aux_conv1_hint_loss"], expected)
    loader = TensorBatchLoader(x, y, batch_size=16, shuffle=True, drop_last=True)
    result = train_scheme(
        scheme,
        loader,
        loader,
        OptimConfig(lr=1e-2, schedule="constant"),
        1,
        tmp_path,
        progress=False,
    )
    assert set(load_weights(result.student_path)) == set(model.state_dict())
    assert "train_aux_conv2_kd_loss" in result.final
    heads = scheme.evaluate_heads(loader)
    assert set(heads) == {"final", "conv1", "conv2"}
    assert heads["final"]["accuracy"] == pytest.approx(result.final["test_accuracy"])
    other = AuxiliaryHeads(
        TinyCNN(),
        {"conv1": "auto", "conv2": "auto"},
        example=x[:4],
        hint_layer="conv2",
        hint_weight=0.1,
    )
    other.load_trainable_state_dict(scheme.trainable_state_dict())
    assert torch.equal(other.heads["conv1"][-1].weight, scheme.heads["conv1"][-1].weight)


def test_dotted_layer_names_and_bad_arguments() -> None:
    model = nn.Sequential(
        nn.Linear(DIM, 8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Linear(8, CLASSES),
    )
    x, y = blobs(8)
    scheme = AuxiliaryHeads(model, {"2.0": "auto"}, example=x)
    assert "aux_2__0_kd_loss" in scheme(x, y)
    with pytest.raises(ValueError, match="example"):
        AuxiliaryHeads(model, {"1": "auto"})
    with pytest.raises(ValueError, match="no module named"):
        AuxiliaryHeads(model, {"nope": "auto"}, example=x)
