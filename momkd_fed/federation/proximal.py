"""FedProx's proximal term on a site's shared weights (``federation.prox_mu``; Li et al., MLSys 2020).

In every local step of a round the site minimises ``loss + (mu / 2) * sum_k ||w_k - w_k^global||^2`` over the
shared parameters ``k`` (those the server sent as ``GlobalModel.shared``; the memory and the site-private head are
not in it): each local model is held near the round's global model, so the sites drift apart less before they are
averaged. The term's gradient ``mu * (w - w_global)`` is added to the parameters' gradients after the loss's
backward pass and before gradient clipping (:meth:`ProximalTerm.add_grad`, the ``after_backward`` hook of
``engine.train_epoch``): the same update as back-propagating :meth:`ProximalTerm.value`, without a second graph.
Parameters the step's loss did not reach (no gradient) are left alone, as the optimiser leaves them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class ProximalTerm:
    """``(mu / 2) * sum ||w - w_ref||^2`` over the model's parameters named in ``reference``.

    Parameters
    ----------
    model : nn.Module
        The local model being trained.
    reference : mapping str -> Tensor
        The round's global shared weights (state-dict keys); keys that are not trainable parameters of ``model``
        (buffers, or the genomic branch a histology-only site was not sent) are ignored.
    mu : float
        Weight of the term (>= 0).
    """

    def __init__(self, model: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> None:
        if mu < 0.0:
            raise ValueError(f"proximal term: mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = [
            (p, reference[name].detach().to(device=p.device, dtype=p.dtype).clone())
            for name, p in model.named_parameters() if p.requires_grad and name in reference]

    def value(self) -> torch.Tensor:
        """() the term at the current weights (differentiable)."""
        if not self.pairs:
            return torch.zeros(())
        return 0.5 * self.mu * sum((p - r).pow(2).sum() for p, r in self.pairs)

    @torch.no_grad()
    def add_grad(self) -> None:
        """Add ``mu * (w - w_ref)`` to each parameter's gradient (parameters without one are skipped)."""
        if self.mu == 0.0:
            return
        for p, r in self.pairs:
            if p.grad is not None:
                p.grad.add_(p - r, alpha=self.mu)
