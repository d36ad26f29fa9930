"""Inference service: the recommend API over the aggregated shard adapters the registry lists as serving.

`apa serve-inference` or `python -m services.inference`; see `services.inference.app` and `apa.serving`.
"""
