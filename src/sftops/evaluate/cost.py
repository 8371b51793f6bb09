"""Cost beside quality: what a run cost (run.json's `cost`, measured by train/cost.py) per 0.1 nats of test NLL
improvement, over the base model and over the champion. Pure: the evaluation's metrics and the run's figures in,
a small block out, which metrics.json, the report and the registered version's description show."""

from __future__ import annotations

from typing import Any

NATS = 0.1  # the unit of improvement a cost is quoted per


def per_improvement(amount: float | None, improvement: float | None) -> float | None:
    """`amount` per 0.1 nats of improvement; None where there is no amount or no improvement to divide by."""
    if amount is None or improvement is None or improvement <= 0:
        return None
    return amount / (improvement / NATS)


def cost_beside_quality(run_cost: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The run's cost and what each 0.1 nats of test NLL improvement over the base model cost, in money (with
    cost.per_device_hour) and in device-hours; None for a run recorded before costs were."""
    if not run_cost:
        return None
    improvement = metrics["base"]["nll"] - metrics["tuned"]["nll"]
    return {
        "device": run_cost["device"],
        "wall_s": run_cost["wall_s"],
        "device_hours": run_cost["device_hours"],
        "energy_kwh": run_cost["energy_kwh"],
        "mfu": run_cost["mfu"],
        "amount": run_cost["amount"],
        "currency": run_cost["currency"],
        "nll_improvement_over_base": improvement,
        "amount_per_0.1_nats_over_base": per_improvement(run_cost["amount"], improvement),
        "device_hours_per_0.1_nats_over_base": per_improvement(run_cost["device_hours"], improvement),
    }


def over_champion(cost: dict[str, Any], decision: dict[str, Any] | None) -> dict[str, Any]:
    """The same per 0.1 nats of improvement over the champion, where the gate compared test NLL with one."""
    if not decision or decision.get("metric") != "nll" or decision.get("champion_value") is None:
        return {}
    improvement = decision["champion_value"] - decision["value"]
    return {
        "champion_version": decision["champion_version"],
        "nll_improvement_over_champion": improvement,
        "amount_per_0.1_nats_over_champion": per_improvement(cost["amount"], improvement),
        "device_hours_per_0.1_nats_over_champion": per_improvement(cost["device_hours"], improvement),
    }


def cost_line(cost: dict[str, Any] | None, decision: dict[str, Any] | None = None) -> str | None:
    """One sentence: what the run cost, and per 0.1 nats of improvement over the base (and the champion)."""
    if not cost:
        return None
    cost = {**cost, **over_champion(cost, decision)}
    amount = cost["amount"]
    spent = f"{amount:.2f} {cost['currency']}, " if amount is not None else ""
    parts = [
        f"{spent}{cost['device_hours']:.3f} device-hours on {cost['device']} ({cost['wall_s'] / 60:.1f} min)"
        + (f", {cost['energy_kwh']:.3f} kWh" if cost["energy_kwh"] is not None else "")
        + (f", MFU {100 * cost['mfu']:.1f}%" if cost["mfu"] is not None else "")
    ]
    for who in ("base", "champion"):
        if f"device_hours_per_0.1_nats_over_{who}" not in cost:
            continue
        hours, money = cost[f"device_hours_per_0.1_nats_over_{who}"], cost[f"amount_per_0.1_nats_over_{who}"]
        name = who if who == "base" else f"champion v{cost['champion_version']}"
        if hours is None:
            parts.append(f"no test NLL improvement over the {name} to price")
        else:
            each = f"{money:.2f} {cost['currency']} and " if money is not None else ""
            parts.append(f"{each}{hours:.4f} device-hours per 0.1 nats of test NLL improvement over the {name}")
    return "; ".join(parts)
