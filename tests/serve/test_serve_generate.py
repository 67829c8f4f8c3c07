"""kdistill generate: config and prompt errors, records, resume after SIGKILL, torn lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from _serving import FaultServer

from kdistill.cli import main
from kdistill.config import ConfigError
from kdistill.serve.config import generate_config_from_dict
from kdistill.serve.generate import run_generate
from kdistill.serve.prompts import read_prompts
from kdistill.serve.records import read_generated

KEY = "sk-live-DO-NOT-LEAK-42"


def _config(tmp_path: Path, url: str, prompts: Path, **sampling: Any) -> dict[str, Any]:
    return {
        "teacher": {
            "endpoint": url,
            "model": "fake",
            "api_key_env": "KD_TEST_KEY",
            "backoff": 0.01,
            "concurrency": 4,
        },
        "prompts": {"file": str(prompts)},
        "sampling": {"n": 2, "max_tokens": 8, "logprobs": 2, **sampling},
        "output": str(tmp_path / "out" / "gen.jsonl"),
        "progress": "off",
    }


def _prompts(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"q{i}"}) if i % 2 else
             json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(count)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def _keys(path: Path) -> list[tuple[int, int]]:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # no torn line
    records = [json.loads(x) for x in lines[1:-1]]
    return sorted((r["prompt_index"], r["sample_index"]) for r in records)


def test_generate_writes_header_and_one_record_per_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    with FaultServer() as server:
        cfg = generate_config_from_dict(_config(tmp_path, server.url, _prompts(tmp_path, 5),
                                                system_prompt="Be brief."))  # fmt: skip
        result = run_generate(cfg)
    assert result.samples_written == 10 and result.samples_skipped == 0
    out = cfg.output_path
    assert _keys(out) == [(i, j) for i in range(5) for j in range(2)]
    header, examples = read_generated(out)
    assert header["settings"]["model"] == "fake" and header["endpoint"] == server.url
    assert header["prompts"]["count"] == 5 and "kdistill_version" in header
    assert [(e.prompt_index, e.sample_index) for e in examples][3] == (1, 1)
    assert examples[3].completion == "echo q1 #1" and examples[3].tokens is not None
    assert examples[3].tokens[1].top[0].bytes == list(b" q1")
    sent = server.requests[0][3]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert KEY not in out.read_text()  # the key is in no file


def test_rerun_of_a_finished_file_requests_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    with FaultServer() as server:
        cfg = generate_config_from_dict(_config(tmp_path, server.url, _prompts(tmp_path, 3)))
        run_generate(cfg)
        count = len(server.requests)
        again = run_generate(cfg)
    assert (
        again.samples_written == 0 and again.samples_skipped == 6 and len(server.requests) == count
    )


def test_torn_last_line_is_cut_and_its_sample_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    with FaultServer() as server:
        cfg = generate_config_from_dict(_config(tmp_path, server.url, _prompts(tmp_path, 3)))
        run_generate(cfg)
        out = cfg.output_path
        lines = out.read_bytes().split(b"\n")
        last = json.loads(lines[-2])
        out.write_bytes(b"\n".join(lines[:-2]) + b"\n" + lines[-2][:25])  # killed mid-write
        result = run_generate(cfg)
    assert result.truncated_bytes == 25 and result.samples_written >= 1
    assert _keys(out) == [(i, j) for i in range(3) for j in range(2)]
    assert (last["prompt_index"], last["sample_index"]) in _keys(out)


def test_killed_with_sigkill_then_rerun_answers_every_prompt_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    with FaultServer(delay=0.05) as server:
        data = _config(tmp_path, server.url, _prompts(tmp_path, 40))
        data["teacher"]["concurrency"] = 2
        config = tmp_path / "gen.yaml"
        config.write_text(yaml.safe_dump(data))
        out = Path(data["output"])
        proc = subprocess.Popen([sys.executable, "-m", "kdistill", "generate", str(config)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 12):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = out.read_bytes().count(b"\n") - 1
        assert 0 < partial < 80
        assert main(["generate", str(config)]) == 0
    keys = _keys(out)
    assert keys == [(i, j) for i in range(40) for j in range(2)]  # none lost, none twice


def test_changed_settings_refuse_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    with FaultServer() as server:
        data = _config(tmp_path, server.url, _prompts(tmp_path, 2))
        run_generate(generate_config_from_dict(data))
        data["sampling"]["temperature"] = 0.5
        with pytest.raises(ConfigError, match=r"sampling\.temperature"):
            run_generate(generate_config_from_dict(data))


def test_401_stops_with_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    with FaultServer([("status", 401, {})] * 8) as server:
        config = tmp_path / "gen.yaml"
        config.write_text(yaml.safe_dump(_config(tmp_path, server.url, _prompts(tmp_path, 2))))
        assert main(["generate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "KD_TEST_KEY" in err and KEY not in err and err.count("\n") == 1


def test_server_down_exits_2_naming_the_endpoint_and_keeps_nothing_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KD_TEST_KEY", KEY)
    data = _config(tmp_path, "http://127.0.0.1:9/v1", _prompts(tmp_path, 2))
    data["teacher"]["max_retries"] = 1
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["generate", str(config)]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err  # the endpoint that did not answer
    assert Path(data["output"]).read_bytes().count(b"\n") == 1  # the header only


def test_missing_key_variable_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KD_TEST_KEY", raising=False)
    cfg = generate_config_from_dict(
        _config(tmp_path, "http://127.0.0.1:9/v1", _prompts(tmp_path, 1))
    )
    with pytest.raises(ConfigError, match="KD_TEST_KEY is not set"):
        run_generate(cfg)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = _config(tmp_path, "http://x/v1", tmp_path / "p.jsonl")
    with pytest.raises(
        ConfigError, match=r"teacher\.api: 'chatt' is not allowed; choose one of: chat, completions"
    ):
        generate_config_from_dict({**base, "teacher": {**base["teacher"], "api": "chatt"}})
    with pytest.raises(
        ConfigError, match=r"sampling\.tempature: unknown key.*did you mean 'sampling\.temperature'"
    ):
        generate_config_from_dict({**base, "sampling": {"tempature": 1}})
    with pytest.raises(ConfigError, match=r"teacher\.api_key_env: must be the NAME"):
        generate_config_from_dict(
            {**base, "teacher": {**base["teacher"], "api_key_env": "sk-abc-123"}}
        )
    with pytest.raises(ConfigError, match=r"sampling\.system_prompt: needs teacher\.api: chat"):
        generate_config_from_dict({**base, "teacher": {**base["teacher"], "api": "completions"},
                                   "sampling": {"system_prompt": "x"}})  # fmt: skip


def test_empty_prompts_file_is_an_error(tmp_path: Path) -> None:
    for name, text in (("p.jsonl", "\n\n"), ("p.csv", ""), ("p.txt", "  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=r"no prompts|empty"):
            read_prompts(tmp_path / name)


def test_malformed_prompt_record_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:3: not valid JSON"):
        read_prompts(path)
    path.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: no 'messages' and no 'prompt' key"):
        read_prompts(path)
    path.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:1: messages\[0\]\.role is 'robot'"):
        read_prompts(path)
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,id\n"hello",1\n"",2\n')
    with pytest.raises(ConfigError, match=r"p\.csv:3: 'prompt' must be a non-empty string"):
        read_prompts(csv)
    other = tmp_path / "q.jsonl"
    other.write_text('{"question": "b"}\n')
    assert [p.prompt for p in read_prompts(other, field="question")] == ["b"]


def test_chat_record_with_completions_api_is_refused(tmp_path: Path) -> None:
    data = _config(tmp_path, "http://127.0.0.1:9/v1", _prompts(tmp_path, 2))
    data["teacher"] = {**data["teacher"], "api": "completions", "api_key_env": None}
    with pytest.raises(ConfigError, match=r"prompts\.jsonl:1 is a chat record"):
        run_generate(generate_config_from_dict(data))


def test_fsync_runs_off_the_event_loop_and_every_record_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow fsync (0.2 s) must not hold the other workers: 8 responses take far less than
    8 serial fsyncs, fsyncs are shared, and the last fsync comes after the last write."""
    import kdistill.serve.generate as gen

    events: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(0.2)
        real_fsync(fd)
        events.append(("fsync", size))

    monkeypatch.setenv("KD_TEST_KEY", KEY)
    monkeypatch.setattr(gen.os, "fsync", slow_fsync)
    with FaultServer() as server:
        data = _config(tmp_path, server.url, _prompts(tmp_path, 8), n=1)
        data["teacher"]["concurrency"] = 8
        cfg = generate_config_from_dict(data)
        start = time.perf_counter()
        result = run_generate(cfg)
        seconds = time.perf_counter() - start
    assert result.samples_written == 8 and _keys(cfg.output_path) == [(i, 0) for i in range(8)]
    syncs = [size for kind, size in events if kind == "fsync"]
    assert len(syncs) < 8 + 1  # header + coalesced records (serial: 9)
    assert syncs[-1] == cfg.output_path.stat().st_size  # the final fsync saw every record
    assert seconds < 8 * 0.2  # serial fsyncs alone would take 1.6 s
