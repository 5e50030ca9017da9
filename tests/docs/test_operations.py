"""docs/operations.md stays complete: every log event the code emits is in its catalogue with
its level and fields, and its configuration reference lists exactly the keys the fog's and
the cloud's parsers accept, each with the default the parser applies."""

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.docs.catalogue import (
    OPERATIONS_MD,
    catalogue,
    code_events,
    code_strings,
    config_reference,
)
from tests.docs.configkeys import (
    cloud_default,
    cloud_keys,
    fog_default,
    fog_env_overrides,
    fog_keys,
)

HOW = "python -m tests.docs.catalogue --missing prints the rows to add"


def test_every_event_in_the_code_is_in_the_catalogue() -> None:
    missing = sorted(set(code_events()) - set(catalogue()))
    assert not missing, f"add to docs/operations.md ({HOW}): {missing}"


def test_every_catalogued_event_exists_in_the_code() -> None:
    """Events logged through a variable (``trust_loaded``, ``lease_dropped``...) appear in
    the code as string literals; an entry matching none is stale."""
    strings = code_strings()
    stale = sorted(e for e in catalogue() if e not in strings)
    assert not stale, f"docs/operations.md lists events the code no longer has: {stale}"


def test_levels_and_fields_match_the_code() -> None:
    rows = catalogue()
    for name, e in code_events().items():
        _, level, _, fields, *_ = rows[name]
        assert set(level.split("/")) == e.levels, name
        documented = {f.strip().strip("`") for f in fields.split(",")} - {"-", ""}
        assert e.fields <= documented, f"{name}: fields {sorted(e.fields - documented)}"


@pytest.mark.parametrize(
    ("component", "keys", "default"),
    [("fog", fog_keys, fog_default), ("cloud", cloud_keys, cloud_default)],
)
def test_the_reference_lists_every_key_the_parser_accepts(
    component: str, keys: Any, default: Any
) -> None:
    documented = config_reference(component)
    accepted = keys()
    assert sorted(accepted - set(documented)) == [], "keys missing from docs/operations.md"
    assert sorted(set(documented) - accepted) == [], "documented keys the parser refuses"
    for key, (_, cell, *_) in documented.items():
        _check_default(key, cell, default)


def _check_default(key: str, cell: str, default: Any) -> None:
    if cell == "required":
        with pytest.raises(KeyError):
            default(key)
        return
    try:
        actual = default(key)
    except AttributeError:
        actual = None  # a key with no value of its own (``broker.password_file``)
    if cell == "unset":
        assert actual is None, key
        return
    assert cell.startswith("`") and cell.endswith("`"), f"{key}: default {cell!r}"
    expected = tomllib.loads(f"v = {cell.strip('`')}")["v"]
    if isinstance(actual, Path):
        actual = str(actual)
    assert type(actual) is type(expected) and actual == expected, (key, actual, expected)


def test_the_fog_environment_overrides_are_documented() -> None:
    text = OPERATIONS_MD.read_text()
    for name in fog_env_overrides():
        assert f"`{name}`" in text, name
