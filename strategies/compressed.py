"""Compressed updates: sites send encoded deltas, the server decodes them into full weights.

:class:`Compressed` is a mixin over any counted strategy (list it first, e.g.
``class CompressedFedAdam(Compressed, CountedFedAdam)``; :func:`strategies.registry.
strategy_class` composes them by name): replies are decoded before the strategy it is mixed into
aggregates, so FedAdam, Krum or the trimmed mean see full weights as usual.
:class:`CompressedFedAvg` is the one over FedAvg (the run config's shorthand
``strategy = "compressed"``).

Protocol (keys in :mod:`biofp_core.protocol`):

- ``configure_train`` sends the global weights as usual and ``config["compression"]`` = the
  scheme (``"none"``, ``"fp16"`` or ``"int8"``).
- The site replies with ONE ArrayRecord in the layout of
  :meth:`biofp_core.compression.EncodedUpdate.to_arrays`: the deltas (local - global) of every
  tensor of the global model, flattened and concatenated in sorted tensor-name order, as ONE array
  under ``"::packed"`` (``protocol.PACKED_KEY``) in the scheme's dtype (float32, float16 or int8),
  and for int8 the tensors' float32 scales in ONE array under ``"::scales"``
  (``protocol.SCALES_KEY``), in the same order. The server splits it with the shapes of the
  global model it sent. The site keeps the quantisation residual with
  :class:`biofp_core.compression.ErrorFeedback`.
- ``aggregate_train`` decodes each reply back to full weights (global + delta) and then runs
  the aggregation of the strategy it is mixed into. Bytes received per round are in the
  aggregated metrics under ``"bytes-received"`` (as for every counted strategy).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from biofp_core.compression import EncodedUpdate, Scheme, check_scheme, decode_delta
from biofp_core.protocol import COMPRESSION
from strategies.base import CountedFedAvg


def arrayrecord_to_encoded(
    arrays: ArrayRecord, shapes: dict[str, tuple[int, ...]]
) -> EncodedUpdate:
    """The encoded update a site sent (layout of ``EncodedUpdate.to_arrays``) for a model of
    `shapes` (name -> shape); raises ValueError on a malformed layout."""
    flat = {name: array.numpy() for name, array in arrays.items()}
    return EncodedUpdate.from_arrays(flat, shapes)


class Compressed(CountedFedAvg):
    """Mixin over a counted strategy whose sites send compressed deltas instead of full weights.

    Takes the parameters of the strategy it is mixed into, plus:

    Parameters
    ----------
    scheme : {"none", "fp16", "int8"} (default: "int8")
        How sites encode their update; sent to them in the train config.
    """

    def __init__(self, *args: Any, scheme: Scheme = "int8", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheme: Scheme = check_scheme(scheme)
        self._global_arrays: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Compression settings:")
        log(INFO, "\t│\t└── Scheme: %s", self.scheme)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the global weights to decode deltas against; tell sites the scheme."""
        self._global_arrays = {name: array.numpy() for name, array in arrays.items()}
        config[COMPRESSION] = self.scheme
        return super().configure_train(server_round, arrays, config, grid)

    def _decode_reply_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """Full weights (global + decoded delta) from a reply's encoded update."""
        if self._global_arrays is None:
            raise ValueError("no global weights to decode against: configure_train never ran")
        shapes = {name: weights.shape for name, weights in self._global_arrays.items()}
        encoded = arrayrecord_to_encoded(arrays, shapes)
        if encoded.scheme != self.scheme:
            raise ValueError(f"update is encoded as {encoded.scheme}, expected {self.scheme}")
        delta = decode_delta(encoded)
        if delta.keys() != self._global_arrays.keys():
            raise ValueError("update tensors do not match the global model's")
        full: dict[str, Array] = {}
        for name, weights in self._global_arrays.items():
            if delta[name].shape != weights.shape:
                raise ValueError(
                    f"update of {name!r} has shape {delta[name].shape}, expected {weights.shape}"
                )
            full[name] = Array((weights + delta[name]).astype(weights.dtype))
        return ArrayRecord(full)


class CompressedFedAvg(Compressed):
    """FedAvg whose sites send compressed deltas instead of full weights.

    Takes the parameters of :class:`flwr.serverapp.strategy.FedAvg`, plus ``scheme``.
    """
