"""Benchmarks of the platform (run from a checkout, never shipped): ``serve_bench`` (the
OpenAI Serve app against its baselines, after ``vllm bench serve``) and ``train_bench`` (Ray
Train against a plain PyTorch loop). Results and how to read them: docs/benchmarks.md."""
