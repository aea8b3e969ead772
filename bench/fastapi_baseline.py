"""The plain FastAPI + ``transformers.generate`` baseline: what many teams first write (one
``generate`` per request in a thread, streamed with ``TextIteratorStreamer``, no batching),
OpenAI-shaped enough for the openai client. :func:`start_fastapi` runs it as a subprocess
(``python -m bench.fastapi_baseline --model FOLDER --port N``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

REPO = Path(__file__).resolve().parents[1]


def fastapi_server(model_dir: str, port: int) -> None:
    """What many teams first write: one ``generate`` per request in a thread, streamed with
    ``TextIteratorStreamer``. OpenAI-shaped enough for the openai client."""
    import threading
    import uuid

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        n = int(body.get("max_tokens") or 64)
        kw = {"max_new_tokens": n, "do_sample": False, "pad_token_id": tok.pad_token_id}
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = n
        prompt_len = ids["input_ids"].shape[1]
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]

        def usage(out_len: int) -> dict:
            return {"prompt_tokens": prompt_len, "completion_tokens": out_len,
                    "total_tokens": prompt_len + out_len}

        if not body.get("stream"):
            def run():
                with torch.inference_mode():
                    return model.generate(**ids, **kw)[0, prompt_len:]
            out = await run_in_threadpool(run)
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                                 "model": name, "usage": usage(len(out)), "choices": [{
                                     "index": 0, "finish_reason": "length", "message": {
                                         "role": "assistant",
                                         "content": tok.decode(out, skip_special_tokens=True)}}]})
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        holder = {}

        def run_stream():
            with torch.inference_mode():
                holder["out"] = model.generate(**ids, streamer=streamer, **kw)[0, prompt_len:]
        thread = threading.Thread(target=run_stream, daemon=True)
        thread.start()

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk",
                                          "created": created, "model": name, "choices": [
                                              {"index": 0, "delta": delta,
                                               "finish_reason": finish}]}) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            iterator = iter(streamer)
            while True:
                piece = await run_in_threadpool(next, iterator, None)
                if piece is None:
                    break
                if piece:
                    yield chunk({"content": piece})
            await run_in_threadpool(thread.join)
            yield chunk({}, "length")
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk",
                                         "created": created, "model": name, "choices": [],
                                         "usage": usage(len(holder["out"]))}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process before it runs: the kernel kills it when the bench dies, even
    by SIGKILL (no ``finally`` runs then), so no server outlives its bench and slows the next
    one. SIGKILL: the server holds nothing worth a graceful stop."""
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - linux/prctl.h
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_fastapi(model_dir: Path, log: Path, timeout: float = 180
                  ) -> tuple[subprocess.Popen, str]:
    """Start the server and wait (at most ``timeout`` s) until it answers; stopped again when
    it fails to, or when the wait is cut short (a signal's SystemExit)."""
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.fastapi_baseline", "--model",
                                 str(model_dir), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:]
                raise RuntimeError(f"the FastAPI baseline exited ({proc.returncode}): "
                                   f"{tail[0] if tail else 'no output'}; see {log}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return proc, f"{base}/v1"
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"the FastAPI baseline did not answer within {timeout:.0f}s; "
                           f"see {log}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description="The FastAPI + generate baseline server.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    fastapi_server(args.model, args.port)


if __name__ == "__main__":
    main()
