from specssm.sim.simulator import SimReport, random_params, simulate

__all__ = ["SimReport", "random_params", "simulate"]
