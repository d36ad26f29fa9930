"""Erasure service: Kafka erasure events -> one registry transaction with outbox rows -> offset commit.

`apa run-erasure-consumer` or `python -m services.erasure`; see `services.erasure.consumer`.
"""
