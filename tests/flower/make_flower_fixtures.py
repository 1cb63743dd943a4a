"""Makes the Flower parity fixtures: inputs and the outputs of Flower 1.42's server strategies.

Run once by a developer through make_flower_fixtures.sh (which makes the pinned virtual
environment under build/); the outputs are committed beside this script and read by
tests/flower_parity_test.cc. Re-make them with:

    bash tests/flower/make_flower_fixtures.sh

A small model of three tensors (the schema is in the JSON), eleven clients per round with
sample counts as weights, two of them far off (40x the others' spread) in round 1. Rules:
FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan on round 1; FedAvgM, FedAdam,
FedYogi and FedAdagrad over three rounds, each round starting from that strategy's own
previous output. Everything is float32 in, as Flower's ArrayRecords carry it; outputs are
stored as float32 too after Flower computed them (some in float64).
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import flwr
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
)
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.run_id = 1  # what a ServerApp's run sets; Message() needs it
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1

SCHEMA = {
    "axes": {"hidden": {"size": 6}, "in": {"size": 5}, "out": {"size": 3}},
    "tensors": {
        "in_proj.weight": ["hidden", "in"],
        "in_proj.bias": ["hidden"],
        "out_proj.weight": ["out", "hidden"],
    },
}
SHAPES = {"in_proj.weight": (6, 5), "in_proj.bias": (6,), "out_proj.weight": (3, 6)}
CLIENTS = 11
ROUNDS = 3
OUTLIERS = (3, 8)  # round 1 only

rng = np.random.default_rng(20261205)
tensors: dict[str, np.ndarray] = {}
meta: dict = {"flwr": flwr.__version__, "schema": SCHEMA, "clients": CLIENTS, "rounds": ROUNDS}

initial = {k: rng.normal(0.0, 1.0, s).astype(np.float32) for k, s in SHAPES.items()}
for k, v in initial.items():
    tensors[f"initial.{k}"] = v

# Each round's clients: the initial model plus N(0, 0.1) (x40 for the outliers of round 1);
# the optimizers' clients are the same draws added to the strategy's current model.
deltas = []
weights = []
for r in range(1, ROUNDS + 1):
    round_deltas = []
    for c in range(CLIENTS):
        scale = 4.0 if (r == 1 and c in OUTLIERS) else 0.1
        round_deltas.append(
            {k: (rng.normal(0.0, 1.0, s) * scale).astype(np.float32) for k, s in SHAPES.items()}
        )
    deltas.append(round_deltas)
    weights.append([int(w) for w in rng.integers(10, 200, CLIENTS)])
meta["weights"] = weights
meta["outliers"] = list(OUTLIERS)


def replies(current: dict, r: int) -> list[Message]:
    out = []
    for c in range(CLIENTS):
        arrays = ArrayRecord({k: Array((current[k] + deltas[r - 1][c][k]).astype(np.float32))
                              for k in SHAPES})
        content = RecordDict(
            {"arrays": arrays, "metrics": MetricRecord({"num-examples": weights[r - 1][c]})})
        out.append(Message(content=content, dst_node_id=c + 1, message_type="train"))
    return out


def as_dict(record: ArrayRecord) -> dict:
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


for c in range(CLIENTS):
    for k in SHAPES:
        tensors[f"round1.client{c}.{k}"] = initial[k] + deltas[0][c][k]

# Round 1: the aggregation rules.
robust = {
    "fedavg": (FedAvg(), {}),
    "fedmedian": (FedMedian(), {}),
    "fedtrimmedavg": (FedTrimmedAvg(beta=0.2), {"beta": 0.2}),
    "krum": (MultiKrum(num_malicious_nodes=2, num_nodes_to_select=1), {"f": 2, "m": 1}),
    "multikrum": (MultiKrum(num_malicious_nodes=2, num_nodes_to_select=4), {"f": 2, "m": 4}),
    "bulyan": (Bulyan(num_malicious_nodes=2), {"f": 2}),
}
meta["aggregation"] = {}
for name, (strategy, params) in robust.items():
    arrays, _ = strategy.aggregate_train(1, replies(initial, 1))
    for k, v in as_dict(arrays).items():
        tensors[f"{name}.{k}"] = v.astype(np.float32)
    entry = {"params": params}
    if "f" in params:
        contents = [m.content for m in replies(initial, 1)]
        theta = params["m"] if "m" in params else CLIENTS - 2 * params["f"]
        chosen = select_multikrum(contents, params["f"], theta)
        entry["selected"] = [contents.index(x) for x in chosen]
    meta["aggregation"][name] = entry

# Three rounds of each server optimizer, from its own previous output.
optimizers = {
    "fedavgm": (lambda: FedAvgM(server_learning_rate=1.0, server_momentum=0.9),
                {"lr": 1.0, "momentum": 0.9}),
    "fedadam": (lambda: FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
                {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "bias_correction": True}),
    "fedyogi": (lambda: FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3),
                {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    "fedadagrad": (lambda: FedAdagrad(eta=0.1, tau=1e-3),
                   {"lr": 0.1, "beta1": 0.0, "beta2": 0.0, "tau": 1e-3}),
}
meta["server_optimizer"] = {}
for name, (make, params) in optimizers.items():
    strategy = make()
    current = dict(initial)
    for r in range(1, ROUNDS + 1):
        record = ArrayRecord({k: Array(v) for k, v in current.items()})
        strategy.current_arrays = {k: v.numpy() for k, v in record.items()}
        if name == "fedavgm":
            strategy.current_arrays = record
        arrays, _ = strategy.aggregate_train(r, replies(current, r))
        current = {k: v.astype(np.float32) for k, v in as_dict(arrays).items()}
        for k, v in current.items():
            tensors[f"{name}.round{r}.{k}"] = v
    meta["server_optimizer"][name] = params

for r in range(2, ROUNDS + 1):
    for c in range(CLIENTS):
        for k in SHAPES:
            tensors[f"round{r}.delta{c}.{k}"] = deltas[r - 1][c][k]

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
save_file(tensors, str(out / "flower_parity.safetensors"))
(out / "flower_parity.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
print(f"wrote {len(tensors)} tensors to {out}")
