"""Read WFDB records into `RawRecord`: only the ECG and PPG channels, physical units, own rates.

What plain ``wfdb.rdrecord`` gets wrong for us, and is handled here:

- Speed: wfdb's header parser costs about 2 ms a header (pandas lookups per field), more than
  decoding a BIDMC record. Channels are picked from a light parse of the header with wfdb's own
  patterns (`wfdb.io.header`), so wfdb parses each record once, in ``rdrecord``, and records with
  no ECG or PPG are never parsed by it. ``rdrecord`` then converts only the channels asked for.
- Silent misreads: wfdb takes a non-numeric sampling rate as 250 Hz and an unknown signal format
  fails mid-read with a bare ``KeyError``; both are header errors here.
- Raw exceptions: a missing or short signal file is checked against the header before reading,
  lengths again after, and anything wfdb still raises becomes a `RecordError`.
- Multi-segment records are joined here by channel name, each channel at its own rate
  (``smooth_frames=False``), with NaN for gaps ('~') and for segments that lack the channel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import wfdb
from wfdb.io.header import parse_header_content, rx_record, rx_segment, rx_signal

from biofp_core.config import ChannelAliases
from biofp_core.errors import DataError, RecordError
from biofp_core.signals.channels import normalise_name, rank_channels
from biofp_core.signals.types import Channel, RawRecord

log = logging.getLogger(__name__)

# Bytes per sample of each WFDB signal format; None: FLAC-compressed, the size says nothing.
_BYTES_PER_SAMPLE: dict[str, Fraction | None] = {
    "8": Fraction(1), "16": Fraction(2), "24": Fraction(3), "32": Fraction(4),
    "61": Fraction(2), "80": Fraction(1), "160": Fraction(2), "212": Fraction(3, 2),
    "310": Fraction(4, 3), "311": Fraction(4, 3), "508": None, "516": None, "524": None,
}  # fmt: skip
_NULL_FMT = "0"  # a signal with no stored samples (layout headers); reads as all NaN
_GAP = "~"  # a multi-segment gap: no segment, every channel NaN
_DEFAULT_FS_HZ = 250.0  # WFDB's rate when the record line gives none

Reader = Callable[[Sequence[int]], list[Channel]]  # channel indices -> channels, same order


@dataclass(frozen=True)
class _Signal:
    """One signal line of a header: what is needed to pick and check a channel."""

    name: str  # as written, e.g. 'II,'
    file_name: str
    fmt: str
    samps_per_frame: int
    byte_offset: int


@dataclass(frozen=True)
class _Header:
    """A parsed header: signals (single-segment) or segments (multi-segment, else None)."""

    path: Path
    fs_hz: float  # frame rate
    sig_len: int | None  # frames; None: taken from the signal file
    signals: tuple[_Signal, ...]
    segments: tuple[tuple[str, int], ...] | None  # (segment name, frames)
    comments: tuple[str, ...]


def find_records(data_dir: Path) -> list[Path]:
    """Header paths (.hea) of the top-level records under `data_dir`, recursive and sorted.

    Segment and layout headers listed by a multi-segment master header in the same folder are
    parts of that record, not records; every other header is returned.

    Raises
    ------
    DataError
        `data_dir` is missing, not a directory, or holds no WFDB record.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        problem = "not a directory" if data_dir.exists() else "data directory not found"
        raise DataError(f"{data_dir}: {problem}")
    headers = sorted(p for p in data_dir.rglob("*.hea") if p.is_file())
    parts = {h.parent / f"{name}.hea" for h in headers for name in _segment_names(h)}
    records = [h for h in headers if h not in parts]
    if not records:
        raise DataError(f"{data_dir}: no WFDB records (*.hea) found")
    log.info("%s: %d records (%d segment headers skipped)", data_dir, len(records), len(parts))
    return records


def _segment_names(header: Path) -> list[str]:
    """Segment names listed by `header` if it is a multi-segment master header, else []."""
    try:
        lines, _ = parse_header_content(header.read_text(encoding="ascii", errors="ignore"))
    except OSError:
        return []  # read_record reports it
    match = rx_record.match(lines[0]) if lines else None
    if match is None or not match.group("n_seg"):
        return []
    segments = (rx_segment.match(line) for line in lines[1 : 1 + int(match.group("n_seg"))])
    return [s.group("seg_name") for s in segments if s and s.group("seg_name") != _GAP]


def read_record(
    header_path: Path, *, aliases: ChannelAliases = ChannelAliases(), data_dir: Path | None = None
) -> RawRecord:
    """Read the ECG and PPG channels of one WFDB record.

    Parameters
    ----------
    header_path
        The record's header (.hea); single- or multi-segment, any WFDB format wfdb reads.
    aliases
        Channel aliases; ECG is lead II when present (see `rank_channels`).
    data_dir
        The site's data directory: the record id is the header path relative to it, without
        suffix (``'multi-segment/041s/041s'``); without it, the header's stem.

    Returns
    -------
    RawRecord
        Physical float64 samples, NaN where invalid, each channel at its own rate
        (frame rate x samples per frame). A channel holding only NaN counts as absent; the next
        alias match is used instead when there is one.

    Raises
    ------
    RecordError
        The record is unusable; the message names the header and the problem in one line.
    """
    header = _parse_header(Path(header_path))
    names, read = _open(header)
    ecg_idx, ppg_idx = rank_channels(names, aliases)
    if not ecg_idx and not ppg_idx:
        listed = ", ".join(_display(n) for n in names) or "none"
        raise RecordError(header.path, f"no ECG or PPG channel (channels: {listed})")
    ecg, ppg = _read_usable(header.path, read, names, ecg_idx, ppg_idx)
    return RawRecord(
        record_id=_record_id(header.path, data_dir),
        ecg=ecg,
        ppg=ppg,
        comments=header.comments,
        all_channels=tuple(names),
    )


def _open(header: _Header) -> tuple[list[str], Reader]:
    """The record's channel names and a reader of channels by index into them."""
    if header.segments is None:
        return [s.name for s in header.signals], partial(_read_single, header)
    names, segments = _open_segments(header)
    return names, partial(_read_multi, header, names, segments)


def _read_usable(
    header_path: Path,
    read: Reader,
    names: Sequence[str],
    ecg_idx: Sequence[int],
    ppg_idx: Sequence[int],
) -> tuple[Channel | None, Channel | None]:
    """Read the best ECG and PPG candidates in one pass; fall back past all-NaN channels."""
    first = list(dict.fromkeys(idx[0] for idx in (ecg_idx, ppg_idx) if idx))
    cache = dict(zip(first, read(first), strict=True))
    ecg = _first_with_data(ecg_idx, cache, read)
    ppg = _first_with_data(ppg_idx, cache, read)
    if ecg is None and ppg is None:
        tried = ", ".join(_display(names[i]) for i in dict.fromkeys([*ecg_idx, *ppg_idx]))
        raise RecordError(header_path, f"no usable ECG or PPG channel: {tried} all-NaN or empty")
    return ecg, ppg


def _first_with_data(
    candidates: Sequence[int], cache: dict[int, Channel], read: Reader
) -> Channel | None:
    """The first candidate channel holding at least one number, or None."""
    for i in candidates:
        channel = cache[i] if i in cache else read([i])[0]
        if not np.isnan(channel.samples).all():
            return channel
        log.info("channel %s is all-NaN or empty; trying the next candidate", channel.name)
    return None


def _display(name: str) -> str:
    """A channel name for messages: 'PLETH,' -> 'PLETH'."""
    return name.strip(" ,;") or repr(name)


def _record_id(header_path: Path, data_dir: Path | None) -> str:
    """Header path relative to `data_dir` without suffix (posix), else the header's stem."""
    if data_dir is None:
        return header_path.stem
    for path, root in (
        (header_path, Path(data_dir)),
        (header_path.absolute(), Path(data_dir).absolute()),
    ):
        if path.is_relative_to(root):
            return path.relative_to(root).with_suffix("").as_posix()
    return header_path.stem


# ---- headers -------------------------------------------------------------------------------


def _parse_header(path: Path) -> _Header:
    """Parse a header with wfdb's patterns, rejecting what wfdb would misread silently."""
    if path.suffix != ".hea":
        raise RecordError(path, "not a WFDB header (expected a .hea file)")
    try:
        text = path.read_text(encoding="ascii", errors="ignore")  # as wfdb reads it
    except FileNotFoundError:
        raise RecordError(path, "header file not found") from None
    except OSError as exc:
        raise RecordError(path, f"unreadable header: {exc.strerror}") from None
    lines, comment_lines = parse_header_content(text)
    fs_hz, n_seg, n_sig, sig_len = _parse_record_line(path, lines[0] if lines else "")
    body = lines[1:]
    if len(body) != (n_seg if n_seg is not None else n_sig):
        kind = "segment" if n_seg is not None else "signal"
        problem = f"{len(body)} {kind} lines, the record line says {n_seg or n_sig}"
        raise RecordError(path, f"unreadable header: {problem}")
    return _Header(
        path=path,
        fs_hz=fs_hz,
        sig_len=sig_len,
        signals=() if n_seg is not None else tuple(_parse_signal_line(path, ln) for ln in body),
        segments=None if n_seg is None else tuple(_parse_segment_line(path, ln) for ln in body),
        comments=tuple(line.strip(" \t#") for line in comment_lines),
    )


def _parse_record_line(path: Path, line: str) -> tuple[float, int | None, int, int | None]:
    """Frame rate, segment count (None: single-segment), signal count and length in frames."""
    tokens = line.split()
    match = rx_record.match(line)
    if match is None or len(tokens) < 2 or not tokens[1].isdigit():
        raise RecordError(path, f"unreadable header: invalid record line {line[:60]!r}")
    if len(tokens) >= 3:
        fs_match = rx_record.fullmatch(f"x 1 {tokens[2]}")  # the rate field alone
        fs_text = fs_match.group("fs") if fs_match else ""
        if not fs_text.strip(".") or float(fs_text) <= 0:
            problem = f"sampling rate {tokens[2]!r} is not a number > 0"
            raise RecordError(path, f"unreadable header: {problem}")
    if len(tokens) >= 4 and not tokens[3].isdigit():
        problem = f"signal length {tokens[3]!r} is not a whole number"
        raise RecordError(path, f"unreadable header: {problem}")
    fields = match.groupdict()
    return (
        float(fields["fs"]) if fields["fs"] else _DEFAULT_FS_HZ,
        int(fields["n_seg"]) if fields["n_seg"] else None,
        int(fields["n_sig"]),
        int(fields["sig_len"]) if fields["sig_len"] else None,
    )


def _parse_signal_line(path: Path, line: str) -> _Signal:
    """One signal line; its format must be one wfdb reads (or 0, no samples)."""
    match = rx_signal.match(line)
    if match is None:
        raise RecordError(path, f"unreadable header: invalid signal line {line[:60]!r}")
    fmt = match.group("fmt")
    if fmt not in _BYTES_PER_SAMPLE and fmt != _NULL_FMT:
        raise RecordError(path, f"unreadable header: unknown signal format {fmt}")
    return _Signal(
        name=match.group("sig_name"),
        file_name=match.group("file_name"),
        fmt=fmt,
        samps_per_frame=int(match.group("samps_per_frame") or 1),
        byte_offset=int(match.group("byte_offset") or 0),
    )


def _parse_segment_line(path: Path, line: str) -> tuple[str, int]:
    """One segment line: (segment name or '~', length in frames)."""
    match = rx_segment.match(line)
    if match is None:
        raise RecordError(path, f"unreadable header: invalid segment line {line[:60]!r}")
    return match.group("seg_name"), int(match.group("seg_len"))


# ---- single-segment records ----------------------------------------------------------------


def _read_single(header: _Header, indices: Sequence[int]) -> list[Channel]:
    """Channels `indices` of a single-segment record, converting no other channel."""
    wanted = sorted({i for i in indices if header.signals[i].fmt != _NULL_FMT})
    _check_signal_files(header, wanted)
    signals: dict[int, tuple[np.ndarray, str]] = {}
    if wanted:
        try:
            record = wfdb.rdrecord(
                str(header.path.with_suffix("")), channels=wanted, smooth_frames=False
            )
            signals = dict(
                zip(wanted, zip(record.e_p_signal, record.units, strict=True), strict=True)
            )
        except Exception as exc:  # wfdb raises bare Exception, ValueError, KeyError...
            raise RecordError(header.path, f"unreadable record: {_describe(exc)}") from None
    return [_to_channel(header, i, *signals.get(i, (None, ""))) for i in indices]


def _describe(exc: BaseException) -> str:
    """A raw exception as a few words for a RecordError."""
    text = " ".join(str(exc).split())[:200]
    return text or type(exc).__name__


def _check_signal_files(header: _Header, indices: Sequence[int]) -> None:
    """Raise RecordError when a signal file holding `indices` is missing or too short."""
    for file_name in dict.fromkeys(header.signals[i].file_name for i in indices):
        path = header.path.parent / file_name
        if not path.is_file():
            raise RecordError(header.path, f"missing signal file {file_name}")
        in_file = [s for s in header.signals if s.file_name == file_name]
        bytes_per_sample = _BYTES_PER_SAMPLE[in_file[0].fmt]
        if bytes_per_sample is None or header.sig_len is None:
            continue  # compressed, or length taken from the file: checked after reading
        frame_bytes = bytes_per_sample * sum(s.samps_per_frame for s in in_file)
        data_bytes = path.stat().st_size - in_file[0].byte_offset
        found = max(math.floor(data_bytes / frame_bytes), 0)
        if found < header.sig_len:
            raise RecordError(header.path, _truncated(file_name, header.sig_len, found))


def _truncated(file_name: str, expected: int, found: int) -> str:
    return f"signal file {file_name} is truncated: expected {expected} samples, found {found}"


def _to_channel(header: _Header, i: int, samples: np.ndarray | None, units: str) -> Channel:
    """Channel `i` of `header` from its samples (None: a null-format signal, all NaN)."""
    signal = header.signals[i]
    spf = signal.samps_per_frame
    if samples is None:
        samples = np.full((header.sig_len or 0) * spf, np.nan)
    elif header.sig_len is not None and len(samples) < header.sig_len * spf:
        found = len(samples) // spf
        raise RecordError(header.path, _truncated(signal.file_name, header.sig_len, found))
    return Channel(
        name=signal.name,
        fs_hz=header.fs_hz * spf,
        samples=np.ascontiguousarray(samples, dtype=np.float64),
        units=units or "",
    )


# ---- multi-segment records -----------------------------------------------------------------


@contextmanager
def _segment_errors(master: _Header, segment: str) -> Iterator[None]:
    """Report a segment's problem against the record's master header."""
    try:
        yield
    except RecordError as exc:
        raise RecordError(master.path, f"segment {segment}: {exc.problem}") from None


def _open_segments(master: _Header) -> tuple[list[str], list[_Header | None]]:
    """The record's channel names and every segment's header (None for gaps)."""
    seg_list = master.segments or ()
    named = [name for name, _ in seg_list if name != _GAP]
    missing = [name for name in named if not (master.path.parent / f"{name}.hea").is_file()]
    variable = bool(seg_list) and seg_list[0][1] == 0  # segment 0 is then the layout header
    if variable and seg_list[0][0] in missing:
        problem = f"layout header {seg_list[0][0]}.hea missing"
        raise RecordError(master.path, f"incomplete multi-segment record: {problem}")
    if missing:
        problem = f"{len(missing)} of {len(named) - variable} segments missing"
        raise RecordError(master.path, f"incomplete multi-segment record: {problem}")
    segments = [_load_segment(master, name, frames) for name, frames in seg_list]
    reference = segments[0] if variable else next((s for s in segments if s is not None), None)
    names = [s.name for s in reference.signals] if reference is not None else []
    return names, segments


def _load_segment(master: _Header, name: str, frames: int) -> _Header | None:
    """One segment's header, checked against the master's rate and length (None for a gap)."""
    if name == _GAP:
        return None
    with _segment_errors(master, name):
        segment = _parse_header(master.path.parent / f"{name}.hea")
    problem = None
    if segment.segments is not None:
        problem = "is itself a multi-segment record"
    elif not math.isclose(segment.fs_hz, master.fs_hz):
        problem = f"sampling rate {segment.fs_hz} Hz differs from the record's {master.fs_hz} Hz"
    elif frames and segment.sig_len != frames:
        problem = f"{segment.sig_len} samples, the master header says {frames}"
    if problem:
        raise RecordError(master.path, f"segment {name}: {problem}")
    return segment


def _read_multi(
    master: _Header,
    names: Sequence[str],
    segments: Sequence[_Header | None],
    indices: Sequence[int],
) -> list[Channel]:
    """Channels `indices` (into `names`) of a multi-segment record, segments joined by name."""
    wanted = [normalise_name(names[i]) for i in indices]
    parts: list[list[Channel | None]] = []  # per segment, per wanted channel
    for (name, frames), segment in zip(master.segments or (), segments, strict=True):
        if segment is None or frames == 0:  # a gap, or the layout header
            parts.append([None] * len(indices))
            continue
        seg_names = [normalise_name(s.name) for s in segment.signals]
        found = [seg_names.index(w) if w in seg_names else None for w in wanted]
        with _segment_errors(master, name):
            read = iter(_read_single(segment, [j for j in found if j is not None]))
        parts.append([next(read) if j is not None else None for j in found])
    frames = [n for _, n in master.segments or ()]
    return [_join(master, names[i], frames, [p[k] for p in parts]) for k, i in enumerate(indices)]


def _join(
    master: _Header, name: str, seg_frames: Sequence[int], pieces: Sequence[Channel | None]
) -> Channel:
    """One channel over all segments; NaN where a segment is a gap or lacks the channel."""
    present = [p for p in pieces if p is not None]
    rates = sorted({p.fs_hz for p in present})
    if len(rates) > 1:
        problem = f"channel {_display(name)} changes sampling rate between segments {rates} Hz"
        raise RecordError(master.path, problem)
    fs_hz = rates[0] if rates else master.fs_hz
    spf = max(round(fs_hz / master.fs_hz), 1)
    blocks = [
        p.samples if p is not None else np.full(n * spf, np.nan)
        for n, p in zip(seg_frames, pieces, strict=True)
    ]
    samples = np.concatenate(blocks) if blocks else np.empty(0)
    units = present[0].units if present else ""
    return Channel(name=name, fs_hz=fs_hz, samples=samples, units=units)
