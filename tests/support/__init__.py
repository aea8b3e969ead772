"""Helpers shared by the tests (never shipped): ``tiny_model`` trains the small model in the
platform's format that the serving tests assert on, registers it in MLflow and writes serve
configs for it."""
