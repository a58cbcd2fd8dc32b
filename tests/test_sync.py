"""Batch statistics over processes: two gloo processes equal one process on the whole batch.

Every case runs in a pair of spawned processes (one pair for the module, see
``process_pair.py``): each process takes its share of a global float64 batch, and the
outputs, input gradients, parameter gradients (summed over processes) and buffers must equal
those of one unsynchronised process on the concatenated batch, to 1e-9, over two training
steps and an eval step; with unequal shares, a context absent from one process, and a process
with no sample at all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import contextnorm as cn
from process_pair import ProcessPair

C = 4
K = 3
TOLERANCE = {"rtol": 0.0, "atol": 1e-9}

# Global contexts and each process's share of the batch: every context on both processes
# (the second holds one sample of each), context 2 absent from the second process, and an
# empty second process.
SHARES = {
    "uneven": ([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], (7, 3)),
    "missing": ([0, 1, 2, 0, 1, 2, 0, 1, 1, 0], (6, 4)),
    "empty": ([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], (10, 0)),
}


def _bn(**options: Any) -> nn.Module:
    return nn.BatchNorm2d(C, **options)


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "cn": lambda: cn.ContextNorm(C, K),
    "cn-momentum-none-prior": lambda: cn.ContextNorm(
        C, K, momentum=None, estimate_prior=True, prior_scaling=True
    ),
    "cn-dense": lambda: cn.ContextNorm(C, K),
    "cn-tokens": lambda: cn.ContextNorm(C, K, channel_last=True),
    "cn-soft": lambda: cn.ContextNorm(C, K),
    "cnx": lambda: cn.ContextNormX(C, K, estimate_prior=True),
    "cne": lambda: cn.ContextNormE(C, K),
    "cne-mlp": lambda: cn.ContextNormE(C, K, hidden_features=5),
    "modenorm": lambda: cn.ModeNorm(C, K),
    "modenorm-momentum-none": lambda: cn.ModeNorm(C, K, momentum=None),
    "switchnorm": lambda: cn.SwitchNorm(C, momentum=None),
    "batchnorm": lambda: _bn(),
    "batchnorm-dense": lambda: nn.BatchNorm1d(C, momentum=None),
    "acn-momentum": lambda: cn.AdaptiveContextNorm(C, K),
    "acn-momentum-none-tokens": lambda: cn.AdaptiveContextNorm(
        C, K, momentum=None, prior_scaling=True, channel_last=True
    ),
    "acn-gradient": lambda: cn.AdaptiveContextNorm(C, K, update="gradient", prior_scaling=True),
    "acn-gradient-dense": lambda: cn.AdaptiveContextNorm(C, K, update="gradient"),
    # A floor that most components hit: its gradient goes through every process's statistics.
    "acn-gradient-floor": lambda: cn.AdaptiveContextNorm(
        C, K, update="gradient", variance_floor=0.9
    ),
}


@dataclass
class Case:
    layer: str
    shares: str
    steps: int = 2
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def shape_of(name: str, n: int) -> tuple[int, ...]:
    if name.endswith("dense"):
        return (n, C)
    if name.endswith("tokens"):
        return (n, 5, C)
    return (n, C, 3, 2)


def build(name: str, seed: int) -> nn.Module:
    """The layer, in float64, with parameters drawn at random (so that no gradient is trivial)."""
    torch.manual_seed(seed)
    layer = LAYERS[name]().double().train()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return layer


def batches(case: Case) -> list[dict[str, torch.Tensor]]:
    """The global batches of a case: inputs, contexts and the upstream gradient of each step."""
    ids, _ = SHARES[case.shares]
    generator = torch.Generator().manual_seed(case.seed + 1)
    out = []
    for step in range(case.steps):
        n = len(ids)
        x = torch.randn(shape_of(case.layer, n), generator=generator, dtype=torch.float64)
        x = x * (1.0 + step) + 3.0 - step
        context = torch.tensor(ids)
        if case.layer.endswith("soft"):
            context = torch.softmax(
                2 * torch.randn(n, K, generator=generator, dtype=torch.float64), 1
            )
        upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        out.append({"x": x, "context": context, "upstream": upstream})
    return out


def call(layer: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return layer(x, context) if getattr(layer, "uses_context", False) else layer(x)


def run_steps(layer: nn.Module, steps: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Train steps then one eval step; what each step produced and the final state."""
    outputs, input_grads = [], []
    for step in steps:
        layer.zero_grad(set_to_none=False)
        x = step["x"].clone().requires_grad_()
        y = call(layer, x, step["context"])
        (y * step["upstream"]).sum().backward()
        outputs.append(y.detach().clone())
        input_grads.append(x.grad.clone())
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.eval()
    with torch.no_grad():
        evaluated = call(layer, steps[-1]["x"], steps[-1]["context"]).clone()
    layer.train()
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    return {
        "outputs": outputs,
        "input_grads": input_grads,
        "grads": grads,
        "eval": evaluated,
        "state": state,
    }


def shard(
    steps: list[dict[str, torch.Tensor]], shares: tuple[int, ...], rank: int
) -> list[dict[str, torch.Tensor]]:
    start = sum(shares[:rank])
    return [
        {key: value[start : start + shares[rank]] for key, value in step.items()} for step in steps
    ]


def layer_case(rank: int, world_size: int, case: Case) -> dict[str, Any]:
    layer = cn.convert_sync(build(case.layer, case.seed))
    _, shares = SHARES[case.shares]
    return run_steps(layer, shard(batches(case), shares, rank))


@pytest.fixture(scope="module")
def pair():
    processes = ProcessPair()
    yield processes
    processes.close()


def assert_matches_one_process(results: list[dict[str, Any]], case: Case) -> None:
    _, shares = SHARES[case.shares]
    expected = run_steps(build(case.layer, case.seed), batches(case))
    for step in range(case.steps):
        for key in ("outputs", "input_grads"):
            got = torch.cat([result[key][step] for result in results])
            torch.testing.assert_close(
                got, expected[key][step], **TOLERANCE, msg=f"{key} of step {step}"
            )
    for name, grad in expected["grads"].items():
        summed = sum(result["grads"][name] for result in results)
        torch.testing.assert_close(summed, grad, **TOLERANCE, msg=f"gradient of {name}")
    for rank, result in enumerate(results):
        for key, value in expected["state"].items():
            torch.testing.assert_close(
                result["state"][key], value, **TOLERANCE, msg=f"{key} on rank {rank}"
            )
    evaluated = torch.cat([result["eval"] for result in results])
    torch.testing.assert_close(evaluated, expected["eval"], **TOLERANCE, msg="eval output")


@pytest.mark.parametrize("shares", SHARES)
@pytest.mark.parametrize("layer", LAYERS)
def test_two_processes_equal_one_process_on_the_whole_batch(
    pair: ProcessPair, layer: str, shares: str
) -> None:
    case = Case(layer, shares)
    assert_matches_one_process(pair.run(layer_case, case), case)


def count_collectives(function: Callable[[], Any]) -> tuple[Any, int]:
    """``function()`` and the number of all-reduces it ran."""
    calls = 0
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        return function(), calls
    finally:
        dist.all_reduce = original


def collectives_case(rank: int, world_size: int) -> dict[str, int]:
    """All-reduces per training forward and backward, in eval mode, and in a group of one."""
    torch.manual_seed(0)
    layers = {
        "cn": cn.ContextNorm(C, K),
        "modenorm": cn.ModeNorm(C, K),
        "batchnorm": nn.BatchNorm2d(C),
        "acn-momentum": cn.AdaptiveContextNorm(C, K),
        "acn-gradient": cn.AdaptiveContextNorm(C, K, update="gradient"),
    }
    x = torch.randn(6, C, 3, 3, requires_grad=True)
    context = torch.tensor([0, 1, 2, 0, 1, 2])
    counts = {}
    # Every process creates every group, as torch.distributed requires; each uses its own.
    alone = [dist.new_group([member]) for member in range(world_size)][rank]
    for name, built in layers.items():
        synced = cn.convert_sync(copy.deepcopy(built))
        single = cn.convert_sync(copy.deepcopy(built), process_group=alone)
        call(synced, x, context)  # the first call also checks that the processes agree
        y, counts[f"{name} forward"] = count_collectives(
            lambda layer=synced: call(layer, x, context)
        )
        _, counts[f"{name} backward"] = count_collectives(lambda y=y: y.sum().backward())
        synced.eval()
        _, counts[f"{name} eval"] = count_collectives(lambda layer=synced: call(layer, x, context))
        y, forward = count_collectives(lambda layer=single: call(layer, x, context))
        _, backward = count_collectives(lambda y=y: y.sum().backward())
        counts[f"{name} group of one"] = forward + backward
    return counts


def test_one_all_reduce_forward_and_backward_none_in_eval_or_alone(pair: ProcessPair) -> None:
    for counts in pair.run(collectives_case):
        for name in ("cn", "modenorm", "batchnorm", "acn-momentum", "acn-gradient"):
            assert counts[f"{name} forward"] == 1, counts
            assert counts[f"{name} backward"] == 1, counts
            assert counts[f"{name} eval"] == 0, counts
            assert counts[f"{name} group of one"] == 0, counts


def mismatch_case(rank: int, world_size: int, what: str) -> str:
    """A layer whose size differs between the processes: the error each process raises."""
    channels = C + rank if what == "channels" else C
    contexts = K + rank if what == "contexts" else K
    layer = cn.convert_sync(cn.ContextNorm(channels, contexts))
    try:
        layer(torch.randn(4, channels, 2, 2), torch.tensor([0, 1, 0, 1]))
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    ("what", "named"), [("channels", "num_features from 4 to 5"), ("contexts", "from 3 to 4")]
)
def test_processes_that_disagree_on_sizes_raise_on_every_process(
    pair: ProcessPair, what: str, named: str
) -> None:
    for message in pair.run(mismatch_case, what):
        assert named in message and "build the same model on every process" in message, message


def singleton_case(rank: int, world_size: int, ids: list[list[int]]) -> str:
    layer = cn.convert_sync(cn.ContextNorm(C, K))
    context = torch.tensor(ids[rank], dtype=torch.int64)
    try:
        layer(torch.randn(len(context), C), context)
    except ValueError as error:
        return str(error)
    return "no error"


def test_a_context_with_one_sample_over_all_processes_raises_on_every_process(
    pair: ProcessPair,
) -> None:
    # Context 2 has one sample on each process: two in the whole batch, which is fine.
    assert pair.run(singleton_case, [[0, 0, 1, 1, 2], [2, 0, 1]]) == ["no error", "no error"]
    # Context 2 has one sample in the whole batch: every process raises (none waits for the others).
    for message in pair.run(singleton_case, [[0, 0, 1, 1, 2], [0, 1, 1]]):
        assert "context(s) [2] have a single value per channel" in message, message


def test_convert_sync_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        cn.convert_sync(cn.ContextNorm(C, K))


def convert_case(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(C)
    context_norm = cn.ContextNorm(C, K)
    model = nn.Sequential(
        nn.Conv2d(3, C, 1), norm, context_norm, cn.ContextNormX(C, K), nn.InstanceNorm2d(C)
    )
    converted = cn.convert_sync(model)
    synced_norm = converted[1]
    facts = {
        "same model": converted is model,
        "batchnorm replaced": type(synced_norm) is cn.SyncBatchNorm,
        "parameters shared": synced_norm.weight is norm.weight
        and synced_norm.running_mean is norm.running_mean,
        "context layer kept": converted[2] is context_norm and context_norm.synchronized,
        "instance norm untouched": type(converted[4]) is nn.InstanceNorm2d,
        "single layer converted in place": cn.convert_sync(cn.ModeNorm(C, K)).synchronized,
        "single batchnorm replaced": type(cn.convert_sync(nn.BatchNorm1d(C))) is cn.SyncBatchNorm,
    }
    reverted = cn.revert_sync(converted)
    facts["reverted"] = reverted[1] is norm and not context_norm.synchronized
    return facts


def test_convert_sync_marks_layers_and_replaces_batchnorm(pair: ProcessPair) -> None:
    for facts in pair.run(convert_case):
        assert all(facts.values()), facts


def mixnorm_case(rank: int, world_size: int) -> dict[str, Any]:
    context_norm = cn.ContextNorm(C, K)
    model = nn.Sequential(context_norm, cn.MixtureNorm(C, K))
    try:
        cn.convert_sync(model)
    except NotImplementedError as error:
        return {"message": str(error), "left as it was": not context_norm.synchronized}
    return {"message": "no error"}


def test_convert_sync_refuses_mixnorm_saying_why_and_what_to_do(pair: ProcessPair) -> None:
    for answer in pair.run(mixnorm_case):
        message = answer["message"]
        for part in ("MixtureNorm", "k-means++", "AdaptiveContextNorm", "one process"):
            assert part in message, message
        assert answer["left as it was"]


def identical_buffers_case(rank: int, world_size: int, update: str) -> dict[str, torch.Tensor]:
    """float32 training steps on unequal shares far from zero: the buffers each process keeps."""
    torch.manual_seed(0)
    layer = cn.convert_sync(cn.AdaptiveContextNorm(C, K, update=update))
    generator = torch.Generator().manual_seed(3)
    shares = (7, 3)
    start = sum(shares[:rank])
    for _ in range(3):
        x = torch.randn(sum(shares), C, 3, 3, generator=generator) * 2.0 + 50.0
        layer(x[start : start + shares[rank]].requires_grad_()).square().sum().backward()
    return {name: buffer.clone() for name, buffer in layer.named_buffers()}


@pytest.mark.parametrize("update", ["momentum", "gradient"])
def test_acn_buffers_are_bitwise_identical_on_every_process(pair: ProcessPair, update: str) -> None:
    # In float32 a per-process rounding would show: DDP's buffer broadcast must change nothing.
    first, second = pair.run(identical_buffers_case, update)
    assert int(first["num_batches_tracked"]) == 3
    for name, buffer in first.items():
        assert torch.equal(buffer, second[name]), name


def _two_conv_model(
    seed: int, first: Callable[[], list[nn.Module]], second: Callable[[], list[nn.Module]]
) -> nn.Module:
    """Two convolutions, the norms ``first()`` after the first and ``second()`` after the second
    (built in that order, after the seed), and a linear head, contexts from the scope."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        *first(),
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        *second(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(C, 5),
    )
    return cn.ContextualModel(model).double()


def ddp_model(seed: int) -> nn.Module:
    return _two_conv_model(
        seed,
        lambda: [cn.ContextNorm(C, K)],
        lambda: [
            nn.BatchNorm2d(C),
            cn.ModeNorm(C, 2),
            cn.SwitchNorm(C),
            cn.ContextNormX(C, K),
            cn.ContextNormE(C, K),
        ],
    )


def ddp_mixture_model(seed: int) -> nn.Module:
    return _two_conv_model(
        seed,
        lambda: [cn.AdaptiveContextNorm(C, K)],
        lambda: [cn.AdaptiveContextNorm(C, 2, update="gradient")],
    )


DDP_MODELS = {"context layers": ddp_model, "mixture layers": ddp_mixture_model}


def ddp_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.tensor(SHARES["missing"][0])
    return [
        (
            torch.randn(len(ids), 3, 4, 4, generator=generator, dtype=torch.float64) + 1.0,
            ids,
            torch.randint(0, 5, (len(ids),), generator=generator),
        )
        for _ in range(2)
    ]


def train_two_steps(model: nn.Module, batches: list[Any], scale: float) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, context, labels in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x, context), labels, reduction="sum") * scale
        loss.backward()
        optimizer.step()
    return model


def ddp_case(rank: int, world_size: int, models: str) -> dict[str, torch.Tensor]:
    # DDP broadcasts buffers before each forward (broadcast_buffers=True, its default).
    model = nn.parallel.DistributedDataParallel(cn.convert_sync(DDP_MODELS[models](rank)))
    _, shares = SHARES["missing"]
    start = sum(shares[:rank])
    local = [tuple(part[start : start + shares[rank]] for part in batch) for batch in ddp_batches()]
    total = len(SHARES["missing"][0])
    # DDP averages gradients over processes: a local sum scaled by world_size / N is the mean.
    train_two_steps(model, local, world_size / total)
    return {key: value.clone() for key, value in model.module.state_dict().items()}


@pytest.mark.parametrize("models", DDP_MODELS)
def test_distributed_data_parallel_trains_as_one_process(pair: ProcessPair, models: str) -> None:
    states = pair.run(ddp_case, models)
    # Every process starts from process 0's parameters (DDP broadcasts them); so does the reference.
    expected = train_two_steps(
        DDP_MODELS[models](0), ddp_batches(), 1.0 / len(SHARES["missing"][0])
    ).state_dict()
    for rank, state in enumerate(states):
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, **TOLERANCE, msg=f"{key} on rank {rank}")


def recalibration_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(9)
    ids = torch.tensor(SHARES["missing"][0])
    return [
        (torch.randn(len(ids), 3, 4, 4, generator=generator, dtype=torch.float64) * 2 + 1, ids)
        for _ in range(3)
    ]


def recalibration_case(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    model = cn.convert_sync(ddp_model(0))
    _, shares = SHARES["missing"]
    start = sum(shares[:rank])
    local = [
        tuple(part[start : start + shares[rank]] for part in batch)
        for batch in recalibration_data()
    ]
    cn.recalibrate(model, local, progress=False)
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_recalibrate_over_processes_equals_one_process_on_all_the_data(pair: ProcessPair) -> None:
    expected = cn.recalibrate(ddp_model(0), recalibration_data(), progress=False).state_dict()
    for rank, state in enumerate(pair.run(recalibration_case)):
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, **TOLERANCE, msg=f"{key} on rank {rank}")
