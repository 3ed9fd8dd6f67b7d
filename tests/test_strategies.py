"""Strategies on a real Flower InMemoryGrid with real reply Messages (no mocks)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Result,
)
from flwr.simulation import run_simulation
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from biofp_core.compression import ErrorFeedback, decode_delta, encode_delta
from biofp_core.errors import ArtifactError, ConfigError
from biofp_core.protocol import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    BYTES_RECEIVED,
    COMPRESSION,
    CONFIG_KEY,
    EVAL_LOSS,
    METRICS_KEY,
    NODES_EXCLUDED,
    NODES_SAMPLED,
    PROXIMAL_MU,
    REFUSED,
    REPLIES_FAILED,
    REPLIES_MISSING,
    REPLIES_OK,
    REPLIES_REFUSED,
    SERVER_ROUND,
    TRAIN_LOSS,
    EvaluateReplyMetrics,
    RunConfig,
    TrainReplyMetrics,
    is_allowed_reply_metric_key,
    loss_term_key,
)
from server.checkpoint import latest_checkpoint, restore_strategy_state, save_checkpoint
from server.report import add_eval_losses, site_rounds
from strategies import (
    STRATEGIES,
    BudgetAware,
    BudgetAwareFedAvg,
    Compressed,
    CompressedFedAvg,
    CountedFedAvg,
    EligibleNodesGrid,
    build_strategy,
    run_strategy,
    strategy_class,
    strategy_options,
)

GridFactory = Callable[[int], tuple[InMemoryGrid, list[int]]]
SHAPES = {"encoder.weight": (128, 64), "encoder.bias": (64,), "head.weight": (16, 64)}


@pytest.fixture
def make_grid(monkeypatch: pytest.MonkeyPatch) -> GridFactory:
    """Factory of real InMemoryGrids, each over a fresh in-memory LinkState with online nodes.

    Like Flower's ServerApp runtime, it sets the process's TaskIdentity (needed to create
    instruction Messages); the fixture restores it afterwards.
    """

    def make(num_nodes: int) -> tuple[InMemoryGrid, list[int]]:
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        state = factory.state()
        run_id = state.create_run(
            fab_id=None,
            fab_version=None,
            fab_hash=None,
            override_config={},
            federation_id=NOOP_FEDERATION_ID,
            federation_config=None,
            flwr_aid=None,
            primary_task_type="train",
        )
        node_ids = []
        for _ in range(num_nodes):
            node_id = state.create_node(
                NOOP_FLWR_AID,
                NOOP_ACCOUNT_NAME,
                secrets.token_bytes(32),
                heartbeat_interval=HEARTBEAT_INTERVAL_INF,
            )
            state.acknowledge_node_heartbeat(node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
            node_ids.append(node_id)
        run = state.get_run_info(run_ids=[run_id])[0]
        grid = InMemoryGrid(factory)
        grid.set_run(run)
        monkeypatch.setattr(TaskIdentity, "_run_id", run.run_id)
        monkeypatch.setattr(TaskIdentity, "_task_id", run.primary_task_id)
        monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        return grid, node_ids

    return make


def weights(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def reply(instruction: Message, arrays: ArrayRecord | None, metrics: TrainReplyMetrics) -> Message:
    """The reply a ClientApp returns: Message(content, reply_to=instruction)."""
    content = RecordDict({METRICS_KEY: MetricRecord(metrics.to_metrics())})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return Message(content, reply_to=instruction)


def error_reply(instruction: Message, reason: str) -> Message:
    """The reply the simulation engine builds when a ClientApp raises."""
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    return Message(error, reply_to=instruction)


def ok(num_examples: int, **fields: object) -> TrainReplyMetrics:
    return TrainReplyMetrics(num_examples=num_examples, train_loss=0.5, **fields)  # type: ignore[arg-type]


def configure(
    strategy: CountedFedAvg, grid: InMemoryGrid, server_round: int = 1
) -> dict[int, Message]:
    """Run configure_train on the global `weights(0)`; instruction per destination node."""
    messages = strategy.configure_train(server_round, as_record(weights(0)), ConfigRecord(), grid)
    return {msg.metadata.dst_node_id: msg for msg in messages}


# --- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "flower_class"),
    [
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedyogi", FedYogi),
        ("trimmed-mean", FedTrimmedAvg),
        ("krum", Krum),
        ("compressed", FedAvg),
        ("budget-aware", FedAvg),
    ],
)
def test_registry_builds_real_flower_strategies(name: str, flower_class: type) -> None:
    strategy = build_strategy(name, min_train_nodes=1)
    assert isinstance(strategy, flower_class)
    assert isinstance(strategy, CountedFedAvg)
    assert strategy.min_train_nodes == 1


def test_registry_passes_strategy_options() -> None:
    assert build_strategy("fedprox", proximal_mu=0.1).proximal_mu == 0.1  # type: ignore[attr-defined]
    assert build_strategy("trimmed-mean", beta=0.1).beta == 0.1  # type: ignore[attr-defined]
    assert build_strategy("compressed", scheme="fp16").scheme == "fp16"  # type: ignore[attr-defined]
    assert build_strategy("krum", num_malicious_nodes=1).num_malicious_nodes == 1  # type: ignore[attr-defined]


def test_registry_rejects_unknown_names_and_options_with_config_errors() -> None:
    with pytest.raises(ConfigError) as unknown:
        build_strategy("fedsgd")
    assert all(name in str(unknown.value) for name in STRATEGIES)
    with pytest.raises(ConfigError, match=r"no option.*num_nodes_to_select"):
        build_strategy("krum", num_nodes_to_select=2)  # Krum fixes it to 1
    with pytest.raises(ConfigError, match=r"beta"):
        build_strategy("trimmed-mean", beta=0.7)
    with pytest.raises(ConfigError, match="valid: none, fp16, int8"):
        build_strategy("compressed", scheme="int4")


def test_fedprox_sends_mu_and_round_under_protocol_keys(make_grid: GridFactory) -> None:
    grid, _ = make_grid(2)
    strategy = build_strategy("fedprox", proximal_mu=0.3)
    for msg in configure(strategy, grid).values():  # type: ignore[arg-type]
        assert msg.content[CONFIG_KEY][PROXIMAL_MU] == 0.3
        assert msg.content[CONFIG_KEY][SERVER_ROUND] == 1
        assert ARRAYS_KEY in msg.content


# --- reply metrics (the contract the validator enforces) ------------------------------------


def test_reply_metrics_round_trip_through_protocol_keys() -> None:
    metrics = ok(12, loss_terms={"recon_ecg": 0.2}, epsilon=1.5, delta=1e-5, payload_bytes=99)
    flat = metrics.to_metrics()
    assert flat[loss_term_key("recon_ecg")] == 0.2 and flat[REFUSED] == 0
    assert all(is_allowed_reply_metric_key(k) for k in flat)
    assert TrainReplyMetrics.from_metrics(MetricRecord(flat)) == metrics
    refusal = TrainReplyMetrics.refusal().to_metrics()
    assert refusal[REFUSED] == 1 and refusal[BUDGET_EXHAUSTED] == 1 and TRAIN_LOSS not in refusal


@pytest.mark.parametrize(
    "flat",
    [
        {"num-examples": 3},  # contributing without a loss
        {"num-examples": 3.5, TRAIN_LOSS: 1.0},
        {"num-examples": 3, TRAIN_LOSS: float("nan")},
        {"num-examples": 3, TRAIN_LOSS: 1.0, REFUSED: 2},
        {"num-examples": 3, TRAIN_LOSS: 1.0, REFUSED: 1},  # a refusal carries no examples
        {"num-examples": 3, TRAIN_LOSS: 1.0, "loss-Bad Term": 1.0},
        {"num-examples": 3, TRAIN_LOSS: 1.0, "subject_ids": 1.0},
    ],
)
def test_reply_metrics_reject_malformed_replies(flat: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TrainReplyMetrics.from_metrics(flat)


# --- reply accounting ------------------------------------------------------------------------


def test_failed_refused_invalid_and_missing_replies_are_counted(
    caplog: pytest.LogCaptureFixture, make_grid: GridFactory
) -> None:
    grid, nodes = make_grid(5)
    strategy = CountedFedAvg(min_train_nodes=5, min_available_nodes=5)
    sent = configure(strategy, grid)
    assert set(sent) == set(nodes)
    good, broken, refusing, malformed, silent = nodes
    update = weights(1)
    bad_metrics = RecordDict({METRICS_KEY: MetricRecord({"num-examples": 3, "secret": 1.0})})
    replies = [
        reply(sent[good], as_record(update), ok(10)),
        error_reply(sent[broken], "Traceback...\nValueError: site data missing"),
        reply(sent[refusing], None, TrainReplyMetrics.refusal()),
        Message(bad_metrics, reply_to=sent[malformed]),
    ]  # `silent` never answers (timeout)
    with caplog.at_level(logging.WARNING, logger="strategies.base"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    for name, value in update.items():
        np.testing.assert_allclose(arrays[name].numpy(), value, rtol=1e-6)
    counts = {k: metrics[k] for k in (NODES_SAMPLED, REPLIES_OK, REPLIES_FAILED, REPLIES_REFUSED)}
    assert counts == {NODES_SAMPLED: 5, REPLIES_OK: 1, REPLIES_FAILED: 2, REPLIES_REFUSED: 1}
    assert metrics[REPLIES_MISSING] == 1 and metrics[TRAIN_LOSS] == pytest.approx(0.5)
    report = strategy.round_replies[1]
    assert report.contributed == [good] and report.refused == [refusing]
    assert report.missing == [silent] and report.budget_exhausted == [refusing]
    assert report.failed[broken] == "error 2: ValueError: site data missing"
    assert "secret" in report.failed[malformed]
    assert "site data missing" in caplog.text and "did not reply" in caplog.text


def test_a_round_where_every_site_failed_is_reported_not_silent(make_grid: GridFactory) -> None:
    grid, _ = make_grid(2)
    strategy = CountedFedAvg()
    sent = configure(strategy, grid)
    arrays, metrics = strategy.aggregate_train(1, [error_reply(m, "boom") for m in sent.values()])
    assert arrays is None
    assert metrics is not None
    assert metrics[REPLIES_OK] == 0 and metrics[REPLIES_FAILED] == 2


# --- compressed ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "fp16", "none"])
def test_compressed_strategy_decodes_deltas_to_the_weighted_average(
    scheme: str, make_grid: GridFactory
) -> None:
    grid, nodes = make_grid(3)
    strategy = CompressedFedAvg(scheme=scheme, min_train_nodes=3, min_available_nodes=3)  # type: ignore[arg-type]
    sent = configure(strategy, grid)
    assert all(m.content[CONFIG_KEY][COMPRESSION] == scheme for m in sent.values())
    global_w = weights(0)
    examples = [10, 30, 60]
    replies: list[Message] = []
    expected = {k: np.zeros(s) for k, s in SHAPES.items()}
    truth = {k: np.zeros(s) for k, s in SHAPES.items()}
    for i, (node, n) in enumerate(zip(nodes, examples, strict=True)):
        local = {
            k: v + d
            for (k, v), d in zip(global_w.items(), weights(10 + i, 0.01).values(), strict=True)
        }
        delta = {k: local[k] - global_w[k] for k in global_w}
        encoded = ErrorFeedback().encode(delta, scheme=scheme)  # type: ignore[arg-type]
        metrics = ok(n, payload_bytes=encoded.nbytes)
        replies.append(reply(sent[node], as_record(encoded.to_arrays()), metrics))
        for k, d in decode_delta(encoded).items():
            expected[k] += n / 100 * (global_w[k] + d)
            truth[k] += n / 100 * local[k]
    arrays, agg = strategy.aggregate_train(1, replies)
    assert arrays is not None and agg is not None
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arrays[k].numpy(), truth[k], atol=2e-4)
    fp32_bytes = 3 * sum(4 * np.prod(s) for s in SHAPES.values())
    ratio = {"none": 1.0, "fp16": 0.5, "int8": 0.25}[scheme]
    assert agg[REPLIES_OK] == 3
    assert fp32_bytes * ratio < agg[BYTES_RECEIVED] < fp32_bytes * ratio * 1.2  # + npy headers


def test_an_int8_update_of_a_small_m2ae_is_at_most_027_of_fp32_as_flower_counts_it() -> None:
    """Issue 4's figures on the wire: ONE packed tensor array (+ ONE scales array for int8)."""
    from biofp_core.models import build_model

    small = {"width": 64, "heads": 4, "decoder_width": 32, "modality_depth": 1, "fusion_depth": 1}
    state = {k: v.numpy() for k, v in build_model("m2ae", small).state_dict().items()}
    fp32_bytes = sum(4 * v.size for v in state.values())
    rng = np.random.default_rng(0)
    delta = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in state.items()}
    record = as_record(encode_delta(delta, scheme="int8").to_arrays())
    assert len(record) == 2
    assert record.count_bytes() / fp32_bytes <= 0.27
    fp16 = as_record(encode_delta(delta, scheme="fp16").to_arrays())
    assert len(fp16) == 1 and fp16.count_bytes() / fp32_bytes <= 0.51


def test_compressed_strategy_counts_undecodable_updates_as_failed(make_grid: GridFactory) -> None:
    grid, nodes = make_grid(2)
    strategy = CompressedFedAvg(scheme="int8")
    sent = configure(strategy, grid)
    delta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    wrong_scheme = as_record(encode_delta(delta, scheme="fp16").to_arrays())
    full_weights = as_record(weights(3))  # float32: read as scheme "none"
    replies = [
        reply(sent[nodes[0]], wrong_scheme, ok(5)),
        reply(sent[nodes[1]], full_weights, ok(5)),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics is not None and metrics[REPLIES_FAILED] == 2
    reasons = sorted(strategy.round_replies[1].failed.values())
    assert any("expected int8" in r for r in reasons)  # decodable, but another scheme
    assert any("unknown arrays" in r for r in reasons)  # full weights are no encoded update


# --- budget-aware ----------------------------------------------------------------------------


def test_budget_aware_strategy_stops_sampling_exhausted_and_refusing_sites(
    make_grid: GridFactory,
) -> None:
    grid, nodes = make_grid(4)
    strategy = BudgetAwareFedAvg(min_train_nodes=1, min_available_nodes=1, fraction_train=1.0)
    sent = configure(strategy, grid, server_round=1)
    assert set(sent) == set(nodes)
    spent, refusing, healthy, broken = nodes
    update = as_record(weights(1))
    replies = [
        reply(sent[spent], update, ok(5, budget_exhausted=True, epsilon=3.0, delta=1e-5)),
        reply(sent[refusing], None, TrainReplyMetrics.refusal(epsilon=3.1, delta=1e-5)),
        reply(sent[healthy], update, ok(5, epsilon=1.0, delta=1e-5)),
        error_reply(sent[broken], "transient"),  # failures are reported, not excluded
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics[NODES_EXCLUDED] == 2 and metrics[REPLIES_OK] == 2
    assert strategy.excluded_node_ids == {spent, refusing}
    assert strategy.round_replies[1].epsilon[refusing] == 3.1
    second = configure(strategy, grid, server_round=2)
    assert set(second) == {healthy, broken}
    assert strategy.round_replies[2].sampled == {healthy, broken}


def test_budget_aware_strategy_skips_training_when_too_few_sites_have_budget(
    caplog: pytest.LogCaptureFixture, make_grid: GridFactory
) -> None:
    grid, nodes = make_grid(3)
    strategy = BudgetAwareFedAvg(min_train_nodes=2, min_available_nodes=2)
    strategy.excluded_node_ids.update(nodes[:2])
    with caplog.at_level(logging.WARNING, logger="strategies.budget_aware"):
        assert configure(strategy, grid, server_round=4) == {}
    assert "only 1 sites have privacy budget left" in caplog.text
    _, metrics = strategy.aggregate_train(4, [])
    assert metrics is not None and metrics[NODES_SAMPLED] == 0 and metrics[REPLIES_OK] == 0


def test_eligible_nodes_grid_hides_excluded_nodes_only(make_grid: GridFactory) -> None:
    grid, nodes = make_grid(3)
    view = EligibleNodesGrid(grid, {nodes[0]})
    assert set(view.get_node_ids()) == set(nodes[1:])
    assert {n.node_id for n in view.get_nodes()} == set(nodes[1:])
    assert view.run.run_id == grid.run.run_id


# --- end to end: Flower's simulation engine --------------------------------------------------


def test_simulation_reports_a_raising_site_and_stops_sampling_a_spent_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 virtual sites in Flower's simulation engine: one raises, one spends its budget."""
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray FutureWarning
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        partition = context.node_config["partition-id"]
        if partition == 0:
            raise RuntimeError("no windows at this site")
        metrics = ok(10 * int(partition), budget_exhausted=partition == 1)
        return reply(msg, msg.content[ARRAYS_KEY], metrics)

    strategy = BudgetAwareFedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    results: list[Result] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < 3:  # let every virtual node register first
            time.sleep(0.1)
        initial = ArrayRecord({"w": Array(np.ones(4, np.float32))})
        results.append(strategy.start(grid=grid, initial_arrays=initial, num_rounds=2))

    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
    run_simulation(server, client, num_supernodes=3, backend_config=backend)

    (result,) = results
    first, second = strategy.round_replies[1], strategy.round_replies[2]
    assert (len(first.sampled), len(first.contributed), len(first.failed)) == (3, 2, 1)
    assert "no windows at this site" in next(iter(first.failed.values()))
    assert strategy.excluded_node_ids == set(first.budget_exhausted)
    assert len(second.sampled) == 2 and not second.sampled & strategy.excluded_node_ids
    assert (len(second.contributed), len(second.failed)) == (1, 1)
    assert result.train_metrics_clientapp[2][REPLIES_FAILED] == 1
    assert result.train_metrics_clientapp[2][NODES_EXCLUDED] == 1


def test_the_registry_builds_exactly_the_strategies_the_wire_contract_names() -> None:
    from biofp_core.protocol import STRATEGY_NAMES
    from strategies.registry import STRATEGIES

    assert tuple(STRATEGIES) == STRATEGY_NAMES


# --- composition: any base strategy x compression x budget-aware -----------------------------


def test_shorthands_are_fedavg_composed_and_any_base_composes() -> None:
    assert strategy_class("compressed") is strategy_class("fedavg", compressed=True)
    assert strategy_class("budget-aware") is strategy_class("fedavg", budget_aware=True)
    both = strategy_class("compressed", budget_aware=True)
    assert both is strategy_class("fedavg", compressed=True, budget_aware=True)
    assert issubclass(both, Compressed) and issubclass(both, BudgetAware)
    for name in ("fedprox", "fedadam", "fedyogi", "trimmed-mean", "krum"):
        cls = strategy_class(name, compressed=True, budget_aware=True)
        assert issubclass(cls, STRATEGIES[name]) and issubclass(cls, BudgetAware)
        assert "scheme" in strategy_options(cls)
    strategy = build_strategy("fedadam", compressed=True, budget_aware=True, scheme="fp16", eta=0.3)
    assert isinstance(strategy, FedAdam) and strategy.scheme == "fp16" and strategy.eta == 0.3  # type: ignore[attr-defined]


INT8_FEDADAM = {"strategy": "fedadam", "compression": "int8", "budget-aware": True,
                "min-sites": 1, "fraction-evaluate": 0.0}  # fmt: skip


def int8_replies(
    sent: dict[int, Message], global_w: dict[str, np.ndarray], server_round: int,
    spent: int | None, *, decoded: bool = False,
) -> list[Message]:  # fmt: skip
    """Each node's int8-encoded update (or, `decoded`, the full weights the server decodes it
    into); `spent` reports its budget exhausted."""
    replies = []
    for i, node in enumerate(sorted(sent)):
        delta = weights(100 * server_round + i, 0.01)
        encoded = ErrorFeedback().encode(delta, scheme="int8")
        full = {k: (global_w[k] + d).astype(np.float32) for k, d in decode_delta(encoded).items()}
        metrics = ok(10 * (i + 1), epsilon=1.0 + i, delta=1e-5, payload_bytes=encoded.nbytes,
                     budget_exhausted=node == spent)  # fmt: skip
        arrays = as_record(full if decoded else encoded.to_arrays())
        replies.append(reply(sent[node], arrays, metrics))
    return replies


def train_round(
    strategy: CountedFedAvg, grid: InMemoryGrid, server_round: int,
    global_w: dict[str, np.ndarray], spent: int | None, *, decoded: bool = False,
) -> tuple[dict[str, np.ndarray], set[int]]:  # fmt: skip
    """One training round on real Messages: (new global weights, the nodes sampled)."""
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(server_round, as_record(global_w), ConfigRecord(), grid)
    }
    replies = int8_replies(sent, global_w, server_round, spent, decoded=decoded)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}, set(sent)


def test_budget_aware_fedadam_over_int8_updates(make_grid: GridFactory) -> None:
    """The run config asks for it by name; FedAdam's update over the decoded int8 average is
    exactly plain FedAdam's over the same full weights; the spent site is excluded after."""
    run = RunConfig.from_run_config(INT8_FEDADAM)
    strategy = run_strategy(run)
    assert isinstance(strategy, FedAdam)
    assert isinstance(strategy, Compressed) and isinstance(strategy, BudgetAware)
    options = {k: v for k, v in run.strategy_kwargs().items() if k != "scheme"}
    plain = build_strategy("fedadam", **options)
    grid, nodes = make_grid(3)
    spent = nodes[0]
    sent = configure(strategy, grid)
    assert all(m.content[CONFIG_KEY][COMPRESSION] == "int8" for m in sent.values())

    global_w = weights(0)
    new_w, sampled = train_round(strategy, grid, 1, global_w, spent)
    expected, _ = train_round(plain, grid, 1, global_w, spent, decoded=True)
    assert sampled == set(nodes)
    for k in SHAPES:
        np.testing.assert_allclose(new_w[k], expected[k], rtol=1e-6, atol=1e-7)
    assert strategy.m_t is not None and strategy.v_t is not None  # type: ignore[attr-defined]
    report = strategy.round_replies[1]
    assert report.excluded == {spent} and strategy.excluded_node_ids == {spent}  # type: ignore[attr-defined]
    sites = {s.node_id: s for s in site_rounds(report)}  # the metrics the strategy parsed
    assert sites[spent].budget_exhausted and sites[spent].epsilon == 1 + sorted(nodes).index(spent)
    assert all(s.status == "ok" and s.payload_bytes > 0 for s in sites.values())

    second, sampled = train_round(strategy, grid, 2, new_w, None)
    assert sampled == set(nodes) - {spent}
    sent_plain = {  # plain FedAdam samples every site: answer from the same two
        m.metadata.dst_node_id: m
        for m in plain.configure_train(2, as_record(new_w), ConfigRecord(), grid)
        if m.metadata.dst_node_id != spent
    }
    plain_arrays, _ = plain.aggregate_train(
        2, int8_replies(sent_plain, new_w, 2, None, decoded=True)
    )
    assert plain_arrays is not None
    for k in SHAPES:
        np.testing.assert_allclose(second[k], plain_arrays[k].numpy(), rtol=1e-6, atol=1e-7)


def test_a_resumed_strategy_continues_exactly_from_its_checkpointed_state(
    tmp_path: Path, make_grid: GridFactory
) -> None:
    """FedAdam's moments and the exclusions go through state_dict, a checkpoint file and
    load_state_dict; the resumed strategy's next round is the uninterrupted one's."""
    run = RunConfig.from_run_config({**INT8_FEDADAM, "out-dir": str(tmp_path)})
    grid, nodes = make_grid(3)
    spent = nodes[1]
    first = run_strategy(run)
    after_1, _ = train_round(first, grid, 1, weights(0), spent)
    save_checkpoint(tmp_path, server_round=1, arrays=after_1, strategy=first,
                    strategy_name=run.strategy, model_name=run.model)  # fmt: skip
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and set(checkpoint.strategy_arrays) == {"m_t", "v_t"}

    resumed = run_strategy(run)
    restore_strategy_state(resumed, checkpoint)
    saved, restored = first.state_dict(), resumed.state_dict()
    assert restored.values == saved.values == {"excluded_node_ids": [spent]}
    for entry in ("m_t", "v_t"):
        for k, v in saved.arrays[entry].items():
            np.testing.assert_array_equal(restored.arrays[entry][k], v)

    uninterrupted, sampled = train_round(first, grid, 2, after_1, None)
    continued, resampled = train_round(resumed, grid, 2, checkpoint.arrays, None)
    assert sampled == resampled == set(nodes) - {spent}
    for k in SHAPES:
        np.testing.assert_array_equal(continued[k], uninterrupted[k])

    plain = build_strategy("fedadam")  # no budget-aware sampling: the exclusions are not its own
    with pytest.raises(ArtifactError, match="excluded_node_ids does not belong") as exc:
        restore_strategy_state(plain, checkpoint)
    assert "\n" not in str(exc.value)


# --- evaluation replies: the same validator ---------------------------------------------------


def test_evaluation_replies_are_checked_once_and_kept_for_the_report(
    make_grid: GridFactory,
) -> None:
    grid, nodes = make_grid(5)
    strategy = CountedFedAvg(min_evaluate_nodes=5, min_available_nodes=5)
    messages = strategy.configure_evaluate(1, as_record(weights(0)), ConfigRecord(), grid)
    sent = {m.metadata.dst_node_id: m for m in messages}
    small, large, refusing, malformed, broken = nodes
    answers = {small: EvaluateReplyMetrics(num_examples=2, eval_loss=1.0),
               large: EvaluateReplyMetrics(num_examples=6, eval_loss=3.0),
               refusing: EvaluateReplyMetrics(num_examples=0, refused=True)}  # fmt: skip
    replies = [
        Message(RecordDict({METRICS_KEY: MetricRecord(m.to_metrics())}), reply_to=sent[n])
        for n, m in answers.items()
    ]
    leaky = MetricRecord({"num-examples": 3, EVAL_LOSS: 9.0, "subject-ids": 1.0})
    replies.append(Message(RecordDict({METRICS_KEY: leaky}), reply_to=sent[malformed]))
    replies.append(error_reply(sent[broken], "no held-out subjects"))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics[EVAL_LOSS] == pytest.approx(2.5)  # (2*1 + 6*3) / 8
    report = strategy.round_replies[1]
    assert set(report.evaluated) == {small, large}
    assert set(report.eval_failed) == {malformed, broken}
    assert "subject-ids" in report.eval_failed[malformed]
    sites: list = []
    assert add_eval_losses(sites, report) == pytest.approx(2.5)
    assert {s.node_id: s.eval_loss for s in sites} == {small: 1.0, large: 3.0}
    assert [s.node_id for s in sites] == sorted([small, large])  # in node order
