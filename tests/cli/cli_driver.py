"""Run many ``kdistill`` command lines in ONE process, as ``python -m kdistill`` would, and print
``{name: {"code", "stdout", "stderr"}}`` as JSON (the last line of stdout).

Each case calls :func:`kdistill.cli.main` with its own captured stdout/stderr; an exception
that escapes ``main`` is printed as Python prints an uncaught one (``Traceback ...``) with code
1, exactly what the user would see. One process for all cases pays the ~3 s of imports once.

``fault`` simulates a disk the test machine does not have: ``erofs`` (the output folder is on a
read-only file system) or ``enospc`` (the disk is full when the run writes its first file).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pathlib
import sys
import traceback
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def fault(kind: str | None) -> Iterator[None]:
    if kind is None:
        yield
        return
    import kdistill.checkpoint as checkpoint

    if kind == "erofs":
        original = pathlib.Path.write_bytes

        def read_only(self: pathlib.Path, data: Any) -> int:
            if self.name.startswith(".kdistill-write-test"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return original(self, data)

        pathlib.Path.write_bytes = read_only  # type: ignore[method-assign]
        try:
            yield
        finally:
            pathlib.Path.write_bytes = original  # type: ignore[method-assign]
    elif kind == "enospc":
        original_write = checkpoint.atomic_write

        def full(path: Any, write: Any) -> Any:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        checkpoint.atomic_write = full  # type: ignore[assignment]
        try:
            yield
        finally:
            checkpoint.atomic_write = original_write  # type: ignore[assignment]
    else:
        raise ValueError(kind)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_case(argv: list[str], kind: str | None, env: dict[str, str]) -> dict[str, Any]:
    from kdistill.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        fault(kind),
        environment(env),
    ):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what the interpreter prints for an uncaught exception
            err.write(traceback.format_exc())
            code = 1
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    cases = json.loads(pathlib.Path(sys.argv[1]).read_text())
    results = {c["name"]: run_case(c["argv"], c.get("fault"), c.get("env", {})) for c in cases}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
