from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.taps import FeatureTaps, first_tensor, module_names


class TinyNet(nn.Module):
    """conv -> nested blocks (Sequential / ModuleList) -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())])
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 4, 4)
        x = self.conv2(self.conv1(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.flatten(1))  # (B, 3)


class TupleLayer(nn.Module):
    """Returns (hidden, extra) like a Hugging Face layer."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum()


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = TupleLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0] + 1


class SharedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def _all_hooks_empty(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_records_named_layer_output(net: TinyNet) -> None:
    x = torch.randn(2, 1, 4, 4)
    with FeatureTaps(net, ["conv1", "fc"]) as taps:
        out = net(x)
    feats = taps.outputs
    assert set(feats) == {"conv1", "fc"}
    torch.testing.assert_close(feats["conv1"], net.conv1(x))
    torch.testing.assert_close(feats["fc"], out)


def test_root_name_records_model_output(net: TinyNet) -> None:
    x = torch.randn(1, 1, 4, 4)
    with FeatureTaps(net, [""]) as taps:
        out = net(x)
    torch.testing.assert_close(taps[""], out)


def test_nested_dotted_names(net: TinyNet) -> None:
    x = torch.randn(1, 1, 4, 4)
    with FeatureTaps(net, ["blocks.0.0", "blocks.0"]) as taps:
        net(x)
    h = net.conv2(net.conv1(x))
    inner = net.get_submodule("blocks.0.0")
    torch.testing.assert_close(taps["blocks.0.0"], inner(h))
    torch.testing.assert_close(taps["blocks.0"], torch.relu(inner(h)))


def test_hooks_removed_after_with_block(net: TinyNet) -> None:
    with FeatureTaps(net, ["conv1", "blocks.0.0"]) as taps:
        assert net.conv1._forward_hooks
        assert taps.attached
    assert _all_hooks_empty(net)
    assert not taps.attached


def test_hooks_removed_on_exception(net: TinyNet) -> None:
    with pytest.raises(RuntimeError, match="boom"), FeatureTaps(net, ["conv1", "fc"]):
        raise RuntimeError("boom")
    assert _all_hooks_empty(net)


def test_unknown_name_lists_close_names(net: TinyNet) -> None:
    with pytest.raises(ValueError, match=r"no module named 'conv' in TinyNet; closest: .*'conv1'"):
        FeatureTaps(net, ["conv"])
    assert _all_hooks_empty(net)


def test_unknown_name_without_close_match_lists_available(net: TinyNet) -> None:
    with pytest.raises(ValueError, match=r"available: 'conv1', 'conv2'"):
        FeatureTaps(net, ["zzzzzzzz"])


def test_single_string_is_rejected(net: TinyNet) -> None:
    with pytest.raises(TypeError, match=r"pass \['fc'\]"):
        FeatureTaps(net, "fc")  # type: ignore[arg-type]


def test_tuple_outputs_are_unwrapped() -> None:
    model = TupleNet()
    x = torch.randn(3)
    with FeatureTaps(model, ["layer"]) as taps:
        model(x)
    torch.testing.assert_close(taps["layer"], x * 2)


def test_first_tensor_rules() -> None:
    t, h = torch.zeros(1), torch.ones(1)
    assert first_tensor(t) is t
    assert first_tensor((None, [t, h])) is t  # nested, skips non-tensors
    assert first_tensor({"logits": t, "last_hidden_state": h}) is h
    assert first_tensor({"logits": t}) is t
    with pytest.raises(TypeError, match="holds no tensor"):
        first_tensor((None, "x"))


def test_lstm_output_is_sequence_output() -> None:
    lstm = nn.LSTM(2, 3, batch_first=True)
    x = torch.randn(1, 4, 2)
    with FeatureTaps(lstm, [""]) as taps:
        out, _ = lstm(x)
    assert taps[""] is out


def test_gradients_flow_through_features(net: TinyNet) -> None:
    with FeatureTaps(net, ["conv2"]) as taps:
        net(torch.randn(1, 1, 4, 4))
    feat = taps["conv2"]
    assert feat.requires_grad
    feat.pow(2).sum().backward()
    assert net.conv1.weight.grad is not None
    assert net.fc.weight.grad is None  # fc is downstream of the tap


def test_attach_twice_registers_once(net: TinyNet) -> None:
    taps = FeatureTaps(net, ["conv1"])
    taps.attach()
    taps.attach()
    assert len(net.conv1._forward_hooks) == 1
    taps.remove()
    taps.remove()
    assert _all_hooks_empty(net)


def test_with_block_keeps_long_lived_taps_attached(net: TinyNet) -> None:
    taps = FeatureTaps(net, ["conv1"]).attach()
    with taps:
        pass
    assert len(net.conv1._forward_hooks) == 1
    taps.remove()


def test_pop_returns_and_clears(net: TinyNet) -> None:
    taps = FeatureTaps(net, ["conv1"]).attach()
    net(torch.randn(1, 1, 4, 4))
    popped = taps.pop()
    assert set(popped) == {"conv1"}
    assert taps.outputs == {}
    with pytest.raises(KeyError, match="did not run"):
        taps["conv1"]
    net(torch.randn(1, 1, 4, 4))
    taps.clear()
    assert "conv1" not in taps
    taps.remove()


def test_shared_module_keeps_last_output() -> None:
    model = SharedNet()
    x = torch.randn(1, 2)
    with FeatureTaps(model, ["lin"]) as taps:
        out = model(x)
    torch.testing.assert_close(taps["lin"], out)


def test_module_names(net: TinyNet) -> None:
    names = module_names(net)
    assert names[0] == ""
    assert {"conv1", "blocks.0", "blocks.0.0", "fc"} <= set(names)
