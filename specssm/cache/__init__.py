from specssm.cache.cache import SSMCache, LayerCache, STRATEGIES
from specssm.cache.plan import StepPlan

__all__ = ["SSMCache", "LayerCache", "StepPlan", "STRATEGIES"]
