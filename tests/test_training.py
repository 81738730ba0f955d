"""training.py's random streams: each rank draws its own dropout masks, and a resumed run continues each rank's."""

import torch

from training import restore_rng_states, rng_states, seed_ranks


class Ranks:
    """The parts of a Fabric these helpers use, for one rank of a world whose ranks' states are given: all_gather
    returns them stacked as Fabric's does for world_size > 1 (and the tensor itself for one rank)."""

    def __init__(self, rank: int, world: int, gathered: list[torch.Tensor] | None = None):
        self.global_rank, self.world_size, self.gathered = rank, world, gathered
        self.device = torch.device("cpu")
        self.printed = []

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.world_size == 1 else torch.stack(self.gathered)

    def print(self, message: str) -> None:
        self.printed.append(message)


def dropout_mask() -> torch.Tensor:
    return torch.nn.functional.dropout(torch.ones(64), 0.5)


def test_each_rank_draws_its_own_dropout_masks():
    seed_ranks(Ranks(0, 2), seed=1337)
    rank0 = dropout_mask()
    seed_ranks(Ranks(1, 2), seed=1337)
    rank1 = dropout_mask()
    seed_ranks(Ranks(0, 2), seed=1337)
    assert torch.equal(dropout_mask(), rank0)  # reproducible per rank
    assert not torch.equal(rank0, rank1)  # and different between ranks (same masks: world_size copies of one)


def test_a_resumed_rank_continues_its_own_stream():
    states = []
    for rank in range(2):
        seed_ranks(Ranks(rank, 2), seed=7)
        dropout_mask()
        states.append(torch.get_rng_state())
    next_masks = []
    for state in states:  # what each rank would draw next, uninterrupted
        torch.set_rng_state(state)
        next_masks.append(dropout_mask())
    saved = rng_states(Ranks(0, 2, gathered=states))  # rank 0 writes every rank's row
    assert saved["rng"].shape == (2, len(states[0])) and saved["cuda_rng"] is None
    for rank in range(2):
        torch.manual_seed(0)  # a new process
        restore_rng_states(Ranks(rank, 2), saved, seed=7)
        assert torch.equal(dropout_mask(), next_masks[rank])


def test_one_process_and_a_checkpoint_of_another_world_size():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    saved = rng_states(Ranks(0, 1))
    assert saved["rng"].shape == (1, len(state))
    expected = dropout_mask()
    restore_rng_states(Ranks(0, 1), saved, seed=3)
    assert torch.equal(dropout_mask(), expected)
    restore_rng_states(Ranks(0, 1), {"rng": state, "cuda_rng": None}, seed=3)  # a checkpoint from before the rows
    assert torch.equal(dropout_mask(), expected)
    # resumed on 2 ranks from a 1-rank checkpoint: no stream to continue, fresh per-rank ones, and it says so
    fabric = Ranks(1, 2)
    restore_rng_states(fabric, saved, seed=3)
    seed_ranks(Ranks(1, 2), seed=3)
    fresh = dropout_mask()
    restore_rng_states(fabric, saved, seed=3)
    assert torch.equal(dropout_mask(), fresh) and "1 rank(s)" in fabric.printed[0]
