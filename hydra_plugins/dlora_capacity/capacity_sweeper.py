"""Registers dlora's capacity search with Hydra, which loads sweepers from the hydra_plugins package."""
from dlora_sim.capacity import CapacitySearch


class CapacitySweeper(CapacitySearch):
    """`hydra/sweeper=capacity`: see dlora_sim.capacity."""
