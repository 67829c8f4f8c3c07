"""The on-disk teacher-output cache: round trips, refusals, and the top-k maths vs dense."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from kdistill.cache import (
    MANIFEST,
    CorruptCacheError,
    StaleCacheError,
    build_cache,
    data_fingerprint,
    index_dtype_for,
    load_or_build,
    open_cache,
    teacher_identity,
    topk_log_probs,
)
from kdistill.config import ConfigError, DistillConfig, config_from_dict
from kdistill.experiment import cache_teacher_outputs, run_experiment
from kdistill.lm import KINDS, token_divergence_reference
from kdistill.lm.topk import densify_topk, topk_divergence


class TinyConvNet(nn.Module):
    """A conv teacher with a tappable feature map ``body`` (B, 4, 8, 8) and logits (B, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class TinyLM(nn.Module):
    """Embedding + linear head: logits (B, T, V) whose rows differ per token id."""

    def __init__(self, vocab: int = 97, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        return {"logits": 3.0 * self.head(torch.tanh(self.embed(ids)))}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(70, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- dense layout


def test_dense_cache_holds_what_the_in_memory_cache_holds_across_shards(
    tmp_path: Path, images: torch.Tensor
) -> None:
    teacher = TinyConvNet()
    keys = ["body", "logits"]
    memory = cache_teacher_outputs(teacher, keys, images, 16, map_dtype=torch.bfloat16)
    cache = build_cache(
        tmp_path / "c", teacher, images, data_name="toy", keys=keys, batch_size=16,
        map_dtype=torch.bfloat16, shard_bytes=9 * (4 * 64 * 2 + 5 * 4),
    )  # fmt: skip
    assert len(cache.manifest["shards"]) == 8  # 9 rows per shard, 70 rows
    assert cache["body"].dtype == torch.bfloat16 and cache["logits"].dtype == torch.float32
    order = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    for key in keys:
        assert torch.equal(cache[key].to_tensor(), memory[f"teacher.{key}"])
        assert torch.equal(cache[key][order], memory[f"teacher.{key}"][order])  # across shards
        assert torch.equal(cache[key][3:40:7], memory[f"teacher.{key}"][3:40:7])
        assert torch.equal(cache[key][-1], memory[f"teacher.{key}"][-1])
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["teacher"] == teacher_identity(teacher)
    assert manifest["data"] == data_fingerprint(images, "toy")
    assert manifest["tensors"]["body"] == {"row_shape": [4, 8, 8], "dtype": "bfloat16"}


def test_an_existing_cache_is_reused_without_running_the_teacher(
    tmp_path: Path, images: torch.Tensor
) -> None:
    teacher = TinyConvNet()
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    _, built = load_or_build(tmp_path / "c", teacher, images, data_name="toy", batch_size=32)
    assert built and len(calls) == 3
    cache, built = load_or_build(tmp_path / "c", teacher, images, data_name="toy", batch_size=32)
    assert not built and len(calls) == 3
    assert cache["logits"].shape == (70, 5)


def test_a_cache_of_another_teacher_or_other_data_is_refused(
    tmp_path: Path, images: torch.Tensor
) -> None:
    teacher = TinyConvNet()
    build_cache(tmp_path / "c", teacher, images, data_name="toy")
    other = TinyConvNet()
    with pytest.raises(StaleCacheError, match=r"stale: it was built from teacher .*rebuild"):
        load_or_build(tmp_path / "c", other, images, data_name="toy")
    with torch.no_grad():
        teacher.head.bias[0] += 1e-6  # one float changed is another teacher
    with pytest.raises(StaleCacheError, match="teacher"):
        open_cache(tmp_path / "c", teacher=teacher)
    with torch.no_grad():
        teacher.head.bias[0] -= 1e-6
    open_cache(tmp_path / "c", teacher=teacher)
    with pytest.raises(StaleCacheError, match=r"built on data 'toy'.*delete"):
        load_or_build(tmp_path / "c", teacher, images.flip(0), data_name="toy")
    with pytest.raises(StaleCacheError, match="transform"):
        load_or_build(tmp_path / "c", teacher, images, data_name="toy", transform="x/255")
    with pytest.raises(StaleCacheError, match=r"needs \['body'\]"):
        load_or_build(tmp_path / "c", teacher, images, data_name="toy", keys=["body"])
    cache, built = load_or_build(tmp_path / "c", other, images, data_name="toy", rebuild=True)
    assert built and cache.manifest["teacher"] == teacher_identity(other)


def test_corrupted_truncated_or_unfinished_caches_are_refused_naming_the_file(
    tmp_path: Path, images: torch.Tensor
) -> None:
    teacher = TinyConvNet()
    cache = build_cache(tmp_path / "c", teacher, images, data_name="toy", shard_bytes=400)
    name = cache.manifest["shards"][1]["files"]["logits"]["file"]
    shard = tmp_path / "c" / name
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # flip one bit of a logit
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=rf"{name} is corrupted.*delete"):
        open_cache(tmp_path / "c")
    open_cache(tmp_path / "c", verify="size")  # a bit flip keeps the size
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(CorruptCacheError, match=rf"{name} is truncated"):
        open_cache(tmp_path / "c", verify="size")
    shard.unlink()
    with pytest.raises(CorruptCacheError, match=rf"{name} is missing"):
        open_cache(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).unlink()  # as if the build had been killed before the end
    with pytest.raises(CorruptCacheError, match="interrupted build"):
        open_cache(tmp_path / "c")
    cache, built = load_or_build(tmp_path / "c", teacher, images, data_name="toy")
    assert built and torch.equal(
        cache["logits"].to_tensor(),
        cache_teacher_outputs(teacher, ["logits"], images, 256)["teacher.logits"],
    )


def test_cache_dir_needs_cache_teacher() -> None:
    with pytest.raises(ConfigError, match="cache_dir: needs cache_teacher: true"):
        DistillConfig(cache_teacher=False, cache_dir="x")


# --------------------------------------------------------------------------- top-k maths


def _logits(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_topk_log_probs_keep_the_exact_residual_mass() -> None:
    z = _logits((6, 50), 0, scale=8.0).double()
    values, indices, rest = topk_log_probs(z, 5)
    log_p = torch.log_softmax(z.double(), -1)
    assert torch.allclose(values.double(), log_p.gather(-1, indices), atol=1e-5)
    others = torch.ones_like(z, dtype=torch.bool).scatter(-1, indices, False)
    expected = torch.stack([log_p[i][others[i]].logsumexp(0) for i in range(6)])
    assert torch.allclose(rest.double(), expected, rtol=1e-5)
    total = values.double().exp().sum(-1) + rest.double().exp()
    assert torch.allclose(total, torch.ones(6, dtype=torch.float64), atol=1e-5)
    _, _, none = topk_log_probs(z, 50)
    assert torch.isneginf(none).all()
    assert index_dtype_for(32768) == torch.int16 and index_dtype_for(49152) == torch.uint16
    assert index_dtype_for(151936) == torch.int32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_divergence_is_the_dense_divergence_when_k_is_the_vocabulary(
    kind: str, temperature: float
) -> None:
    student = _logits((3, 4, 40), 1).double().requires_grad_()
    teacher = _logits((3, 4, 40), 2).double()
    labels = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(3))
    labels[0, :2] = -100
    values, indices, rest = topk_log_probs(teacher, 40)
    sparse = topk_divergence(
        student, values, indices, rest, kind, temperature=temperature, labels=labels
    )
    (g_sparse,) = torch.autograd.grad(sparse, student)
    dense = token_divergence_reference(
        student, teacher, kind, temperature=temperature, labels=labels
    )
    (g_dense,) = torch.autograd.grad(dense, student)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(g_sparse, g_dense, atol=1e-10)


def test_topk_forward_kl_misses_exactly_the_kl_inside_the_residual() -> None:
    """Chain rule: KL(p‖q) = KL over the k + 1 buckets + R · KL(p_rest/R ‖ q_rest/Q)."""
    student = _logits((8, 30), 4).double()
    teacher = _logits((8, 30), 5).double()
    k = 6
    values, indices, rest = topk_log_probs(teacher, k)
    sparse = topk_divergence(student, values, indices, rest, "forward_kl")
    dense = token_divergence_reference(student, teacher, "forward_kl")
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    gap = 0.0
    for i in range(8):
        others = torch.ones(30, dtype=torch.bool)
        others[indices[i]] = False
        p_rest = torch.log_softmax(log_p[i][others], 0)  # p restricted to the rest, renormalised
        q_rest = torch.log_softmax(log_q[i][others], 0)
        gap += rest[i].double().exp() * (p_rest.exp() * (p_rest - q_rest)).sum()
    assert dense.item() - sparse.item() == pytest.approx(gap.item() / 8, rel=1e-9)
    assert 0 < sparse.item() < dense.item()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_topk_divergence_grows_towards_the_dense_one_as_k_grows(kind: str) -> None:
    student = _logits((16, 64), 6).double()
    teacher = _logits((16, 64), 7, scale=4.0).double()
    dense = token_divergence_reference(student, teacher, kind).item()
    previous = 0.0
    for k in (1, 4, 16, 48, 63, 64):
        values, indices, rest = topk_log_probs(teacher, k)
        value = topk_divergence(student, values, indices, rest, kind).item()
        assert previous - 1e-12 <= value <= dense + 1e-12, (k, value, dense)
        previous = value
    assert previous == pytest.approx(dense, rel=1e-9)


def _bucket_log_probs(logits: torch.Tensor, indices: torch.Tensor, temperature: float):
    """Tempered distribution summed into the buckets (top-k ids, everything else), in logs."""
    p = torch.softmax(logits / temperature, -1)
    top = p.gather(-1, indices)
    return torch.cat([top, (1 - top.sum(-1, keepdim=True))], -1).log()


def test_topk_temperature_is_exact_when_the_teacher_tail_is_flat() -> None:
    teacher = _logits((5, 25), 8).double()
    teacher[:, 4:] = -2.0  # ids 4… share one logit: the residual really is spread evenly
    teacher[:, :4] += 6.0
    student = _logits((5, 25), 9).double()
    values, indices, rest = topk_log_probs(teacher, 4)
    p_buckets = _bucket_log_probs(teacher, indices, 3.0)
    q_buckets = _bucket_log_probs(student, indices, 3.0)
    for kind in KINDS:
        sparse = topk_divergence(student, values, indices, rest, kind, temperature=3.0)
        coarse = token_divergence_reference(q_buckets, p_buckets, kind)
        assert sparse.item() == pytest.approx(coarse.item(), rel=1e-9), kind
    uneven = _logits((5, 25), 8).double()  # a tail that is not flat: T != 1 is approximate
    values, indices, rest = topk_log_probs(uneven, 4)
    sparse = topk_divergence(student, values, indices, rest, temperature=3.0)
    coarse = token_divergence_reference(
        _bucket_log_probs(student, indices, 3.0), _bucket_log_probs(uneven, indices, 3.0)
    )
    assert sparse.item() != pytest.approx(coarse.item(), rel=1e-3)


def test_densify_spreads_the_residual_evenly_and_costs_the_uniform_tail_kl() -> None:
    student = _logits((6, 20), 10).double()
    teacher = _logits((6, 20), 11).double()
    values, indices, rest = topk_log_probs(teacher, 5)
    full = densify_topk(values, indices, rest, 20).double()
    assert torch.allclose(full.exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(full.gather(-1, indices), values)
    spread = token_divergence_reference(student, full, "forward_kl")
    lumped = topk_divergence(student, values, indices, rest, "forward_kl")
    log_q = torch.log_softmax(student, -1)
    extra = 0.0
    for i in range(6):
        others = torch.ones(20, dtype=torch.bool)
        others[indices[i]] = False
        q_rest = torch.log_softmax(log_q[i][others], 0)
        uniform = -math.log(15)
        extra += rest[i].double().exp() * (uniform - q_rest).sum() / 15
    assert spread.item() - lumped.item() == pytest.approx(extra.item() / 6, rel=1e-6)


def test_lm_topk_cache_round_trip_gives_the_live_topk_loss(tmp_path: Path) -> None:
    teacher = TinyLM()
    ids = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 12, dtype=torch.long)
    mask[2, 9:] = 0
    cache = build_cache(
        tmp_path / "lm", teacher, ids, data_name="toy-lm", k=8, attention_mask=mask,
        batch_size=4, values_dtype=torch.bfloat16, shard_bytes=1000,
    )  # fmt: skip
    assert cache.manifest["vocab_size"] == 97 and cache.manifest["k"] == 8
    assert cache.bytes_per_row() == 12 * (8 * (2 + 2) + 4)  # bf16 + int16 ids + float32 rest
    assert len(cache.manifest["shards"]) > 1
    live_logits = teacher(ids)["logits"]
    live = topk_log_probs(live_logits, 8)
    rows = torch.tensor([5, 0, 3])
    values = cache["topk_values"][rows]
    assert values.dtype == torch.bfloat16
    assert torch.equal(cache["topk_indices"][rows].long(), live[1][rows])
    assert torch.equal(cache["rest_log_mass"][rows], live[2][rows])
    assert torch.allclose(values.float(), live[0][rows], atol=0.05, rtol=1 / 128)
    student = _logits((3, 12, 97), 12).requires_grad_()
    from_disk = topk_divergence(
        student, values, cache["topk_indices"][rows], cache["rest_log_mass"][rows],
        mask=mask[rows],
    )  # fmt: skip
    from_live = topk_divergence(student, *(t[rows] for t in live), mask=mask[rows])
    assert from_disk.item() == pytest.approx(from_live.item(), rel=2e-2)
    with pytest.raises(ValueError, match="top-k layout stores logits only"):
        build_cache(tmp_path / "x", teacher, ids, data_name="t", k=8, keys=["embed", "logits"])


# --------------------------------------------------------------------------- kdistill run


def tiny_run(output_dir: Path, **distill: object) -> dict:
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"train_subset": 256, "test_subset": 128, "batch_size": 64},
        "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}},
        "student": {"model": "mlp", "kwargs": {"hidden": [32]}},
        "distill": {"temperature": 4.0, "alpha": 0.7, **distill},
        "optim": {"name": "adamw", "lr": 0.01, "schedule": "cosine"},
        "train": {"epochs": 2, "progress": False, "threads": 1, "tensorboard": False},
    }


def test_run_from_disk_cache_trains_the_same_student_as_the_in_memory_cache(
    tmp_path: Path,
) -> None:
    from kdistill.data import DatasetNotFoundError, find_fashion_mnist

    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    cache_dir = tmp_path / "teacher-cache"
    runs = {
        "memory": tiny_run(tmp_path / "memory"),
        "disk-build": tiny_run(tmp_path / "disk-build", cache_dir=str(cache_dir)),
        "disk-read": tiny_run(tmp_path / "disk-read", cache_dir=str(cache_dir)),
    }
    weights = {}
    for name, config in runs.items():
        result = run_experiment(config_from_dict(config))
        weights[name] = safetensors.torch.load_file(result.fit.student_path)
    assert json.loads((cache_dir / MANIFEST).read_text())["data"]["rows"] == 256
    for name in ("disk-build", "disk-read"):
        assert weights[name].keys() == weights["memory"].keys()
        for key in weights["memory"]:
            assert torch.equal(weights[name][key], weights["memory"][key]), (name, key)
    stale = tiny_run(tmp_path / "stale", cache_dir=str(cache_dir))
    stale["teacher"]["kwargs"] = {"hidden": [48]}
    with pytest.raises(ConfigError, match=r"distill.cache_dir: teacher cache .* is stale"):
        run_experiment(config_from_dict(stale))
    stale["distill"]["cache_rebuild"] = True
    run_experiment(config_from_dict(stale))
