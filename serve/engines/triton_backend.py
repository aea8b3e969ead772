"""The model a local Triton server runs for ``engine: triton``: Triton's Python backend over
rayplane's CPU engine, speaking the tensor interface of Triton's vLLM backend.

This module runs inside Triton's Python backend stub, not in a Ray worker: the server that
serve/engines/triton_server.py starts loads the repository it wrote, whose ``model.py``
imports :class:`TritonPythonModel` from here (the stub finds rayplane and its environment on
``PYTHONPATH``). On EKS NVIDIA's container runs the vLLM backend itself with the same
interface, so the engine in the Serve replica (serve/engines/triton.py) is one client for
both:

- inputs: ``text_input`` (the rendered prompt), ``stream``, ``sampling_parameters`` (JSON:
  temperature, top_p, max_tokens, seed, stop, ignore_eos), ``exclude_input_in_output``,
  ``return_finish_reason``, ``return_num_input_tokens``, ``return_num_output_tokens``;
- outputs: ``text_output`` (new text of each response when streaming), ``finish_reason``,
  ``num_input_tokens``, ``num_output_tokens`` (new tokens of each response).

The model is decoupled (one request, many responses): a request runs as a coroutine on an
event loop thread of its own, feeding the CPU engine's continuous batch, so concurrent
requests decode together as they do in a ``cpu`` replica. A cancelled request (the client's
gRPC stream closed) leaves the batch at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils  # the stub's module: only inside Triton

#: The parameters of ``sampling_parameters`` that this model honours (vLLM's names).
SAMPLING_KEYS = {"temperature", "top_p", "max_tokens", "seed", "stop", "ignore_eos"}


def _flag(request, name: str, default: bool) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else bool(tensor.as_numpy().reshape(-1)[0])


def _string(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    """Triton's Python backend entry point (``initialize``, ``execute``, ``finalize``)."""

    def initialize(self, args: dict) -> None:
        from serve.engines.cpu import CPUEngine

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.engine = CPUEngine(params["model_dir"],
                                max_num_seqs=int(params.get("max_num_seqs") or 16),
                                max_model_len=int(params.get("max_model_len") or 0) or None,
                                num_threads=1)
        self.coalesce_s = float(params.get("stream_interval_ms") or 0) / 1000
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rayplane-llm",
                                       daemon=True)
        self.thread.start()

    def execute(self, requests):
        # Decoupled: each request answers through its own response sender, from the loop.
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._answer(request), self.loop)
        return None

    async def _answer(self, request) -> None:
        from serve.engines.base import EngineError, SamplingParams

        sender = request.get_response_sender()
        try:
            text = _string(request, "text_input") or ""
            stream = _flag(request, "stream", False)
            echo = not _flag(request, "exclude_input_in_output", False)
            want = {n: _flag(request, f"return_{n}", False)
                    for n in ("finish_reason", "num_input_tokens", "num_output_tokens")}
            sampling = json.loads(_string(request, "sampling_parameters") or "{}")
            unknown = set(sampling) - SAMPLING_KEYS
            if unknown:
                raise EngineError(f"sampling_parameters: {sorted(unknown)} are not supported; "
                                  f"use {sorted(SAMPLING_KEYS)}")
            stop = sampling.get("stop") or []
            params = SamplingParams(max_tokens=sampling.get("max_tokens"),
                                    temperature=float(sampling.get("temperature", 1.0)),
                                    top_p=float(sampling.get("top_p", 1.0)),
                                    seed=sampling.get("seed"),
                                    stop=[stop] if isinstance(stop, str) else list(stop),
                                    ignore_eos=bool(sampling.get("ignore_eos", False)))
            ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
            budget = self.engine.check(ids, params)
            gen = self.engine.generate(ids, params, max_tokens=budget,
                                       coalesce_s=self.coalesce_s if stream else float("inf"))
            out_text, out_tokens, reason = (text if echo else ""), 0, None
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            # After the final flag the sender's factory is gone: asking it anything then
            # (is_cancelled included) crashes the server, so that is tracked here.
            ended = cancelled = False
            try:
                async for delta in gen:
                    if sender.is_cancelled():
                        cancelled = True
                        break
                    reason = delta.finish_reason
                    if stream:
                        # The last delta carries the final flag, as the vLLM backend sends it:
                        # a client sees the end without asking for empty final responses.
                        sender.send(self._response(delta.text, reason, len(ids),
                                                   delta.new_tokens, want),
                                    flags=final if reason else 0)
                        ended = bool(reason)
                    else:
                        out_text += delta.text
                        out_tokens += delta.new_tokens
            finally:
                await gen.aclose()  # a cancelled sequence leaves the batch now
            if ended:
                return
            if cancelled or stream:
                sender.send(flags=final)
                return
            sender.send(self._response(out_text, reason, len(ids), out_tokens, want),
                        flags=final)
        except EngineError as err:
            sender.send(pb_utils.InferenceResponse(output_tensors=[],
                                                   error=pb_utils.TritonError(err.message)),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # noqa: BLE001 - the request fails, the model keeps serving
            sender.send(pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"{type(err).__name__}: {err}")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _response(text: str, reason: str | None, n_in: int, n_out: int, want: dict):
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))]
        if want["finish_reason"]:
            tensors.append(pb_utils.Tensor("finish_reason",
                                           np.array([(reason or "").encode()], dtype=np.object_)))
        if want["num_input_tokens"]:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([n_in], np.uint32)))
        if want["num_output_tokens"]:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([n_out], np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
