"""Shared fixtures: a tiny random Llama (seconds on CPU) with a word-level tokenizer that knows
the TALLRec prompt vocabulary, so every unit test runs without the real model."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from apa.tiny import build_tiny_llama, build_tiny_tokenizer

TEST_PSEUDONYM_KEY = "7465737420707365756430ff6e796d206b6579206f6620746865207465737473"
"""Every test (and every process a test starts) pseudonymises ids under this key."""
os.environ["APA_PSEUDONYM_KEY"] = TEST_PSEUDONYM_KEY
TEST_AUDIT_KEY = "61756469742d636861696e2d6b65792d666f722d7468652d74657374732d2121"
"""The audit chain's HMAC key (APA_AUDIT_KEY) of every test."""
os.environ["APA_AUDIT_KEY"] = TEST_AUDIT_KEY
TEST_SIGNING_KEY = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
"""The Ed25519 seed (APA_SIGNING_KEY) that signs receipts and anchors in the tests (RFC 8032 test 1)."""
os.environ["APA_SIGNING_KEY"] = TEST_SIGNING_KEY
os.environ["APA_RUNS_DIR"] = tempfile.mkdtemp(prefix="apa-test-runs-")
"""No test (or process a test starts) writes into the real run directory of `apa experiment`."""


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny models run fastest on one thread (two threads on two busy cores thrash); the real-model
    tests raise it again for themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny random Llama and its tokenizer saved with save_pretrained: a local model directory."""
    root = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer():  # type: ignore[no-untyped-def]
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):  # type: ignore[no-untyped-def]
    """(model, tokenizer): a fresh tiny random Llama per test, float32, eval mode."""
    return build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer
