"""Budget-aware adaptation: what a configuration costs before training (cost model, calibration).

    from leanfit.budget import estimate
    cost = estimate(TuneConfig(model="minilm", method="lora", options={"rank": 8}))
    cost.trainable_params, cost.adapter_bytes, cost.train_peak_bytes, cost.step_seconds
"""

__all__ = ["CostEstimate", "estimate"]


def __getattr__(name: str):  # lazy: `leanfit --help` registers budget commands without importing torch
    if name in __all__:
        from . import cost
        return getattr(cost, name)
    raise AttributeError(f"module 'leanfit.budget' has no attribute '{name}'")
