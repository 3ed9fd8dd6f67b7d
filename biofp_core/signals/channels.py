"""Channel names: normalise them and choose which header channel is the ECG and which the PPG.

Rules: names are compared lower-cased with everything but letters and digits
stripped ('II,' == 'ii'). ECG is lead II when present, else the first ECG alias match; PPG is the
first PPG alias match. "First" means alias-list order, then channel order, so the choice does not
depend on the order of channels in the header.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from biofp_core.config import LEAD_II_ALIASES, ChannelAliases

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def normalise_name(name: str) -> str:
    """Lower-case `name` and strip everything but letters and digits ('PLETH,' -> 'pleth')."""
    return _NOT_ALNUM.sub("", name.lower())


def _alias_rank(name: str, aliases: Sequence[str]) -> int | None:
    """Position of `name` (normalised) in `aliases`, or None when it matches no alias."""
    try:
        return aliases.index(name)
    except ValueError:
        return None


def rank_channels(
    names: Sequence[str], aliases: ChannelAliases
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Indices of every ECG and every PPG candidate channel, best first.

    ECG candidates: lead II channels (`LEAD_II_ALIASES`) first, then other ECG alias matches;
    within each group by alias-list order, then channel order. PPG candidates: PPG alias matches
    by alias-list order, then channel order. The reader falls back to the next candidate when the
    best one holds no data.

    Parameters
    ----------
    names
        Channel names as written in the header, e.g. ``['RESP,', 'PLETH,', 'II,']``.
    aliases
        Ordered, normalised alias lists.

    Returns
    -------
    ecg, ppg
        Candidate indices into `names`, best first; empty when the modality is absent.
    """
    norm = [normalise_name(n) for n in names]
    n_ecg = len(aliases.ecg)
    ecg_keys: list[tuple[int, int, int]] = []
    ppg_keys: list[tuple[int, int]] = []
    for i, name in enumerate(norm):
        ecg_rank = _alias_rank(name, aliases.ecg)
        if name in LEAD_II_ALIASES:
            ecg_keys.append((0, n_ecg if ecg_rank is None else ecg_rank, i))
        elif ecg_rank is not None:
            ecg_keys.append((1, ecg_rank, i))
        ppg_rank = _alias_rank(name, aliases.ppg)
        if ppg_rank is not None:
            ppg_keys.append((ppg_rank, i))
    return tuple(k[-1] for k in sorted(ecg_keys)), tuple(k[-1] for k in sorted(ppg_keys))


def pick_channels(names: Sequence[str], aliases: ChannelAliases) -> tuple[int | None, int | None]:
    """Indices of the ECG and the PPG channel in `names` (None where absent).

    Examples
    --------
    >>> pick_channels(["RESP,", "PLETH,", "V,", "AVR,", "II,"], ChannelAliases())
    (4, 1)
    """
    ecg, ppg = rank_channels(names, aliases)
    return (ecg[0] if ecg else None), (ppg[0] if ppg else None)
