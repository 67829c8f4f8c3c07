"""Batches from tensors held in memory, reproducible per epoch.

For data sets that fit in memory (Fashion-MNIST is 188 MB as float32) indexing whole
batches out of one tensor avoids the per-sample ``__getitem__`` + collate of a
``DataLoader``. Shuffling and augmentation draw from a generator seeded by
``(seed, epoch)``, so epoch ``k`` yields the same batches whether or not training was
interrupted and resumed before it — the basis of exact resume. :meth:`set_start_step` lets a
resume continue *inside* an epoch: the skipped batches are not yielded, but their
augmentation still draws from the generator, so every later batch is bit-identical to an
uninterrupted epoch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, epoch)``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def random_shift_flip(images: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Batched augmentation: random translation by up to ``max_shift`` px and horizontal flip.

    Args:
        images: ``(B, C, H, W)``.
    Returns:
        ``(B, C, H, W)``, shifted with edge-replicating padding (Fashion-MNIST's border
        pixels are almost all background, so this matches shifting in background).
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    out = padded[batch, channel, rows, cols]  # (B, C, H, W)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class TensorBatchLoader:
    """Iterate over aligned tensors in batches; ``set_epoch`` fixes the order.

    Give the tensors positionally to get tuple batches, or by name to get dict batches
    that also hold ``"index"``, the dataset positions of the batch's samples (what CRD's
    memory bank and a teacher-output cache are keyed by)::

        TensorBatchLoader(x, y, batch_size=64)                      # (x_b, y_b)
        TensorBatchLoader(inputs=x, target=y, batch_size=64)        # {"inputs", "target", "index"}

    Args:
        tensors / named: tensors with the same first dimension ``N`` (e.g. images
            ``(N, 1, 28, 28)``, labels ``(N,)``, cached teacher logits ``(N, C)``).
        batch_size: rows per batch.
        shuffle: draw a fresh permutation every epoch from ``(seed, epoch)``.
        augment: ``True`` for :func:`random_shift_flip`, or any ``fn(batch, generator)``,
            applied to the first tensor (or ``inputs``) with the epoch's generator.
        drop_last: skip a final short batch (keeps BatchNorm statistics sane).
        rank / world_size: data parallelism (:mod:`kdistill.distributed`). ``batch_size``
            stays the *global* batch: every rank draws the same per-epoch order and
            augmentation and yields its contiguous ``batch_size // world_size`` rows of each
            global batch (``len()`` is unchanged), so equal shares make DDP's averaged
            gradient that of the whole batch. ``batch_size`` must divide by ``world_size``.
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = False,
        augment: bool | Callable[[Tensor, torch.Generator], Tensor] = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        **named: Tensor,
    ) -> None:
        if bool(tensors) == bool(named):
            raise ValueError("give TensorBatchLoader tensors either positionally or by name")
        if named and "inputs" not in named:
            raise ValueError(f"named tensors need 'inputs'; got {sorted(named)}")
        sizes = {t.shape[0] for t in (*tensors, *named.values())}
        if len(sizes) != 1:
            raise ValueError(f"all tensors must have the same first dimension, got {sorted(sizes)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(
                f"need 0 <= rank < world_size and batch_size divisible by world_size; got "
                f"rank {rank}, world_size {world_size}, batch_size {batch_size}"
            )
        self.rank = rank
        self.world_size = world_size
        self.tensors = tensors
        self.named = named
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment: Callable[[Tensor, torch.Generator], Tensor] | None = (
            random_shift_flip if augment is True else augment or None
        )
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    @property
    def num_samples(self) -> int:
        return next(iter((*self.tensors, *self.named.values()))).shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Fix the order and augmentation of the next iterations; also resets the start step."""
        self.epoch = epoch
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Start iterations of the current epoch at batch ``step`` (resuming mid-epoch).

        The first ``step`` batches are skipped, yet augmentation is still applied to them so
        that the epoch's generator is at the same point as in an uninterrupted epoch: batch
        ``step`` onward is identical to the full epoch's. :meth:`set_epoch` resets it to 0.
        """
        if not 0 <= step <= len(self):
            raise ValueError(f"start step must be in [0, {len(self)}], got {step}")
        self.start_step = step

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, ...] | dict[str, Tensor]]:
        generator = epoch_generator(self.seed, self.epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            if i < self.start_step:
                if self.augment is not None:  # draw what this batch would have drawn
                    first = self.named["inputs"] if self.named else self.tensors[0]
                    self.augment(first[index], generator)
                continue
            # With world_size > 1 the whole global batch is augmented (the generator draws as
            # in a one-process run), then this rank keeps its share.
            mine = torch.arange(index.numel()).tensor_split(self.world_size)[self.rank]
            if self.named:
                batch = {k: t[index] for k, t in self.named.items()}
                if self.augment is not None:
                    batch["inputs"] = self.augment(batch["inputs"], generator)
                batch["index"] = index
                yield {k: v[mine] for k, v in batch.items()} if self.world_size > 1 else batch
            else:
                items = [t[index] for t in self.tensors]
                if self.augment is not None:
                    items[0] = self.augment(items[0], generator)
                yield tuple(t[mine] for t in items) if self.world_size > 1 else tuple(items)
