"""``engine: triton``: a model served by a Triton Inference Server, through the engine
interface (serve/engines/base.py), so the OpenAI layer, API keys, limits, metrics and
autoscaling are those of every other model.

The replica keeps the model's tokenizer (the chat template, the prompt's length check and
exact usage stay where they are for every engine) and sends the rendered prompt to Triton
over KServe v2 gRPC (``tritonclient``), one bidirectional stream per sequence: Triton's
decoupled mode sends a response per step and a final empty one. The tensors are those of
Triton's vLLM backend (``text_input``, ``sampling_parameters``; ``text_output``,
``finish_reason``, ``num_output_tokens``), which NVIDIA's container runs on EKS and which
serve/engines/triton_backend.py implements over the CPU engine locally.

Where Triton runs (serve/server_specs.py ``TritonSpec.server``): ``process``, the replica
starts it (serve/engines/triton_server.py) and fails its health check when it dies, so Serve
restarts both; ``container`` / ``external``, the replica connects to its address, and the
server's own liveness is Kubernetes' (readiness on ``/v2/health/ready``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from serve.engines.base import (
    Delta,
    EngineError,
    EngineOverloaded,
    EngineStats,
    SamplingParams,
    token_budget,
)

logger = logging.getLogger(__name__)

#: Longest a sequence's gRPC stream may last; past it the request fails with 504.
STREAM_DEADLINE_S = 600


def _tensor(name: str, value, dtype: str):
    from tritonclient.grpc import InferInput

    array = np.array([value], dtype=np.object_ if dtype == "BYTES" else None)
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def request_inputs(prompt: str, params: SamplingParams, max_tokens: int, stream: bool) -> list:
    """The vLLM backend's input tensors of one sequence."""
    sampling = {"temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": max_tokens, "ignore_eos": params.ignore_eos}
    if params.seed is not None:
        sampling["seed"] = params.seed
    if params.stop:
        sampling["stop"] = list(params.stop)
    return [_tensor("text_input", prompt.encode(), "BYTES"),
            _tensor("stream", stream, "BOOL"),
            _tensor("exclude_input_in_output", True, "BOOL"),
            _tensor("return_finish_reason", True, "BOOL"),
            _tensor("return_num_output_tokens", True, "BOOL"),
            _tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES")]


def _triton_error(err, model: str) -> EngineError:
    """An error response of Triton in OpenAI's terms: a model whose backend died is a
    retryable 503 (the replica's health check restarts it), anything else a 500."""
    message = (err.message() if hasattr(err, "message") else str(err)) or str(err)
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    if "not healthy" in message or "unavailable" in message.lower():
        return EngineOverloaded(f"the Triton server of model {model} is unavailable: {first}",
                                code="triton_unavailable")
    return EngineError(f"the Triton server of model {model} failed: {first}", status=500,
                       type="internal_server_error", code="triton_error")


def _rpc_error(err, model: str) -> EngineError:
    """A gRPC failure of the stream: no server (503, retryable), past the deadline (504)."""
    code = err.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return EngineError(f"the Triton server of model {model} did not finish within "
                           f"{STREAM_DEADLINE_S}s", status=504, type="service_unavailable",
                           code="triton_timeout")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return EngineOverloaded(f"the Triton server of model {model} is unavailable "
                                f"({code.name.lower()})", code="triton_unavailable")
    return EngineError(f"the Triton server of model {model} failed: {code.name} "
                       f"{err.details() or ''}".strip(), status=502,
                       type="service_unavailable", code="triton_error")


def finish_reason(raw: bytes, model: str) -> str | None:
    """A response's ``finish_reason``: None while the sequence runs (the vLLM backend sends
    the string ``None`` then; rayplane's Python backend an empty one), ``stop`` or ``length``
    at its end; any other (vLLM's ``abort``) fails the request."""
    reason = raw.decode() if isinstance(raw, bytes) else str(raw)
    if reason in ("", "None"):
        return None
    if reason in ("stop", "length"):
        return reason
    raise EngineError(f"the Triton server of model {model} ended the sequence: {reason}",
                      status=500, type="internal_server_error", code="triton_error")


class TritonEngine:
    """The engine interface over one model of a Triton server."""

    def __init__(self, model_dir: str | Path, *, url: str | None, model_name: str,
                 max_num_seqs: int = 16, max_model_len: int | None = None,
                 stream_interval_ms: float = 50, startup_timeout_s: float = 180,
                 label: str = "model"):
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cfg = AutoConfig.from_pretrained(model_dir)
        context = (getattr(cfg, "max_position_embeddings", None)
                   or getattr(cfg, "n_positions", None) or 2048)
        self.max_model_len = min(int(context), max_model_len or int(context))
        self.model_name = model_name
        self.max_waiting = 8 * max_num_seqs
        self.process = None
        if url is None:  # server: process
            from serve.engines.triton_server import TritonProcess

            self.process = TritonProcess(model_name, str(model_dir), max_num_seqs=max_num_seqs,
                                         max_model_len=self.max_model_len,
                                         stream_interval_ms=stream_interval_ms, label=label)
            self.process.start(startup_timeout_s)
            url = self.process.grpc_url
        self.url = url
        self._client = None
        self._client_loop = None
        self.running = self.finished = self.aborted = self.generated = self.responses = 0

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _grpc(self):
        # Made in the event loop that uses it (gRPC's aio channel binds to its loop): the
        # replica's one loop; a caller with loops of its own (a test's asyncio.run) gets one
        # per loop.
        import asyncio

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.url)
            self._client_loop = loop
        return self._client

    def check(self, prompt_ids: list[int], params: SamplingParams,
              max_tokens_param: str = "max_tokens") -> int:
        return token_budget(len(prompt_ids), self.max_model_len, params.max_tokens,
                            max_tokens_param)

    def ensure_capacity(self, sequences: int = 1) -> None:
        # Triton queues what it cannot run yet; the replica bounds what it has in flight.
        if self.running + sequences > self.max_waiting:
            raise EngineOverloaded(f"{self.running} sequences in flight to Triton (at most "
                                   f"{self.max_waiting}); retry shortly")

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str = "", *, max_tokens: int | None = None,
                       coalesce_s: float = 0.0) -> AsyncIterator[Delta]:
        """Deltas of one sequence from Triton. Streams when the caller streams (Triton's
        server batches the tokens of ``stream_interval_ms``); ``coalesce_s = inf`` asks for
        one response. Closing the generator cancels the gRPC stream, and with it the
        sequence on the server."""
        budget = max_tokens if max_tokens is not None else self.check(prompt_ids, params)
        self.ensure_capacity()
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        stream = coalesce_s != float("inf")
        inputs = request_inputs(prompt, params, budget, stream)
        rid = request_id or uuid.uuid4().hex

        async def requests():
            yield {"model_name": self.model_name, "inputs": inputs, "request_id": rid}

        start = time.perf_counter()
        first_token_s = None
        done = 0
        self.running += 1
        responses = self._grpc().stream_infer(requests(), stream_timeout=STREAM_DEADLINE_S)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise _triton_error(error, self.model_name)
                self.responses += 1
                count = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                reason = finish_reason(result.as_numpy("finish_reason").reshape(-1)[0],
                                       self.model_name)
                done += count
                if first_token_s is None and count:
                    first_token_s = time.perf_counter() - start
                self.generated += count
                yield Delta(text=result.as_numpy("text_output").reshape(-1)[0].decode(),
                            token_count=count, finish_reason=reason,
                            prompt_tokens=len(prompt_ids), completion_tokens=done,
                            first_token_s=first_token_s)
                final = result.get_response().parameters.get("triton_final_response")
                if reason or (final is not None and final.bool_param):
                    finished = True
                    break
            if not finished:
                raise EngineError(f"the Triton server of model {self.model_name} ended the "
                                  "stream without a finish reason", status=502,
                                  type="service_unavailable", code="triton_error")
        except grpc.aio.AioRpcError as err:
            logger.warning("the gRPC stream to Triton failed: %s %s", err.code(), err.details())
            raise _rpc_error(err, self.model_name) from None
        finally:
            self.running -= 1
            if finished:
                self.finished += 1
            else:  # the caller went away or it failed: cancel the sequence on the server
                self.aborted += 1
                responses.cancel()

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, waiting=0, finished=self.finished,
                           aborted=self.aborted, generated_tokens=self.generated,
                           steps=self.responses)

    def failure(self) -> str | None:
        return self.process.failure() if self.process is not None else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self.process is not None:
            self.process.stop()


__all__ = ["TritonEngine", "finish_reason", "request_inputs"]
