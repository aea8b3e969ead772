"""CRD schemas as the API server applies them with strict field validation."""

from __future__ import annotations

from typing import Any


def strict(schema: Any) -> Any:
    """A CRD schema (changed in place and returned) that refuses unknown fields, as the API
    server's strict field validation does (`kubectl apply --validate=strict`); CRDs leave
    additionalProperties open."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema
