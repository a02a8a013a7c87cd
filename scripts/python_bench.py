"""A Python client built from the .proto files alone, measuring what a Python team pays.

Compares, on one machine, in one run:
  - a bare unary gRPC echo (`mesh.bench.v1.Echo/Call`), the floor for this client;
  - a one-step `echo` goal submitted and followed to its end with one call
    (`GoalService/SubmitAndWatch`);
  - the same with two calls (`SubmitGoal`, then `WatchRun`);
each sequentially (p50 of the round trip) and with 64 calls in flight (throughput).

Run it with scripts/python-bench, which builds the stubs and starts the processes.
"""

import argparse
import asyncio
import statistics
import sys
import time

import grpc

import bench_pb2
import bench_pb2_grpc
import mesh_pb2
import mesh_pb2_grpc

FINISHED = "finished"


def goal():
    return mesh_pb2.SubmitGoalRequest(
        objective="python bench",
        steps=[mesh_pb2.StepSpec(id="a", uses="echo", with_json='{"n": 1}')],
    )


async def echo(stubs):
    await stubs["echo"].Call(bench_pb2.EchoRequest(payload=b"x" * 64))


async def one_call(stubs):
    async for event in stubs["goals"].SubmitAndWatch(goal()):
        if event.WhichOneof("kind") == "event" and event.event.WhichOneof("kind") == FINISHED:
            state = event.event.finished.state
    assert state == mesh_pb2.RUN_STATE_SUCCEEDED, state


async def two_calls(stubs):
    run = await stubs["goals"].SubmitGoal(goal())
    async for event in stubs["goals"].WatchRun(mesh_pb2.WatchRunRequest(run_id=run.run_id)):
        if event.WhichOneof("kind") == FINISHED:
            state = event.finished.state
    assert state == mesh_pb2.RUN_STATE_SUCCEEDED, state


async def sequential(op, stubs, n):
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await op(stubs)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


async def in_flight(op, stubs, n, width=64):
    left = n

    async def worker():
        nonlocal left
        while left > 0:
            left -= 1
            await op(stubs)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return n / (time.perf_counter() - t)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mesh", default="127.0.0.1:7700")
    p.add_argument("--echo", default="127.0.0.1:7790")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    mesh = grpc.aio.insecure_channel(args.mesh)
    echo_ch = grpc.aio.insecure_channel(args.echo)
    stubs = {
        "goals": mesh_pb2_grpc.GoalServiceStub(mesh),
        "echo": bench_pb2_grpc.EchoStub(echo_ch),
    }
    ops = {"echo": echo, "one call": one_call, "two calls": two_calls}
    for op in ops.values():  # warm-up
        await sequential(op, stubs, 100)
    rows = {name: ([], []) for name in ops}
    for _ in range(args.repeat):
        # Interleaved, so that a slow moment of the machine hits every kind alike.
        for name, op in ops.items():
            rows[name][0].append(await sequential(op, stubs, args.n // 4))
        for name, op in ops.items():
            rows[name][1].append(await in_flight(op, stubs, args.n))
    seq_echo = statistics.median(rows["echo"][0])
    rate_echo = statistics.median(rows["echo"][1])
    print(f"python client, grpcio {grpc.__version__}, {args.repeat} rounds, medians")
    print(f"{'':<12} {'p50 sequential':>16} {'ratio':>6} {'64 in flight':>14} {'ratio':>6}")
    for name, (seq, rate) in rows.items():
        s, r = statistics.median(seq), statistics.median(rate)
        print(f"{name:<12} {s:>13.0f} µs {s / seq_echo:>6.2f} {r:>12.0f}/s {rate_echo / r:>6.2f}")
    await mesh.close()
    await echo_ch.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
