from specssm.cache.cache import STRATEGIES, LayerCache, SSMCache
from specssm.cache.plan import StepPlan

__all__ = ["SSMCache", "LayerCache", "StepPlan", "STRATEGIES"]
