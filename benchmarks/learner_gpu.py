"""The learner's encoder pass on a GPU: fused kernels against the reference path, then timings.

First a check: at a small size, each encoder's forward+backward from a carried state with fused
kernels allowed under bf16 autocast, against ``fused_kernels=False`` in fp32; outputs must agree
to a relative error < 1e-2 and gradients to < 1e-2 or 1.25x the reference's own bf16 error, and
the backends each pass ran are printed (``Agreement``). Then a table:
fwd+bwd timesteps/s and peak memory per encoder at the spec's default size and a large one
(d_model 512 x 4 layers), rows of T in {64, 256, 1024} steps, 32,768 timesteps per batch
(B = 32768 / T), from an episode start ("fresh") and from a carried state (every RLlib learner
row), fused vs reference, under bf16 autocast as ``model_config["amp"] = "bf16"`` runs it. MFU
counts the matmuls (6 x 2-D parameters x timesteps, plus attention's QK^T and AV), not the
scans, against the bf16 matmul rate measured in the same run.

GPU:  python3 benchmarks/learner_gpu.py            (see BENCHMARKS.md for the command with kernels)
CPU:  python benchmarks/learner_gpu.py --device cpu --smoke [--stand-ins]   (tiny sizes, in CI;
      --stand-ins swaps in tests/stand_ins' CPU stand-ins of the kernels, so the fused code runs)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.stand_ins, for --stand-ins
import rllib_trajenc as rt  # noqa: E402
from rllib_trajenc.nets import attention, selective_scan  # noqa: E402

TSTEP_DIM = 64
CHECK_TOL = 1e-2  # bf16 relative error, fused against reference
ENCODERS: dict[str, type[rt.TrajEncoder]] = {
    "gru": rt.GRUTrajEncoder, "mamba": rt.MambaTrajEncoder, "transformer": rt.TformerTrajEncoder,
}
SIZES: dict[str, dict[str, dict]] = {
    "default": {"gru": {}, "mamba": {}, "transformer": {}},
    "large": {"gru": dict(d_hidden=512, n_layers=4, d_output=512),
              "mamba": dict(d_model=512, n_layers=4),
              "transformer": dict(d_model=512, n_layers=4, d_ff=2048)},
}
SMOKE_SIZES = {"tiny": {"gru": dict(d_hidden=16, n_layers=1, d_output=16),
                        "mamba": dict(d_model=16, d_state=4, n_layers=2),
                        "transformer": dict(d_model=16, n_heads=2, d_ff=32, n_layers=2)}}
NO_DROPOUT = dict(dropout_ff=0.0, dropout_emb=0.0)


def build(name: str, size: dict, max_seq_len: int, device: torch.device, fused: bool) -> rt.TrajEncoder:
    kwargs = {**size, **(NO_DROPOUT if name == "transformer" else {})}
    encoder = ENCODERS[name](TSTEP_DIM, max_seq_len, **kwargs).to(device)
    encoder.fused_kernels = fused
    return encoder


def inputs(encoder: rt.TrajEncoder, batch: int, steps: int, carried: bool,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[dict]]:
    """A learner row: timestep embeddings, episode time indices and the state it starts from
    (after one earlier row of ``steps`` steps, as RLlib's STATE_IN holds it; None if fresh)."""
    seq = torch.randn(batch, steps, TSTEP_DIM, device=device)
    t = torch.arange(steps, device=device).view(1, -1, 1).expand(batch, -1, -1)
    if not carried:
        return seq, t, None
    with torch.no_grad():
        _, state = encoder(torch.randn_like(seq), t, hidden_state=encoder.init_hidden_state(batch, device))
    return seq, t + steps, state


@contextlib.contextmanager
def amp(device: torch.device) -> Iterator[None]:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def fwd_bwd(encoder: rt.TrajEncoder, seq: torch.Tensor, t: torch.Tensor,
            state: Optional[dict]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        encoder.zero_grad(set_to_none=True)
        with amp(seq.device):
            out, _ = encoder(seq, t, hidden_state=state)
        out.float().square().mean().backward()
        return out
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def repeats_for(fn: Callable[[], object], device: torch.device, repeats: int) -> int:
    """``repeats``, or 2 where one pass takes over a second (the PyTorch scan's long rows), so
    that the whole table stays within its wall-time budget."""
    return 2 if median_seconds(fn, device, warmup=0, repeats=1) > 1.0 else repeats


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@dataclasses.dataclass
class Agreement:
    """Fused-in-bf16 against the reference in fp32: relative errors of the outputs and of all
    gradients as one vector, beside the reference's own error in bf16 (bf16's floor)."""
    backends: dict
    out_err: float
    grad_err: float
    bf16_grad_err: float

    @property
    def ok(self) -> bool:
        """Outputs within 1e-2; gradients within 1e-2 or, where bf16 itself is further off (the
        Transformer's σReparam gains at tiny sizes are), within 1.25x the reference's own error."""
        return self.out_err < CHECK_TOL and self.grad_err < max(CHECK_TOL, 1.25 * self.bf16_grad_err)


def agreement(name: str, size: dict, device: torch.device, steps: int = 64, batch: int = 4,
              fused_bf16: bool = True) -> Agreement:
    """Forward+backward from a carried state: fused under bf16 autocast (or in fp32), reference in
    fp32 and bf16."""
    torch.manual_seed(0)
    fused = build(name, size, steps, device, fused=True)
    seq, t, state = inputs(fused, batch, steps, carried=True, device=device)
    reference = build(name, size, steps, device, fused=False)
    reference.load_state_dict(fused.state_dict())  # after the state's pass (σReparam's buffers)
    weights = torch.randn(batch, steps, fused.emb_dim, device=device)  # a LayerNorm output's plain sum has ~0 gradient

    def run(encoder: rt.TrajEncoder, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with amp(device) if bf16 else contextlib.nullcontext():
            out, _ = encoder(seq, t, hidden_state=state)
        grads = torch.autograd.grad((out.float() * weights).sum(), list(encoder.parameters()))
        return out, torch.cat([g.flatten() for g in grads])

    (out, grad), (out_ref, grad_ref), (_, grad_bf16) = run(fused, fused_bf16), run(reference, False), run(reference, True)
    return Agreement(dict(fused.last_backends), rel_err(out, out_ref), rel_err(grad, grad_ref),
                     rel_err(grad_bf16, grad_ref))


def check(name: str, size: dict, device: torch.device) -> bool:
    result = agreement(name, size, device)
    print(f"check {name}: fused {result.backends or '(no fused kernels)'} in bf16 vs reference in fp32: "
          f"rel. error outputs {result.out_err:.1e}, gradients {result.grad_err:.1e} (reference in bf16: "
          f"{result.bf16_grad_err:.1e}) {'PASS' if result.ok else 'FAIL'}", flush=True)
    return result.ok


def matmul_flops_per_s(device: torch.device, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / median_seconds(lambda: a @ b, device, warmup=3, repeats=10)


def model_flops(encoder: rt.TrajEncoder, name: str, batch: int, steps: int, carried: bool) -> float:
    """fwd+bwd FLOPs of the matmuls: 6 per 2-D parameter and timestep, plus attention's."""
    tokens = batch * steps
    flops = 6 * tokens * sum(p.numel() for p in encoder.parameters() if p.dim() == 2)
    if name == "transformer":
        keys = encoder.max_seq_len if carried else (steps + 1) / 2  # keys a query sees, on average
        flops += 3 * 4 * tokens * keys * encoder.d_model * encoder.n_layers
    return flops


def peak_gib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def table(device: torch.device, sizes: dict, lengths: list[int], tokens: int, repeats: int,
          matmul_rate: float) -> None:
    print("\n| encoder | size | T | start | path | backends | timesteps/s | peak GiB | MFU |")
    print("|---|---|---:|---|---|---|---:|---:|---:|")
    for size_name, by_encoder in sizes.items():
        for name in ENCODERS:
            for steps in lengths:
                for carried in (False, True):
                    # GRU has no kernel of ours (cuDNN's is torch's own): one row per start.
                    for fused in ((True,) if name == "gru" else (True, False)):
                        torch.manual_seed(0)
                        encoder = build(name, by_encoder[name], steps, device, fused)
                        batch = max(1, tokens // steps)
                        run = fwd_bwd(encoder, *inputs(encoder, batch, steps, carried, device))
                        seconds = median_seconds(run, device, warmup=1, repeats=repeats_for(run, device, repeats))
                        peak = peak_gib(run, device)
                        mfu = model_flops(encoder, name, batch, steps, carried) / seconds / matmul_rate
                        print(f"| {name} | {size_name} | {steps} | {'carried' if carried else 'fresh'} "
                              f"| {'fused' if fused else 'reference'} "
                              f"| {', '.join(sorted(set(encoder.last_backends.values()))) or '-'} "
                              f"| {batch * steps / seconds:,.0f} | {'-' if peak is None else f'{peak:.2f}'} "
                              f"| {100 * mfu:.1f}% |", flush=True)
                        del encoder, run
                        if device.type == "cuda":
                            torch.cuda.empty_cache()


@contextlib.contextmanager
def stand_ins(enabled: bool) -> Iterator[None]:
    """The CPU stand-ins of the kernels' contracts (tests/stand_ins) in place of the kernels."""
    if not enabled:
        yield
        return
    import pytest
    from tests.stand_ins import flash_attn, mamba_kernels
    with pytest.MonkeyPatch.context() as patch:
        mamba_kernels.install(patch)
        flash_attn.install(patch, allow_fp32=False)
        yield


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and batches, one repeat (CI)")
    parser.add_argument("--stand-ins", action="store_true", help="CPU stand-ins of the kernels (tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --smoke on CPU)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}; torch {torch.__version__}; kernels installed: "
          f"mamba-ssm {selective_scan.SCAN_KERNEL is not None}, causal-conv1d {selective_scan.CONV_KERNEL is not None}, "
          f"flash-attn {attention.flash_attn_func is not None}; stand-ins {args.stand_ins}", flush=True)
    start = time.perf_counter()
    with stand_ins(args.stand_ins):
        sizes = SMOKE_SIZES if args.smoke else SIZES
        ok = all([check(enc, next(iter(sizes.values()))[enc], device) for enc in ENCODERS])
        rate = matmul_flops_per_s(device, 256 if args.smoke else 8192)
        print(f"measured bf16 matmul rate: {rate / 1e12:.2f} TFLOP/s", flush=True)
        table(device, sizes, [8, 16] if args.smoke else [64, 256, 1024], 256 if args.smoke else 32768,
              1 if args.smoke else 5, rate)
    print(f"\nwall time {time.perf_counter() - start:.0f} s; checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
