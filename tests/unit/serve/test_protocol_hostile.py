"""Regressions of the hostile input found against the OpenAI API, in-process: a seed torch
cannot take (a 500 from the engine before) is a 400 naming ``seed``; a lone surrogate (JSON's
``\\ud800``) in a prompt is a 400 naming it (the tokenizer's TypeError was a 500) and no longer
breaks an error response's encoding; a request larger than the engine's whole queue is a 400
(it was a 503 that no retry could cure); and the ingress's OpenAPI document carries what the
ingress reads and answers."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from serve.engines.base import EngineError
from serve.engines.cpu import CPUEngine
from serve.protocol import (
    OPENAPI_ROUTES,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from serve.serving import OpenAIServing
from tests.support import tiny_model as tm


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_outside_64_bits_is_refused_naming_it(model, seed):
    body = {"model": "m", "seed": seed, "messages": [{"role": "user", "content": "hi"}],
            "prompt": "hi"}
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    assert [e["loc"] for e in err.value.errors()] == [("seed",)]


@pytest.fixture(scope="module")
def serving(tiny_model) -> OpenAIServing:
    return OpenAIServing(CPUEngine(tiny_model, max_num_seqs=4), "tiny")


def test_the_largest_seed_samples_every_choice(serving):
    req = ChatCompletionRequest.model_validate({
        "model": "tiny", "messages": tm.GREETING, "seed": 2**63 - 1, "n": 3, "max_tokens": 2})
    out = asyncio.run(serving.chat(req))
    assert len(out["choices"]) == 3 and out["usage"]["completion_tokens"] <= 6


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "\ud800"}, "prompt[0]"),
    ({"prompt": ["fine", "a\udcffb"]}, "prompt[1]"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content"),
])
def test_a_lone_surrogate_in_the_text_is_a_400_naming_it(serving, body, param):
    model = ChatCompletionRequest if "messages" in body else CompletionRequest
    req = model.model_validate({"model": "tiny", **body})
    prepare = serving.prepare_chat if "messages" in body else serving.prepare_completion
    with pytest.raises(EngineError) as err:
        prepare(req)
    assert (err.value.status, err.value.param) == (400, param)
    assert "Unicode" in err.value.message


def test_a_request_larger_than_the_whole_queue_is_a_400_not_a_retry(serving):
    most = serving.engine.max_waiting
    req = CompletionRequest.model_validate({"model": "tiny", "prompt": ["hi"] * (most // 16 + 1),
                                            "n": 16, "max_tokens": 1})
    with pytest.raises(EngineError) as err:
        serving.prepare_completion(req)
    assert (err.value.status, err.value.param) == (400, "n")
    assert f"at most {most}" in err.value.message
    small = CompletionRequest.model_validate({"model": "tiny", "prompt": ["hi"] * 2, "n": 2,
                                              "max_tokens": 1})
    assert len(serving.prepare_completion(small).prompts) == 2


def test_an_error_echoing_a_lone_surrogate_still_encodes():
    body = error_body("The model `\ud800x` does not exist.", param="messages[0].\udcff")
    encoded = json.dumps(body, ensure_ascii=False).encode("utf-8")  # as JSONResponse renders
    assert json.loads(encoded)["error"] == {
        "message": "The model `?x` does not exist.", "type": "invalid_request_error",
        "param": "messages[0].?", "code": None}


@pytest.fixture(scope="module")
def openapi() -> dict:
    from serve.ingress import api

    return api.openapi()


def test_the_openapi_document_describes_bodies_answers_errors_and_the_key(openapi):
    schemas = openapi["components"]["schemas"]
    assert openapi["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}}
    for (method, path), (body, answer, streamed, errors, keyed) in OPENAPI_ROUTES.items():
        op = openapi["paths"][path][method]
        assert op["security"] == ([{"bearer": []}] if keyed else [])
        ok = op["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/"
                                                            f"{answer.__name__}"}
        assert ("text/event-stream" in ok) == streamed
        for status in errors:
            assert op["responses"][str(status)]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/ErrorResponse"}
        if body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] == body.__name__ in schemas
        assert "422" not in op["responses"]  # FastAPI's own 422 body is never answered
    request = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(request["required"])
    assert request["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
    # every reference resolves
    text = json.dumps(openapi)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in schemas, name
