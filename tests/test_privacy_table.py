"""docs/privacy.md's table of every key that can leave a site is the code's table, and the one
place that builds replies refuses anything the table does not allow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from biofp_core.protocol import ARRAYS_ENTRY, REPLY_KEYS, is_allowed_reply_key
from client.replies import _check_reply

DOC = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"


def documented() -> dict[str, dict[str, tuple[str, str | None]]]:
    text = DOC.read_text()
    block = text.split("<!-- reply-keys:start -->")[1].split("<!-- reply-keys:end -->")[0]
    table: dict[str, dict[str, tuple[str, str | None]]] = {}
    for line in block.strip().splitlines()[2:]:
        message, key, source, charged = (c.strip() for c in line.strip("|").split("|"))
        charged = charged.replace("&lt;", "<").replace("&gt;", ">")
        table.setdefault(message, {})[key.strip("`")] = (
            source,
            None if charged == "-" else charged,
        )
    return table


def test_the_documented_table_is_the_code_table() -> None:
    code = {
        message: {key: (row.source, row.charged) for key, row in rows.items()}
        for message, rows in REPLY_KEYS.items()
    }
    assert documented() == code


@pytest.mark.parametrize("message", sorted(REPLY_KEYS))
def test_a_key_outside_the_table_cannot_be_sent(message: str) -> None:
    assert not is_allowed_reply_key(message, "subject-id")
    with pytest.raises(ValueError, match="not allowed"):
        _check_reply(message, {"subject-id": 1.0}, None, charged=True)


@pytest.mark.parametrize(
    ("message", "key"),
    [(m, k) for m, rows in REPLY_KEYS.items() for k, row in rows.items() if row.charged],
)
def test_a_patient_derived_value_needs_its_ledger_entry(message: str, key: str) -> None:
    arrays = {"w": np.zeros(2)} if key == ARRAYS_ENTRY else None
    metrics = {} if key == ARRAYS_ENTRY else {key.replace("<term>", "recon"): 1.0}
    with pytest.raises(ValueError, match="without a ledger charge"):
        _check_reply(message, metrics, arrays, charged=False)
    _check_reply(message, metrics, arrays, charged=True)  # paid for: allowed


def test_counts_settings_and_flags_need_no_charge() -> None:
    for message, rows in REPLY_KEYS.items():
        free = {k: 1 for k, row in rows.items() if row.charged is None and k != ARRAYS_ENTRY}
        _check_reply(message, free, None, charged=False)
        assert all(re.fullmatch(r"[a-z-]+", k) for k in free)
