"""Shared fixtures: one small instance of every encoder, and a seeded RNG."""
from __future__ import annotations

import pytest
import torch

import rllib_trajenc as rt

# Tests use tiny tensors: one thread avoids two threads waiting on each other on 2-core CI.
torch.set_num_threads(1)

TSTEP_DIM = 5
MAX_SEQ_LEN = 8

# Small sizes so the whole suite runs on 2 CPU cores; dropout off so eval and train agree.
SMALL_ENCODERS = {
    "ff": lambda: rt.FFTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=32, n_layers=2),
    "gru": lambda: rt.GRUTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_hidden=24, n_layers=2, d_output=32),
    "mamba": lambda: rt.MambaTrajEncoder(TSTEP_DIM, MAX_SEQ_LEN, d_model=32, d_state=8, n_layers=2),
    "transformer": lambda: rt.TformerTrajEncoder(
        TSTEP_DIM, MAX_SEQ_LEN, d_model=32, n_heads=4, d_ff=64, n_layers=2,
        dropout_ff=0.0, dropout_emb=0.0),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=list(SMALL_ENCODERS))
def encoder_name(request) -> str:
    return request.param


@pytest.fixture
def encoder(encoder_name: str) -> rt.TrajEncoder:
    return SMALL_ENCODERS[encoder_name]().eval()


@pytest.fixture(params=[name for name in SMALL_ENCODERS if name != "ff"])
def stateful_encoder(request) -> rt.TrajEncoder:
    return SMALL_ENCODERS[request.param]().eval()


def episode_inputs(batch: int, steps: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random timestep embeddings and their episode time indices [B, T, 1]."""
    seq = torch.randn(batch, steps, TSTEP_DIM)
    time_idxs = (start + torch.arange(steps)).view(1, steps, 1).expand(batch, steps, 1)
    return seq, time_idxs
