"""A budget: limits on what an adapter may cost, parsed from `params=1%,latency=+10%,memory=2GB,bytes=5MB`.

Each limit reads one field of the cost model's `CostEstimate` (cost.py), so a configuration is
checked before it is trained. `violation(cost)` is `cost / limit - 1`: zero or less fits, which is
the convention of Optuna's constraints.

| key | value | limits |
|---|---|---|
| params | `1%` (share of the adapted model's parameters) or a count (`150000`, `150k`, `1.2M`) | trainable parameters |
| bytes | `5MB`, `512KiB`, ... | adapter file size |
| memory | `2GB`, `1.5GiB`, ... | peak memory of the training process (estimated) |
| latency | `+10%` or `1.1x` | inference time with the adapter / the base model's (estimated) |
| time | `600s`, `10m`, `1h` | wall time of the whole training run (estimated) |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

KEYS = ("params", "bytes", "memory", "latency", "time")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class Limit:
    """One limit. `value` is in the unit `measure` returns (a share for `params=1%`)."""

    key: str
    text: str
    value: float
    share: bool = False  # params given as a percentage of the model's parameters

    def measure(self, cost) -> float:
        if self.key == "params":
            return cost.trainable_share if self.share else float(cost.trainable_params)
        return float({"bytes": cost.adapter_bytes, "memory": cost.train_peak_bytes,
                      "latency": cost.inference_latency_ratio, "time": cost.train_seconds}[self.key])

    def violation(self, cost) -> float:
        return self.measure(cost) / self.value - 1.0

    def format(self, value: float) -> str:
        """A measured value written the way this limit was (percent, count, bytes, +latency, seconds)."""
        return format_value(self.key, value, self.share)


def format_value(key: str, value: float, share: bool = False) -> str:
    if key == "params":
        return f"{100 * value:.3f}%" if share else f"{int(round(value)):,}"
    if key in ("bytes", "memory"):
        return _bytes(value)
    if key == "latency":
        return f"{100 * (value - 1):+.1f}%"
    return f"{value:.0f}s"


@dataclass(frozen=True)
class Budget:
    limits: tuple[Limit, ...] = ()

    @property
    def text(self) -> str:
        return ",".join(f"{limit.key}={limit.text}" for limit in self.limits) or "none"

    def violations(self, cost) -> dict[str, float]:
        return {limit.key: limit.violation(cost) for limit in self.limits}

    def fits(self, cost) -> bool:
        return all(v <= 0 for v in self.violations(cost).values())

    def get(self, key: str) -> Limit | None:
        return next((limit for limit in self.limits if limit.key == key), None)


def parse_budget(text: str | None) -> Budget:
    """`params=1%,latency=+10%,memory=2GB,bytes=5MB,time=10m` -> Budget; None or "" -> no limits."""
    if not text or not text.strip():
        return Budget()
    limits, seen = [], set()
    for item in (part.strip() for part in text.split(",")):
        if "=" not in item:
            raise ConfigError(f"Budget item '{item}' is not KEY=VALUE; write e.g. --budget params=1%,latency=+10%.")
        key, value = (s.strip() for s in item.split("=", 1))
        key = key.lower()
        if key not in KEYS:
            raise ConfigError(f"Unknown budget key '{key}'; valid keys are {', '.join(KEYS)}.")
        if key in seen:
            raise ConfigError(f"Budget key '{key}' is given twice; give each limit once.")
        seen.add(key)
        limits.append(_parse_limit(key, value))
    return Budget(tuple(limits))


def _parse_limit(key: str, value: str) -> Limit:
    v = value.lower().replace(" ", "").replace("_", "")
    parsed, share = None, False
    if key == "params":
        if (m := re.fullmatch(_NUMBER + "%", v)):
            parsed, share = float(m.group(1)) / 100, True
        elif (m := re.fullmatch(_NUMBER + "([kmbg]?)", v)):
            parsed = float(m.group(1)) * _COUNT_UNITS[m.group(2)]
        example = "params=1% or params=150k"
    elif key in ("bytes", "memory"):
        if (m := re.fullmatch(_NUMBER + "([kmgt]i?b|b)?", v)):
            parsed = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
        example = f"{key}=5MB or {key}=2GiB"
    elif key == "latency":
        if (m := re.fullmatch(r"\+?" + _NUMBER + "%", v)):
            parsed = 1 + float(m.group(1)) / 100
        elif (m := re.fullmatch(_NUMBER + "x", v)):
            parsed = float(m.group(1))
        example = "latency=+10% or latency=1.1x"
    else:
        if (m := re.fullmatch(_NUMBER + "(s|m|min|h)?", v)):
            parsed = float(m.group(1)) * _TIME_UNITS[m.group(2) or ""]
        example = "time=600s or time=10m"
    if parsed is None:
        raise ConfigError(f"Budget value {key}={value} cannot be read; write e.g. {example}.")
    if parsed <= 0:
        raise ConfigError(f"Budget value {key}={value} must be above zero; give a positive limit.")
    if share and parsed > 1:  # a share over the whole model limits nothing: likely a typo for a smaller one
        raise ConfigError(f"Budget value {key}={value} is more than the whole model; give a share up to 100%, "
                          "e.g. params=1%.")
    return Limit(key, value, parsed, share)


def check_reachable(budget: Budget, costs: list[tuple[str, object]]) -> None:
    """Refuse a budget no configuration fits, naming the smallest cost the space offers.

    `costs` are (description, CostEstimate) of every configuration of the search space.
    """
    if not budget.limits or any(budget.fits(cost) for _, cost in costs):
        return
    if not costs:
        raise ConfigError("The search space holds no configuration that can be built; widen --methods or --targets.")
    smallest = []
    for limit in budget.limits:
        name, cost = min(costs, key=lambda item: limit.measure(item[1]))
        smallest.append((limit, name, limit.measure(cost)))
    alone = [s for s in smallest if s[2] > s[0].value]
    if alone:
        limit, name, value = alone[0]
        raise ConfigError(
            f"The budget {limit.key}={limit.text} is below the smallest configuration in the search space "
            f"({name}: {limit.key}={limit.format(value)}); raise the budget to at least {limit.format(value)} "
            "or widen the space.")
    parts = ", ".join(f"{limit.key}={limit.format(value)} ({name})" for limit, name, value in smallest)
    raise ConfigError(
        f"No single configuration in the search space fits the budget {budget.text} (the smallest costs, "
        f"each on its own, are {parts}); relax one of the limits.")


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"
