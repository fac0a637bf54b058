"""Pairs per second of the reference model four ways, and serving p99 while the runner works.

In one run, on the same model and the same inputs:
  (a) PyTorch eager, one pair at a time;
  (b) PyTorch eager, batched, each pair encoding its own user's history;
  (c) ONNX Runtime, batched the same way;
  (d) ONNX Runtime, batched with each user's history encoded once for all its candidates;
at 1, 8 and 64 candidates per user. Then `BatchGet` of 500 items x 128 dims float16 from a
sidecar with the embedded daemon, with the runner idle and with it saturated by Prefetch
work queued before the measurement.

    .venv/bin/python bench/precompute.py [--batch-pairs 256] [--seconds 3] [--threads 1]
"""

import argparse
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import torch

from solaris.precompute.export import reference_model
from solaris.precompute.features import TableSizes, UserWork, model_inputs
from solaris.precompute.model import INPUT_NAMES, ModelConfig, build_model
from solaris.precompute.runner import OnnxRunner
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

HISTORY = tuple(f"seen-{n}" for n in range(64))


def workload(users: int, candidates_per_user: int, start: int = 0) -> list[UserWork]:
    return [
        UserWork(
            f"user-{start + u}",
            HISTORY,
            tuple(f"item-{u}-{c}" for c in range(candidates_per_user)),
        )
        for u in range(users)
    ]


def one_user_per_pair(work: list[UserWork]) -> list[UserWork]:
    """The same pairs with no sharing: every pair carries its user's history alone."""
    return [UserWork(w.user_id, w.history, (item,)) for w in work for item in w.item_ids]


def pairs_per_second(compute: Callable[[], int], seconds: float) -> float:
    compute()
    pairs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pairs += compute()
    return pairs / (time.perf_counter() - start)


def eager(model: torch.nn.Module, sizes: TableSizes, work: list[UserWork]) -> Callable[[], int]:
    inputs = tuple(torch.from_numpy(a) for a in _ordered(model_inputs(work, sizes)))

    def run() -> int:
        with torch.inference_mode():
            return len(model(*inputs))

    return run


def onnx(runner: OnnxRunner, work: list[UserWork]) -> Callable[[], int]:
    inputs = model_inputs(work, runner.sizes)
    return lambda: len(runner.run(inputs))


def _ordered(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [inputs[name] for name in INPUT_NAMES]


def throughput_table(path: Path, batch_pairs: int, seconds: float, threads: int) -> None:
    torch.set_num_threads(threads)
    model = build_model(ModelConfig())
    runner = OnnxRunner(path, "auto", threads)
    sizes = runner.sizes
    print(f"Pairs per second, reference model, history 64, {threads} thread(s), {runner.provider}")
    print("  cands/user  (a) eager 1-by-1  (b) eager batch  (c) ORT batch  (d) ORT user reuse")
    for per_user in (1, 8, 64):
        work = workload(max(1, batch_pairs // per_user), per_user)
        flat = one_user_per_pair(work)
        single = one_user_per_pair(workload(1, 1))
        rates = [
            pairs_per_second(eager(model, sizes, single), seconds),
            pairs_per_second(eager(model, sizes, flat), seconds),
            pairs_per_second(onnx(runner, flat), seconds),
            pairs_per_second(onnx(runner, work), seconds),
        ]
        cells = "".join(f"{rate:16,.0f}" for rate in rates)
        print(f"  {per_user:10d}{cells}   (d)/(a) {rates[3] / rates[0]:.0f}x")


def run_sidecar(model: str, ready: "multiprocessing.connection.Connection") -> None:
    import asyncio

    from solaris.app.compose import build_sidecar
    from solaris.precompute.settings import PrecomputeSettings
    from solaris.server.settings import SidecarSettings

    async def main() -> None:
        sidecar = build_sidecar(
            SidecarSettings(port=0, prefetch_queue_pairs=1_000_000), PrecomputeSettings(model=model)
        )
        await sidecar.start()
        ready.send(sidecar.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def fill_queue(stub: EmbeddingStoreStub, users: int) -> None:
    """Queues 64 new pairs for each of `users` users: more than the runner does in the window."""
    for index in range(users):
        user, items = load_user(index)
        stub.Prefetch(pb.PrefetchRequest(user_id=user, item_ids=items, history=HISTORY))


def load_user(index: int) -> tuple[str, list[str]]:
    return f"load-{index}", [f"load-{index}-{n}" for n in range(64)]


def still_computing(stub: EmbeddingStoreStub, users: int) -> bool:
    """Whether the runner had work left: the last user queued is not yet all computed."""
    user, items = load_user(users - 1)
    answer = stub.BatchGet(pb.BatchGetRequest(user_id=user, item_ids=items))
    return pb.MISS in answer.statuses


def serving_latency(stub: EmbeddingStoreStub, seconds: float) -> tuple[float, float]:
    request = pb.BatchGetRequest(
        user_id="ranker", item_ids=[f"item-{n}" for n in range(500)], dtype=pb.FLOAT16
    )
    taken = []
    end = time.perf_counter() + seconds
    while (start := time.perf_counter()) < end:
        stub.BatchGet(request, timeout=1)
        taken.append(time.perf_counter() - start)
    quantiles = statistics.quantiles(taken, n=100)
    return quantiles[49] * 1e3, quantiles[98] * 1e3


def serving_under_load(path: Path, seconds: float) -> None:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=run_sidecar, args=(str(path), send), daemon=True)
    server.start()
    address = f"127.0.0.1:{receive.recv()}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = EmbeddingStoreStub(channel)
            items = [f"item-{n}" for n in range(500)]
            stub.Prefetch(pb.PrefetchRequest(user_id="ranker", item_ids=items, history=HISTORY))
            while (
                pb.MISS
                in stub.BatchGet(pb.BatchGetRequest(user_id="ranker", item_ids=items)).statuses
            ):
                time.sleep(0.05)
            idle = serving_latency(stub, seconds)
            load_users = int(seconds * 1_000)
            fill_queue(stub, load_users)
            busy = serving_latency(stub, seconds)
            saturated = still_computing(stub, load_users)
    finally:
        server.terminate()
    print("BatchGet 500 x 128 float16 (all hits), sidecar with the embedded daemon")
    print(f"  runner idle     : p50 {idle[0]:.3f} ms  p99 {idle[1]:.3f} ms")
    print(f"  runner saturated: p50 {busy[0]:.3f} ms  p99 {busy[1]:.3f} ms", end="")
    print("" if saturated else "  (the runner ran out of work: raise --seconds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-pairs", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "solaris-bench"))
    args = parser.parse_args()
    path = reference_model(args.model_dir)
    throughput_table(path, args.batch_pairs, args.seconds, args.threads)
    serving_under_load(path, args.seconds)


if __name__ == "__main__":
    main()
