"""engine_sim's reading of prompt token ids: exact ints in uint32 range, nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from engine_sim.http_request import BadRequest, prompt_tokens, token_list


def test_token_ids_are_ints_in_uint32_range() -> None:
    assert token_list([0, 7, 2**32 - 1], "prompt") == [0, 7, 2**32 - 1]
    assert token_list([], "prompt") == []
    assert prompt_tokens([[3, 4]]) == [3, 4]


@pytest.mark.parametrize("bad", [[1, True], [1, 2.0], [1, -2], [2**32], [1, "a"], [None]])
def test_anything_else_is_a_bad_request_naming_the_item(bad: list[Any]) -> None:
    with pytest.raises(BadRequest) as err:
        token_list(bad, "prompt")
    msg = str(err.value)
    assert msg.startswith("prompt must be token ids (integers in 0..4294967295)")
    assert f"$[{len(bad) - 1}]" in msg  # msgspec names the offending item
    assert err.value.status == 400
