"""Update compression: error bounds, payload sizes, wire layout and error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from biofp_core.compression import (
    SCHEMES,
    EncodedUpdate,
    ErrorFeedback,
    decode_delta,
    encode_delta,
    payload_bytes,
    tensor_order,
)
from biofp_core.errors import ArtifactError, ConfigError
from biofp_core.protocol import PACKED_KEY, SCALES_KEY


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    """A small model-shaped delta: weights, a bias, a scalar and an all-zero tensor."""
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.normal(0, 1e-2, (64, 32)).astype(np.float32),
        "encoder.bias": rng.normal(0, 1e-3, (32,)).astype(np.float32),
        "head.weight": rng.normal(0, 5e-2, (16, 64)).astype(np.float32),
        "temperature": np.asarray(0.003, dtype=np.float32),
        "frozen": np.zeros((8,), dtype=np.float32),
    }


def _shapes(delta: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: x.shape for name, x in delta.items()}


def test_int8_error_is_at_most_half_a_step_per_element() -> None:
    delta = _delta()
    encoded = encode_delta(delta, scheme="int8")
    decoded = decode_delta(encoded)
    for name, x in delta.items():
        scale = encoded.scales[name]
        assert encoded.arrays[name].dtype == np.int8
        assert scale == pytest.approx(float(np.max(np.abs(x), initial=0.0)) / 127, rel=1e-6)
        error = np.abs(decoded[name].astype(np.float64) - x)
        assert np.all(error <= scale / 2 * (1 + 1e-5) + 1e-12), name
    assert np.all(decoded["frozen"] == 0)


def test_int8_is_symmetric_and_keeps_the_extremes() -> None:
    x = np.array([-2.0, -1.0, 0.0, 0.5, 2.0], dtype=np.float32)
    encoded = encode_delta({"x": x}, scheme="int8")
    assert encoded.arrays["x"].tolist() == [-127, -64, 0, 32, 127]  # rint(63.5) = 64 (even)
    assert decode_delta(encoded)["x"][[0, 4]].tolist() == [-2.0, 2.0]


def test_fp16_relative_error_is_about_1e_3() -> None:
    delta = _delta()
    decoded = decode_delta(encode_delta(delta, scheme="fp16"))
    for name, x in delta.items():
        assert decoded[name].dtype == np.float32
        np.testing.assert_allclose(decoded[name], x, rtol=1e-3, atol=1e-7)


def test_none_is_exact() -> None:
    delta = _delta()
    decoded = decode_delta(encode_delta(delta, scheme="none"))
    for name, x in delta.items():
        np.testing.assert_array_equal(decoded[name], x)


def test_payload_drops_2x_for_fp16_and_about_4x_for_int8_including_scales() -> None:
    delta = _delta()
    fp32 = payload_bytes(encode_delta(delta, scheme="none"))
    fp16 = payload_bytes(encode_delta(delta, scheme="fp16"))
    int8 = encode_delta(delta, scheme="int8")
    assert fp32 == sum(x.nbytes for x in delta.values())
    assert fp16 * 2 == fp32
    assert payload_bytes(int8) == fp32 // 4 + 4 * len(delta)  # one float32 scale per tensor
    assert 3.9 < fp32 / payload_bytes(int8) <= 4.0
    assert int8.nbytes == payload_bytes(int8)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wire_layout_round_trips(scheme: str) -> None:
    delta = _delta()
    encoded = encode_delta(delta, scheme=scheme)  # type: ignore[arg-type]
    flat = encoded.to_arrays()
    assert set(flat) == ({PACKED_KEY, SCALES_KEY} if scheme == "int8" else {PACKED_KEY})
    assert flat[PACKED_KEY].shape == (sum(x.size for x in delta.values()),)
    back = EncodedUpdate.from_arrays(flat, _shapes(delta))
    assert back.scheme == scheme
    for name, array in encoded.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], array)
        assert back.arrays[name].shape == delta[name].shape
        assert back.scales.get(name) == encoded.scales.get(name)  # float32 scales: exact
    assert payload_bytes(back) == payload_bytes(encoded)


def test_tensors_and_scales_travel_packed_in_sorted_name_order() -> None:
    delta = _delta()
    encoded = encode_delta(delta, scheme="int8")
    flat = encoded.to_arrays()
    order = tensor_order(delta)
    assert order == sorted(delta) and order != list(delta)  # the order is not insertion order
    packed, scales = flat[PACKED_KEY], flat[SCALES_KEY]
    assert packed.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (5,)
    expected = np.concatenate([encoded.arrays[name].ravel() for name in order])
    np.testing.assert_array_equal(packed, expected)
    assert scales.tolist() == [encoded.scales[name] for name in order]
    assert scales[order.index("frozen")] == 0.0 and scales[order.index("encoder.weight")] > 0
    # The receiver cuts by the model's shapes, whatever order its shape table lists them in.
    shapes = dict(reversed(list(_shapes(delta).items())))
    for name, x in decode_delta(EncodedUpdate.from_arrays(flat, shapes)).items():
        np.testing.assert_array_equal(x, decode_delta(encoded)[name])


def test_malformed_layouts_are_rejected() -> None:
    delta = _delta()
    shapes = _shapes(delta)
    flat = encode_delta(delta, scheme="int8").to_arrays()
    no_scales = {k: v for k, v in flat.items() if k != SCALES_KEY}
    with pytest.raises(ValueError, match="no scales"):
        EncodedUpdate.from_arrays(no_scales, shapes)
    for bad in (flat[SCALES_KEY][:-1], flat[SCALES_KEY].astype(np.float64)):
        with pytest.raises(ValueError, match="one per tensor"):
            EncodedUpdate.from_arrays({**flat, SCALES_KEY: bad}, shapes)
    negative = -flat[SCALES_KEY]
    negative[0] = -1.0
    with pytest.raises(ValueError, match="negative or non-finite"):
        EncodedUpdate.from_arrays({**flat, SCALES_KEY: negative}, shapes)
    fp16 = encode_delta(delta, scheme="fp16").to_arrays()
    with pytest.raises(ValueError, match="fp16 update carries int8 scales"):
        EncodedUpdate.from_arrays({**fp16, SCALES_KEY: flat[SCALES_KEY]}, shapes)
    with pytest.raises(ValueError, match="holds 2 values, the model has"):
        EncodedUpdate.from_arrays({PACKED_KEY: np.zeros(2, np.float16)}, shapes)
    with pytest.raises(ValueError, match="1-d float32/float16/int8"):
        EncodedUpdate.from_arrays({PACKED_KEY: np.zeros(2, np.float64)}, shapes)
    with pytest.raises(ValueError, match=r"unknown arrays: encoder\.weight"):
        EncodedUpdate.from_arrays({**flat, "encoder.weight": delta["encoder.weight"]}, shapes)
    with pytest.raises(ValueError, match="no packed tensors"):
        EncodedUpdate.from_arrays({SCALES_KEY: flat[SCALES_KEY]}, shapes)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="valid: none, fp16, int8"):
        encode_delta(_delta(), scheme="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        encode_delta({"x": np.array([1.0, np.nan], np.float32)}, scheme="int8")
    with pytest.raises(ValueError, match="floating point"):
        encode_delta({"x": np.arange(3)}, scheme="fp16")
    with pytest.raises(ValueError, match="float16 range"):
        encode_delta({"x": np.array([1e6], np.float32)}, scheme="fp16")


def _sum_error(rounds: list[dict[str, np.ndarray]], *, feedback: bool) -> float:
    """Max abs error of the summed decoded updates against the summed true updates."""
    memory = ErrorFeedback()
    true_sum = {name: np.zeros_like(x) for name, x in rounds[0].items()}
    decoded_sum = {name: np.zeros_like(x) for name, x in rounds[0].items()}
    for delta in rounds:
        if feedback:
            encoded = memory.encode(delta, scheme="int8")
        else:
            encoded = encode_delta(delta, scheme="int8")
        for name, x in decode_delta(encoded).items():
            decoded_sum[name] += x
            true_sum[name] += delta[name]
    return max(float(np.max(np.abs(decoded_sum[n] - true_sum[n]))) for n in true_sum)


def test_error_feedback_makes_the_decoded_sum_track_the_true_sum() -> None:
    rng = np.random.default_rng(1)
    # One large coordinate and a steady small drift below half a quantisation step: without
    # feedback the drift is rounded away every round; with feedback it accumulates and is sent.
    rounds = []
    for _ in range(20):
        x = (2e-4 + rng.normal(0, 5e-5, 256)).astype(np.float32)
        x[0] = 0.1
        rounds.append({"w": x})
    without = _sum_error(rounds, feedback=False)
    with_feedback = _sum_error(rounds, feedback=True)
    one_step = 0.1 / 127
    assert with_feedback <= one_step / 2 * 1.01  # bounded by one round's error
    assert without > 5 * with_feedback


def test_error_feedback_state_persists_as_arrays() -> None:
    delta = _delta()
    memory = ErrorFeedback()
    memory.encode(delta, scheme="int8")
    state = memory.state_dict()
    assert set(state) == set(delta)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    restored = ErrorFeedback(state)
    again = _delta(seed=1)
    a = decode_delta(memory.encode(again, scheme="int8"))
    b = decode_delta(restored.encode(again, scheme="int8"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ArtifactError, match="does not match"):
        ErrorFeedback(state).encode({"other": np.zeros(3, np.float32)}, scheme="int8")
    memory.reset()
    assert memory.state_dict() == {}
