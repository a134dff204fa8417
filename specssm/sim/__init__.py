from specssm.sim.simulator import simulate, SimReport, random_params
