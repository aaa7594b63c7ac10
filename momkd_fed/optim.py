"""AdamW on torch's fused kernel, without ``torch.optim.Optimizer``: the same update, no ``torch._dynamo`` import.

``torch.optim.AdamW`` imports ``torch._dynamo`` the first time a process constructs, steps, saves or loads one
(``add_param_group``, ``state_dict``, ``load_state_dict`` and ``zero_grad`` are wrapped by
``torch._disable_dynamo``, ``step`` by ``_use_grad_for_differentiable``, which imports it outright): about 3 s on an
idle core and 20 s on a loaded 2-core machine. A Flower deployment starts a fresh ClientApp process for every
message, so every site paid it every round. :class:`FusedAdamW` calls the kernel ``torch.optim.AdamW(fused=True)``
calls (``torch._fused_adamw_``) with the same arguments and the same state, so its update is bitwise the same
(tests/test_optim.py), and its ``state_dict`` has torch's layout: a site state saved by either loads into the
other.

Only what the engine uses is implemented: one or more param groups of floating-point tensors on CPU or CUDA,
``lr``/``betas``/``eps``/``weight_decay``; no amsgrad, maximize, closures, hooks or gradient scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_GROUP_DEFAULTS = {  # what torch.optim.AdamW(fused=True) records in every param group (torch 2.x layout)
    "amsgrad": False, "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
    "fused": True, "decoupled_weight_decay": True,
}


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """True where torch has a fused AdamW kernel for every parameter: floating point, on CUDA or CPU (torch >= 2.4)."""
    cpu_ok = torch.__version__ >= "2.4"  # TorchVersion compares as a version
    return all(p.is_floating_point() and (p.device.type == "cuda" or (p.device.type == "cpu" and cpu_ok))
               for p in params)


class FusedAdamW:
    """AdamW with decoupled weight decay over ``torch._fused_adamw_``.

    Parameters
    ----------
    params : iterable of Tensor, or of dicts with ``"params"`` and per-group settings
        Floating-point tensors on CPU or CUDA (see :func:`fused_adamw_supported`).
    lr, betas, eps, weight_decay
        As ``torch.optim.AdamW``.

    Attributes
    ----------
    param_groups : list[dict]
        ``"params"`` (list of Tensor) and the settings, as in torch (callers may change ``"lr"``).
    state : dict[Tensor, dict[str, Tensor]]
        Per parameter: ``step`` (float32 scalar on the parameter's device), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        # torch.optim.AdamW's checks, with its messages
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                         **_GROUP_DEFAULTS}
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for g in groups:
            group = {**self.defaults, **{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("FusedAdamW: a parameter appears in more than one group")
                seen.add(id(p))
            if not fused_adamw_supported(group["params"]):
                raise ValueError("FusedAdamW: every parameter must be a floating-point tensor on CPU or CUDA")
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step for every parameter that has a gradient (the others and their state are left alone)."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_device: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                st = self.state.get(p)
                if not st:
                    st = self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                lists = by_device.setdefault((p.device, p.dtype), [[], [], [], [], []])
                for bucket, t in zip(lists, (p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                    bucket.append(t)
            for params, grads, exp_avgs, exp_avg_sqs, steps in by_device.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                    eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}``, the
        parameters numbered in group order (the state tensors themselves, not copies, as torch does)."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(st) for p, st in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` or by ``torch.optim.AdamW`` over the same parameters.

        Raises
        ------
        ValueError
            The groups or their sizes differ from this optimiser's.
        """
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(len(a["params"]) != len(b["params"])
                                                        for a, b in zip(saved, self.param_groups)):
            raise ValueError("FusedAdamW.load_state_dict: the saved state has other parameter groups (sizes "
                             f"{[len(g['params']) for g in saved]}, expected "
                             f"{[len(g['params']) for g in self.param_groups]})")
        by_index = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        self.state = {}
        for i, st in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: v.to(device=p.device, dtype=torch.float32 if k == "step" else p.dtype, copy=True)
                             for k, v in st.items()}
        for s, g in zip(saved, self.param_groups):
            g.update({k: v for k, v in s.items() if k != "params"})
            g["betas"] = tuple(g["betas"])
