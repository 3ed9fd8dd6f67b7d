"""Labels of public datasets, built from what the dataset itself records.

BIDMC (PhysioNet ``bidmc``): per record ``bidmcNN``, age and sex from the header comment
(``<age>: 88 <sex>: M <location>: micu <source>: .../matched/s01182/ ...``; "90+" becomes 90,
"NaN" and "?" stay empty), the MIMIC-II patient (``s01182``) as the subject (several records share
one patient), and heart rate, pulse rate, respiratory rate and SpO2 as the means over the record of
the 1 Hz monitor numerics in ``bidmcNNn`` (missing samples ignored).
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np
import wfdb

from biofp_core.errors import DataError, RecordError
from biofp_core.fsutil import atomic_write_text
from biofp_core.signals.channels import normalise_name

BIDMC_COLUMNS = ("record", "subject", "age", "sex", "location", "hr_bpm", "pulse_bpm",
                 "resp_rate_bpm", "spo2_pct")  # fmt: skip
_NUMERICS = {"hr_bpm": "HR", "pulse_bpm": "PULSE", "resp_rate_bpm": "RESP", "spo2_pct": "SpO2"}
_FIELD = re.compile(r"<(\w[\w ]*)>:\s*([^<]*)")


def _header_fields(header: Path) -> dict[str, str]:
    """``<key>: value`` pairs of a BIDMC header's comment lines."""
    comments = " ".join(ln[1:] for ln in header.read_text(errors="replace").splitlines()
                        if ln.startswith("#"))  # fmt: skip
    return {k.strip(): v.strip() for k, v in _FIELD.findall(comments)}


def _age(value: str) -> str:
    value = value.removesuffix("+")
    return value if value.isdigit() else ""


def _numeric_means(path: Path) -> dict[str, str]:
    """Mean of each monitor numeric of ``bidmcNNn``, formatted; channels not found stay empty.

    Channel names are matched after normalisation (``'HR,'`` is HR); a malformed name, like
    bidmc19n's SpO2, matches nothing.
    """
    out = dict.fromkeys(_NUMERICS, "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record = wfdb.rdrecord(str(path))
    except (OSError, ValueError, IndexError, TypeError):
        return out
    column_of = {normalise_name(name): i for i, name in enumerate(record.sig_name or [])}
    for column, channel in _NUMERICS.items():
        i = column_of.get(normalise_name(channel))
        values = record.p_signal[:, i] if i is not None and record.p_signal is not None else None
        if values is not None and np.isfinite(values).any():
            out[column] = f"{float(np.nanmean(values)):.1f}"
    return out


def bidmc_label_rows(bidmc_dir: Path) -> list[dict[str, str]]:
    """One row per BIDMC record (``BIDMC_COLUMNS``), in record order."""
    headers = sorted(Path(bidmc_dir).glob("bidmc[0-9][0-9].hea"))
    if not headers:
        raise DataError(f"{bidmc_dir}: no BIDMC record (bidmcNN.hea)")
    rows = []
    for header in headers:
        fields = _header_fields(header)
        patient = re.search(r"/(s\d+)/", fields.get("source", ""))
        if patient is None:
            raise RecordError(header, "no MIMIC patient id in the header's <source>")
        sex = fields.get("sex", "")
        rows.append({
            "record": header.stem,
            "subject": patient.group(1),
            "age": _age(fields.get("age", "")),
            "sex": sex if sex in ("M", "F") else "",
            "location": fields.get("location", ""),
            **_numeric_means(header.with_name(f"{header.stem}n")),
        })  # fmt: skip
    return rows


def write_bidmc_labels(bidmc_dir: Path, out: Path) -> Path:
    """Write the BIDMC labels CSV to `out` (atomically) and return it."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=BIDMC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(bidmc_label_rows(bidmc_dir))
    atomic_write_text(Path(out), buf.getvalue())
    return Path(out)
