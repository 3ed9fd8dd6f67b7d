"""Compression of model updates (deltas = local weights - global weights) for the uplink.

Schemes, per tensor:

- ``"none"``: float32, exact.
- ``"fp16"``: IEEE half precision, relative error about 5e-4; 2x fewer bytes than float32.
- ``"int8"``: symmetric, round-to-nearest, one float32 scale per tensor
  (``scale = max|x| / 127``, ``x ~ q * scale``, ``|x - q * scale| <= scale / 2``); about 4x fewer
  bytes than float32.

Quantisation error is not lost: :class:`ErrorFeedback` keeps the residual (true delta minus
decoded delta) at the site and adds it to the next round's delta, so the sum of decoded updates
over rounds tracks the sum of true updates to within one round's error.

The wire layout (:meth:`EncodedUpdate.to_arrays`) is one flat name -> array dict: each tensor
under its own name in its encoded dtype and, for int8, ALL scales in one float32 array of shape
``(n_tensors,)`` under ``SCALES_KEY`` (``"::scales"``), in sorted tensor-name order
(:func:`scale_order`), which both sides derive from the tensor names alone. One array rather than
one per tensor: every array on the wire costs its own .npy header and key (about 170 bytes as
Flower counts them, 40x a float32 scale). Pure numpy; no ``flwr`` import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from biofp_core.errors import ArtifactError, ConfigError
from biofp_core.protocol import SCALES_KEY

Scheme = Literal["none", "fp16", "int8"]
SCHEMES: tuple[str, ...] = get_args(Scheme)

_INT8_LEVELS = 127  # symmetric: q in [-127, 127], so -x encodes exactly as -q
_FP16_MAX = float(np.finfo(np.float16).max)
_DTYPE_OF_SCHEME: dict[str, type[np.generic]] = {
    "none": np.float32,
    "fp16": np.float16,
    "int8": np.int8,
}


def check_scheme(scheme: str) -> Scheme:
    """Return `scheme` if it is a known compression scheme; raise ConfigError otherwise."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown compression scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return scheme  # type: ignore[return-value]


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded delta: one array per tensor (same shape) and, for int8, one scale each."""

    scheme: Scheme
    arrays: dict[str, np.ndarray]  # name -> encoded tensor (float32 / float16 / int8)
    scales: dict[str, float] = field(default_factory=dict)  # name -> scale (int8 only)

    @property
    def nbytes(self) -> int:
        """Bytes of the numeric payload: encoded tensors plus float32 scales."""
        return payload_bytes(self)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat wire layout: tensors under their names; int8 scales packed under SCALES_KEY."""
        flat: dict[str, np.ndarray] = dict(self.arrays)
        if self.scheme == "int8":
            order = scale_order(self.arrays)
            flat[SCALES_KEY] = np.array([self.scales[n] for n in order], dtype=np.float32)
        return flat

    @classmethod
    def from_arrays(cls, flat: Mapping[str, np.ndarray]) -> EncodedUpdate:
        """Inverse of :meth:`to_arrays`; the scheme is read from the tensors' dtype.

        Raises ValueError when the layout is inconsistent (mixed dtypes, missing or misshapen
        scales, scales sent with a float scheme).
        """
        names = [name for name in flat if name != SCALES_KEY]
        dtypes = {np.dtype(flat[name].dtype) for name in names}
        schemes = [s for s, dt in _DTYPE_OF_SCHEME.items() if np.dtype(dt) in dtypes]
        if len(dtypes) != 1 or len(schemes) != 1:
            found = ", ".join(sorted(str(dt) for dt in dtypes)) or "no tensors"
            raise ValueError(f"encoded update needs one of float32/float16/int8, got {found}")
        scheme: Scheme = schemes[0]  # type: ignore[assignment]
        arrays = {n: np.asarray(flat[n]) for n in names}
        if scheme != "int8":
            if SCALES_KEY in flat:
                raise ValueError(f"{scheme} update carries int8 scales ({SCALES_KEY!r})")
            return cls(scheme=scheme, arrays=arrays)
        return cls(scheme=scheme, arrays=arrays, scales=_unpack_scales(flat.get(SCALES_KEY), names))


def scale_order(names: Iterable[str]) -> list[str]:
    """The tensor order of the packed int8 scales: sorted names (known to both sides)."""
    return sorted(names)


def _unpack_scales(packed: np.ndarray | None, names: Iterable[str]) -> dict[str, float]:
    """name -> scale from the packed float32 array; ValueError if it does not fit `names`."""
    order = scale_order(names)
    if packed is None:
        raise ValueError(f"int8 update has no scales ({SCALES_KEY!r})")
    packed = np.asarray(packed)
    if packed.dtype != np.float32 or packed.shape != (len(order),):
        raise ValueError(
            f"int8 update has scales of {packed.dtype} {packed.shape}, expected float32 "
            f"({len(order)},): one per tensor"
        )
    if not np.all(np.isfinite(packed)) or np.any(packed < 0):
        raise ValueError("int8 update has negative or non-finite scales")
    return {name: float(scale) for name, scale in zip(order, packed.tolist(), strict=True)}


def _check_finite_float(name: str, x: np.ndarray) -> np.ndarray:
    """Return `x` as float64 after checking it is a finite floating-point tensor."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"delta {name!r} must be floating point, got {x.dtype}")
    x64 = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x64)):
        raise ValueError(f"delta {name!r} has non-finite values")
    return x64


def _encode_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int8 quantisation, round to nearest: (q, scale)."""
    max_abs = float(np.max(np.abs(x))) if x.size else 0.0
    scale = float(np.float32(max_abs / _INT8_LEVELS))
    if scale == 0.0:
        return np.zeros(x.shape, dtype=np.int8), 0.0
    q = np.clip(np.rint(x / scale), -_INT8_LEVELS, _INT8_LEVELS)
    return q.astype(np.int8), scale


def encode_delta(delta: Mapping[str, np.ndarray], *, scheme: Scheme) -> EncodedUpdate:
    """Encode a model delta tensor by tensor.

    Parameters
    ----------
    delta : Mapping[str, np.ndarray]
        Update minus global weights, per tensor name; floating point and finite.
    scheme : {"none", "fp16", "int8"}
        The encoding (see the module docstring).

    Returns
    -------
    EncodedUpdate
        Encoded tensors (and int8 scales) in the order of `delta`.
    """
    check_scheme(scheme)
    arrays: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    for name, tensor in delta.items():
        x = _check_finite_float(name, np.asarray(tensor))
        if scheme == "int8":
            arrays[name], scales[name] = _encode_int8(x)
        elif scheme == "fp16":
            if x.size and float(np.max(np.abs(x))) > _FP16_MAX:
                raise ValueError(f"delta {name!r} exceeds the float16 range")
            arrays[name] = x.astype(np.float16)
        else:
            arrays[name] = x.astype(np.float32)
    return EncodedUpdate(scheme=scheme, arrays=arrays, scales=scales)


def decode_delta(encoded: EncodedUpdate) -> dict[str, np.ndarray]:
    """Decode an :class:`EncodedUpdate` back to float32 tensors."""
    decoded: dict[str, np.ndarray] = {}
    for name, array in encoded.arrays.items():
        if encoded.scheme == "int8":
            values = array.astype(np.float64) * encoded.scales[name]
            decoded[name] = values.astype(np.float32)
        else:
            decoded[name] = array.astype(np.float32)
    return decoded


def payload_bytes(encoded: EncodedUpdate) -> int:
    """Bytes of the numeric payload of an update: tensors plus one float32 scale each (int8)."""
    tensor_bytes = sum(int(array.nbytes) for array in encoded.arrays.values())
    return tensor_bytes + 4 * len(encoded.scales)


class ErrorFeedback:
    """Site-side memory of quantisation error, added back into the next round's delta.

    Parameters
    ----------
    state : Mapping[str, np.ndarray] | None
        A residual saved by :meth:`state_dict` (e.g. in the ClientApp's Context or on disk);
        None starts from zero.
    """

    def __init__(self, state: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual: dict[str, np.ndarray] = {
            name: np.asarray(value, dtype=np.float32).copy()
            for name, value in (state or {}).items()
        }

    def _corrected(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`delta` plus the stored residual, checked against the residual's tensors."""
        if self.residual and set(self.residual) != set(delta):
            raise ArtifactError("error-feedback state does not match the model's tensors")
        corrected: dict[str, np.ndarray] = {}
        for name, tensor in delta.items():
            x = np.asarray(tensor, dtype=np.float32)
            residual = self.residual.get(name)
            if residual is not None and residual.shape != x.shape:
                raise ArtifactError(
                    f"error-feedback state of {name!r} has shape {residual.shape}, "
                    f"the model has {x.shape}"
                )
            corrected[name] = x if residual is None else x + residual
        return corrected

    def encode(self, delta: Mapping[str, np.ndarray], *, scheme: Scheme) -> EncodedUpdate:
        """Encode ``delta + residual`` and keep the new residual for the next round."""
        corrected = self._corrected(delta)
        encoded = encode_delta(corrected, scheme=scheme)
        decoded = decode_delta(encoded)
        self.residual = {
            name: np.asarray(corrected[name] - decoded[name], dtype=np.float32)
            for name in corrected
        }
        return encoded

    def state_dict(self) -> dict[str, np.ndarray]:
        """The residual as a name -> float32 array dict, to persist between rounds."""
        return {name: value.copy() for name, value in self.residual.items()}

    def reset(self) -> None:
        """Forget the residual (e.g. when the global model is re-initialised)."""
        self.residual = {}
