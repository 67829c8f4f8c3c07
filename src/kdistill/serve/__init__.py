"""Teachers behind a server: generate with them, score text with them, serve one.

- :mod:`kdistill.serve.client` — :class:`~kdistill.serve.client.OpenAIClient`: async
  ``httpx`` access to any OpenAI-compatible endpoint (bounded concurrency, timeouts, retries
  honouring ``Retry-After`` on 429/5xx, no retry on other 4xx).
- :mod:`kdistill.serve.config` — the typed ``kdistill generate`` config and the
  ``teacher:`` endpoint section.
- :mod:`kdistill.serve.prompts` — prompt files (JSONL ``messages`` / ``prompt``, CSV, text)
  with line-numbered errors.
- :mod:`kdistill.serve.generate` — ``kdistill generate``: an append-only, fsynced,
  resumable JSONL of teacher completions with their top-k log-probabilities.
- :mod:`kdistill.serve.records` — that file back as training examples, the top-k rows in
  the on-disk teacher cache's layout.
- :mod:`kdistill.serve.scoring` — teacher-forced top-k of given text from a server, with
  the self-check that catches servers whose echoed prompt rows are shifted by one.
- :mod:`kdistill.serve.server` — ``kdistill serve MODEL_DIR``: FastAPI + uvicorn server
  for a local Hugging Face causal LM, batching concurrent requests.
- :mod:`kdistill.serve.tokens` — the bytes of every token; teacher tokens → student ids.

Nothing here is imported by ``import kdistill``; the extra is ``pip install 'kdistill[serve]'``.
"""
