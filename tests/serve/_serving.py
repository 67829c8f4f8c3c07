"""Helpers for the served-teacher tests: a tiny Llama + byte-level BPE tokenizer on disk,
servers on free loopback ports (started and stopped by each test)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16",
    "The quick brown fox jumps over the lazy dog. Define the word tree.",
    "def f(x): return x + 1  # Python functions and classes",
    "Knowledge distillation trains a small student on a large teacher's outputs.",
    "héllo wörld — naïve café ✓ 日本語",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer (≈ 300 ids) trained in code, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, vocab_size: int, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the init's near-uniform logits
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(folder)
    return model


class ServerThread:
    """A uvicorn server for a FastAPI app in a thread of this process."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[ServerThread]:
    with ServerThread(app) as server:
        yield server


# --------------------------------------------------------------------------- a fault-injecting fake


def fake_completion_body(payload: dict[str, Any], chat: bool) -> dict[str, Any]:
    """A well-formed response: per sample the text "echo <prompt> #j" split into words,
    with top-2 logprobs (token strings and bytes) when asked."""
    prompt = payload["messages"][-1]["content"] if chat else payload["prompt"]
    choices = []
    for j in range(int(payload.get("n", 1))):
        words = ["echo", f" {prompt}", f" #{j}"]
        text = "".join(words)
        if chat:
            logprobs = None
            if payload.get("logprobs"):
                logprobs = {"content": [
                    {"token": w, "logprob": -0.1, "bytes": list(w.encode()),
                     "top_logprobs": [
                         {"token": w, "logprob": -0.1, "bytes": list(w.encode())},
                         {"token": "x", "logprob": -2.5, "bytes": [120]},
                     ][: payload.get("top_logprobs", 2)]}
                    for w in words
                ]}  # fmt: skip
            choices.append({"index": j, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": "stop"})  # fmt: skip
        else:
            choices.append({"index": j, "text": text, "logprobs": None, "finish_reason": "stop"})
    return {
        "choices": choices,
        "usage": {"prompt_tokens": 3, "completion_tokens": 3 * len(choices)},
    }


class FaultServer:
    """An http.server speaking just enough of the OpenAI API, failing on a script.

    ``script``: actions consumed one per POST — ``("status", code, headers[, message])``,
    ``("sleep", seconds)`` (then a normal answer), ``("malformed",)`` (200 with broken JSON),
    ``("truncate",)`` (a Content-Length larger than the body, then the connection closes),
    ``("no_choices",)``. With the script spent every POST gets a normal answer after
    ``delay`` seconds. ``requests`` records (time, path, headers, payload).
    """

    def __init__(self, script: list[tuple[Any, ...]] | None = None, delay: float = 0.0) -> None:
        import http.server
        import json

        self.script = list(script or [])
        self.delay = delay
        self.requests: list[tuple[float, str, dict[str, str], Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None,
                      length: int | None = None) -> None:  # fmt: skip
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self) -> None:
                body = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
                self._send(200, json.dumps(body).encode())

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(raw)
                with outer.lock:
                    outer.requests.append(
                        (time.monotonic(), self.path, dict(self.headers), payload)
                    )
                    action = outer.script.pop(0) if outer.script else None
                chat = self.path.endswith("/chat/completions")
                if action is not None and action[0] == "status":
                    text = action[3] if len(action) > 3 else f"injected {action[1]}"
                    message = {"error": {"message": text}}
                    self._send(action[1], json.dumps(message).encode(), action[2])
                    return
                if action is not None and action[0] == "malformed":
                    self._send(200, b'{"choices": [{"text": "unterminated')
                    return
                if action is not None and action[0] == "truncate":
                    self._send(200, b'{"choices": [', length=500)
                    self.close_connection = True
                    return
                if action is not None and action[0] == "no_choices":
                    self._send(200, b'{"object": "error"}')
                    return
                time.sleep(
                    action[1] if action is not None and action[0] == "sleep" else outer.delay
                )
                self._send(200, json.dumps(fake_completion_body(payload, chat)).encode())

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 64  # the default 5 drops a burst's SYNs (1 s retransmit)

            def handle_error(self, request: Any, client_address: Any) -> None:
                import sys

                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
