"""torch.compile on the learner's encoder pass, on CPU: graph breaks, then eager vs compiled speed.

For each encoder at the spec's default sizes, a learner row's pass (train mode, fp32, from a
carried state as every RLlib learner row starts) is first run through ``torch._dynamo.explain``
(graphs, graph breaks and their reasons), then timed as fwd+bwd timesteps/s eager and compiled
(inductor, what RLlib's ``torch_compile_learner`` uses), side by side in one run. The GRU also
runs with dynamo's ``allow_rnn``, which traces nn.GRU instead of breaking the graph at it.
Usage: python benchmarks/compile_cpu.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
from typing import Optional

import torch
import torch._dynamo

from learner_gpu import ENCODERS, build, inputs, median_seconds  # same folder

ROWS, STEPS = 16, 64
# nn.GRU is one opaque call to dynamo (cuDNN's fused kernel on CUDA); allow_rnn traces through it.
GRU_TRACED = "gru, torch._dynamo.config.allow_rnn=True"


def pass_of(encoder: torch.nn.Module, seq: torch.Tensor, t: torch.Tensor, state: Optional[dict]):
    def run(seq: torch.Tensor, t: torch.Tensor, state: Optional[dict]) -> torch.Tensor:
        out, _ = encoder(seq, t, hidden_state=state)
        return out.square().mean()
    return run


def explain(name: str, device: torch.device) -> str:
    torch._dynamo.reset()
    encoder = build(name, {}, STEPS, device, fused=True)
    seq, t, state = inputs(encoder, ROWS, STEPS, carried=True, device=device)
    report = torch._dynamo.explain(pass_of(encoder, seq, t, state))(seq, t, state)
    reasons = sorted({str(b.reason).splitlines()[0] for b in report.break_reasons})
    return f"| {name} | {report.graph_count} | {report.graph_break_count} | {'; '.join(reasons) or '-'} |"


def speed(name: str, device: torch.device, repeats: int) -> str:
    torch._dynamo.reset()
    encoder = build(name, {}, STEPS, device, fused=True)
    seq, t, state = inputs(encoder, ROWS, STEPS, carried=True, device=device)
    eager = pass_of(encoder, seq, t, state)
    compiled = torch.compile(eager)

    def fwd_bwd(fn):
        def run() -> None:
            encoder.zero_grad(set_to_none=True)
            fn(seq, t, state).backward()
        return run

    rates = [ROWS * STEPS / median_seconds(fwd_bwd(fn), device, warmup=2, repeats=repeats)
             for fn in (eager, compiled)]
    return f"| {name} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[1] / rates[0]:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
          f"torch {torch.__version__}; learner rows: {ROWS} x T={STEPS} from a carried state, train "
          "mode, fp32, spec-default encoder sizes\n")
    print("| encoder | graphs | graph breaks | break reasons |\n|---|---:|---:|---|")
    for name in ENCODERS:
        print(explain(name, device), flush=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        print(explain("gru", device).replace("| gru |", f"| {GRU_TRACED} |"), flush=True)
    print("\n| encoder | eager fwd+bwd (timesteps/s) | compiled fwd+bwd (timesteps/s) | compiled / eager |")
    print("|---|---:|---:|---:|")
    for name in ENCODERS:
        print(speed(name, device, 3 if args.quick else 10), flush=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        print(speed("gru", device, 3 if args.quick else 10).replace("| gru |", f"| {GRU_TRACED} |"), flush=True)


if __name__ == "__main__":
    main()
