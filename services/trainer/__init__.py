"""Trainer workers: Celery tasks that retrain stale shards (`apa run-worker`, `apa resume`).

See `services.trainer.worker`.
"""
