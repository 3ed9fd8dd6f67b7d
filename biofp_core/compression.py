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

The wire layout (:meth:`EncodedUpdate.to_arrays`) is at most two arrays: every encoded tensor
flattened and concatenated in sorted tensor-name order (:func:`tensor_order`) under
``PACKED_KEY`` (``"::packed"``) in the scheme's dtype, and, for int8, all scales in one float32
array of shape ``(n_tensors,)`` under ``SCALES_KEY`` (``"::scales"``) in the same order. The
receiver splits the packed array with the shapes of the global model it sent
(:meth:`EncodedUpdate.from_arrays`). Few arrays rather than one per tensor: every array on the
wire costs its own header and key (about 160 bytes as Flower counts them), which for a small model
of 63 tensors put fp16 at 0.512 of float32 instead of 0.500. Pure numpy; no ``flwr`` import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from biofp_core.errors import ArtifactError, ConfigError
from biofp_core.protocol.keys import PACKED_KEY, SCALES_KEY, SCHEMES, Scheme

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
        """Wire layout: all tensors in one array under PACKED_KEY; int8 scales under SCALES_KEY."""
        order = tensor_order(self.arrays)
        dtype = _DTYPE_OF_SCHEME[self.scheme]
        parts = [self.arrays[name].ravel() for name in order]
        flat = {PACKED_KEY: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)}
        if self.scheme == "int8":
            flat[SCALES_KEY] = np.array([self.scales[n] for n in order], dtype=np.float32)
        return flat

    @classmethod
    def from_arrays(
        cls, flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
    ) -> EncodedUpdate:
        """Inverse of :meth:`to_arrays` for a model whose tensors have `shapes` (name -> shape);
        the scheme is read from the packed array's dtype.

        Raises ValueError when the layout is inconsistent (unknown keys, a packed array of
        another dtype or size than the model's, missing or misshapen scales, scales sent with a
        float scheme).
        """
        unknown = sorted(set(flat) - {PACKED_KEY, SCALES_KEY})
        if unknown:
            raise ValueError(f"encoded update has unknown arrays: {', '.join(unknown)}")
        if PACKED_KEY not in flat:
            raise ValueError(f"encoded update has no packed tensors ({PACKED_KEY!r})")
        packed = np.asarray(flat[PACKED_KEY])
        schemes = [s for s, dt in _DTYPE_OF_SCHEME.items() if np.dtype(dt) == packed.dtype]
        if not schemes or packed.ndim != 1:
            raise ValueError(
                f"encoded update needs a 1-d float32/float16/int8 array, got {packed.dtype} "
                f"{packed.shape}"
            )
        scheme: Scheme = schemes[0]  # type: ignore[assignment]
        arrays = _split(packed, shapes)
        if scheme != "int8":
            if SCALES_KEY in flat:
                raise ValueError(f"{scheme} update carries int8 scales ({SCALES_KEY!r})")
            return cls(scheme=scheme, arrays=arrays)
        return cls(
            scheme=scheme, arrays=arrays, scales=_unpack_scales(flat.get(SCALES_KEY), shapes)
        )


def tensor_order(names: Iterable[str]) -> list[str]:
    """The order of tensors and scales on the wire: sorted names (known to both sides)."""
    return sorted(names)


def _split(packed: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """name -> tensor of the model's shape, cut from the packed array in tensor order."""
    order = tensor_order(shapes)
    sizes = [int(np.prod(shapes[name], dtype=np.int64)) for name in order]
    if packed.size != sum(sizes):
        raise ValueError(f"encoded update holds {packed.size} values, the model has {sum(sizes)}")
    ends = np.cumsum(sizes)
    return {
        name: packed[end - size : end].reshape(shapes[name])
        for name, size, end in zip(order, sizes, ends, strict=True)
    }


def _unpack_scales(packed: np.ndarray | None, names: Iterable[str]) -> dict[str, float]:
    """name -> scale from the packed float32 array; ValueError if it does not fit `names`."""
    order = tensor_order(names)
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
