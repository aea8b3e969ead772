"""Agent graphs that call the platform's served model through its OpenAI HTTP API (or a
Serve handle), never through serve's internals."""
