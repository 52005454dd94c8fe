"""Seeds for the data layer's random decisions. The transforms and the sampler never draw from a
global RNG: each decision is a pure function of (seed, epoch, index), so a resumed run, any
DataLoader worker and any other code drawing random numbers leave it unchanged, bit for bit."""
import numpy as np


def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit integer from a few integers (negative ones wrap), for seeding."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])
