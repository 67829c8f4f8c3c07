"""Fixtures of the served-teacher tests (helpers in ``_serving.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import ServerThread, build_tiny_llama, build_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    build_tiny_llama(folder, len(tokenizer))
    return folder


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> Any:
    from kdistill.serve.server import load_teacher_model

    return load_teacher_model(tiny_model_dir, name="tiny", device="cpu", dtype="float32")


@pytest.fixture
def served(teacher: Any) -> Iterator[ServerThread]:
    from kdistill.serve.server import build_app

    with ServerThread(build_app(teacher, batch_wait_ms=20)) as server:
        yield server
