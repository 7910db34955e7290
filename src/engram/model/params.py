"""Parameter and FLOP accounting of a configuration, and iso-parameter MoE <-> Engram configurations
(docs/design.md §7).

Counts come from the real modules: :func:`param_report` builds the model on PyTorch's ``meta`` device
(shapes only, no memory) and counts it with :func:`engram.model.lm.count_parameters`, so a 27B-parameter shape
is reported in a second without being allocated.
"""

from __future__ import annotations

import dataclasses

import torch

from engram.config import EngramConfig
from engram.model.config import EngramLMConfig
from engram.model.lm import EngramLM, count_parameters


def param_report(cfg: EngramLMConfig, seq_len: int | None = None) -> dict[str, int]:
    """:func:`count_parameters` of the model ``cfg`` describes, computed without allocating it.

    Example:
        >>> report = param_report(EngramLMConfig.from_preset("paper-27b-shape"))
        >>> round(report["total"] / 1e9, 1), round(report["engram"] / 1e9, 1)   # doctest: +SKIP
        (26.7, 5.7)
    """
    with torch.device("meta"):
        model = EngramLM(cfg)
    return count_parameters(model, seq_len)


def iso_parameter_config(base: EngramLMConfig, rho: float, engram: EngramConfig) -> tuple[EngramLMConfig, dict]:
    """Move ``1 - rho`` of ``base``'s sparse parameters from routed experts into Engram tables.

    ``rho`` is the share of the sparse (total minus activated) parameters kept as routed experts. In a
    pure MoE those are the ``E - k`` experts a token does not use, so the routed expert count becomes
    ``k + round(rho * (E - k))``; the Engram tables (layers, orders, heads and width from ``engram``) get
    a prime search start chosen so that the new total matches the base total.
    Activated parameters change only by the Engram projections and the smaller router.

    Returns:
        ``(config, report)``; ``report`` holds both models' ``total``, ``activated`` and ``engram`` counts
        and their relative differences.
    """
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if base.moe is None or "moe" not in base.ffn_kinds:
        raise ValueError("iso_parameter_config needs a base config with MoE layers")
    if base.engram is not None:
        raise ValueError("iso_parameter_config needs a base config without Engram (the pure-MoE end, rho = 1)")
    base_report = param_report(base)
    moe = base.moe
    moe_cfg = dataclasses.replace(moe, num_experts=moe.top_k + round(rho * (moe.num_experts - moe.top_k)))
    if moe_cfg.num_experts == moe.num_experts:
        config = dataclasses.replace(base, moe=moe_cfg)
    else:
        probe_engram = dataclasses.replace(engram, engram_vocab_size=[2] * engram.num_orders)
        probe = param_report(dataclasses.replace(base, moe=moe_cfg, engram=probe_engram))
        table_budget = base_report["total"] - (probe["total"] - probe["engram"])
        rows_per_head = table_budget // (len(engram.layer_ids) * engram.num_heads * engram.head_dim)
        if rows_per_head < 2:
            raise ValueError(f"rho={rho} leaves no parameters for Engram tables (budget {table_budget})")
        sized = dataclasses.replace(engram, engram_vocab_size=[int(rows_per_head)] * engram.num_orders)
        config = dataclasses.replace(base, moe=moe_cfg, engram=sized)
    new_report = param_report(config)
    report = {"rho": rho, "num_experts": config.moe.num_experts}
    for key in ("total", "activated", "engram"):
        report[f"base_{key}"] = base_report[key]
        report[key] = new_report[key]
    for key in ("total", "activated"):
        report[f"{key}_rel_diff"] = (new_report[key] - base_report[key]) / base_report[key]
    return config, report


def baseline_config(cfg: EngramLMConfig) -> tuple[EngramLMConfig, dict]:
    """The iso-parameter baseline of an Engram model: the same backbone without Engram, its parameters
    given to routed experts (when the model has MoE layers; top-k unchanged, so activated parameters stay
    within Engram's projections of the original) or to the dense FFN width otherwise.

    Returns:
        ``(config, {"engram_model": counts, "baseline": counts})``, counts being ``total``, ``activated``
        and ``engram``.
    """
    if cfg.engram is None:
        raise ValueError("baseline_config needs a config with Engram")
    target = param_report(cfg)
    plain = dataclasses.replace(cfg, engram=None)
    missing = target["total"] - param_report(plain)["total"]
    moe_layers = cfg.ffn_kinds.count("moe")
    if moe_layers:
        per_expert = moe_layers * (3 * cfg.d_model * cfg.moe.expert_dim + cfg.d_model)  # weights + router row
        extra = dataclasses.replace(cfg.moe, num_experts=cfg.moe.num_experts + round(missing / per_expert))
        baseline = dataclasses.replace(plain, moe=extra)
    else:
        per_width = 3 * cfg.d_model * cfg.ffn_kinds.count("dense")
        baseline = dataclasses.replace(plain, dense_ffn_dim=cfg.dense_ffn_dim + round(missing / per_width))
    report = param_report(baseline)
    keys = ("total", "activated", "engram")
    return baseline, {"engram_model": {k: target[k] for k in keys}, "baseline": {k: report[k] for k in keys}}
