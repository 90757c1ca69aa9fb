"""Result settings come from the config dataclass (issue 7): a new key is never ignored."""

from __future__ import annotations

import dataclasses

from pacs_numba.config import PacsConfig
from pacs_numba.store.record import NON_RESULT_SETTINGS, RESULT_SETTINGS, result_settings

FIELDS = [f.name for f in dataclasses.fields(PacsConfig)]


def test_every_config_key_is_either_a_result_setting_or_excluded_by_name():
    assert set(RESULT_SETTINGS) | NON_RESULT_SETTINGS == set(FIELDS)
    assert not set(RESULT_SETTINGS) & NON_RESULT_SETTINGS
    assert list(RESULT_SETTINGS) == [f for f in FIELDS if f not in NON_RESULT_SETTINGS]


def test_excluded_settings_do_not_change_the_record_and_the_others_do():
    base = {f: f"value-{f}" for f in FIELDS}
    ref = result_settings(base, ["A", "B"])
    assert ref["models"] == ["A", "B"]
    for f in FIELDS:
        changed = result_settings({**base, f: "other"}, ["A", "B"])
        assert (changed == ref) == (f in NON_RESULT_SETTINGS), f
    assert result_settings(base, ["B", "A"]) != ref
