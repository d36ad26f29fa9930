"""One rule for ids, applied everywhere: an id that can be imported can be erased and looked up by
its URL, and an id that breaks the rule is refused at every door with the field named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apa.cli import main
from apa.data import Sample
from apa.data.samples import InvalidSampleError
from apa.events import ErasureRequested, EventValidationError
from apa.ids import MAX_ID_LENGTH, InvalidInput, check_id, check_shard_id, id_problem
from apa.prompts import MOVIE_INSTRUCTION

BAD = {
    "": "empty",
    " 42": "whitespace",
    "42 ": "whitespace",
    "4\x002": "control",
    "a\tb": "control",
    "\ud800": "surrogate",
    "r/slash": "'/'",
    "..": "'/'",
    "x" * (MAX_ID_LENGTH + 1): "longer",
}


@pytest.mark.parametrize(("value", "reason"), list(BAD.items()))
def test_bad_ids_are_refused_with_the_reason(value: str, reason: str) -> None:
    problem = id_problem(value)
    assert problem is not None and reason in problem
    with pytest.raises(InvalidInput) as info:
        check_id(value, "user_id")
    assert info.value.field == "user_id"


@given(st.text(min_size=1, max_size=MAX_ID_LENGTH))
def test_an_accepted_id_is_one_url_segment_of_valid_text(value: str) -> None:
    if id_problem(value) is None:
        assert "/" not in value and value == value.strip() and value.encode("utf-8")


def test_shard_ids_are_a_model_id_and_an_index() -> None:
    assert check_shard_id("model-1/3", "shard_id") == "model-1/3"
    for bad in ("model-1", "model-1/x", "model-1/03", "/3", "a/b/3", " m/1", "m/²", "m/٣"):
        with pytest.raises(InvalidInput):
            check_shard_id(bad, "shard_id")


@pytest.mark.parametrize("value", ["42 ", "x" * 300, "u/1", "4\x002"])
def test_every_door_refuses_an_id_that_could_not_be_erased(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InvalidSampleError):  # bootstrap and `apa prepare` build Samples
        Sample(value, "u1", "train", MOVIE_INSTRUCTION, "x", "Yes.", 1, ("u1:1",))
    with pytest.raises(InvalidSampleError):
        Sample("s1", value, "train", MOVIE_INSTRUCTION, "x", "Yes.", 1, ("u1:1",))
    with pytest.raises(InvalidSampleError):
        Sample("s1", "u1", "train", MOVIE_INSTRUCTION, "x", "Yes.", 1, ("u1:1", value))
    with pytest.raises(EventValidationError) as info:  # events (and POST /erasures)
        ErasureRequested("r1", value)
    assert info.value.field == "user_id"
    with pytest.raises(EventValidationError):
        ErasureRequested(value, "u1")
    assert main(["erase", "--user-id", value, "--url", "sqlite://"]) == 2  # the CLI
    assert "user_id" in capsys.readouterr().err


def test_a_slash_in_a_request_id_is_a_400_not_an_unreachable_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from apa.db.session import make_engine, upgrade
    from apa.events import InMemoryEventBus
    from apa.settings import Settings
    from services.registry.app import create_app

    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade(engine)
    settings = Settings(database_url=str(engine.url), api_token="t", pseudonym_key="k" * 32)
    client = create_app(settings, engine=engine, event_bus=InMemoryEventBus()).test_client()
    response = client.post(
        "/erasures", headers={"Authorization": "Bearer t"}, json={"user_id": "u", "request_id": "r/slash"}
    )
    assert response.status_code == 400 and response.json["field"] == "request_id"
    engine.dispose()
