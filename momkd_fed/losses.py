"""MoMKD loss terms (method.md, "Losses") as pure functions, and the named breakdown a training step returns.

All functions take unit-norm embeddings and compute in float32; they take unit-norm memory slots, except
:func:`commitment_loss`, which takes the stored (raw) slots as the reference does. Which tensors are detached is
part of each function's contract (it decides where gradients flow) and is stated in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossBreakdown:
    """The loss of one training step, term by term (0-dim tensors; unused terms are zeros).

    ``total = w_ce*ce + w_mem*mem + w_align_omics*align_omics + w_align_wsi*align_wsi + w_recon*recon`` and
    ``mem = commit + ortho_weight*ortho``.
    """

    total: Tensor
    ce: Tensor
    mem: Tensor
    commit: Tensor
    ortho: Tensor
    align_omics: Tensor
    align_wsi: Tensor
    recon: Tensor

    def as_floats(self) -> dict[str, float]:
        """Every term as a Python float, keyed by field name (for logging and metrics)."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def soft_angle(emb: Tensor, slots: Tensor, t: float) -> Tensor:
    """phi(F, C) = (1/t) * logsumexp_j(t * <F, c_j>), a smooth maximum of the cosine to the slots.

    Parameters
    ----------
    emb : Tensor
        (S,) or (N, S) unit-norm embedding(s).
    slots : Tensor
        (K, S) unit-norm slots (not detached: gradients reach them).
    t : float
        Sharpness.

    Returns
    -------
    Tensor
        () or (N,).
    """
    sim = emb.float() @ slots.float().T  # (..., K)
    return torch.logsumexp(t * sim, dim=-1) / t  # (...)


def memory_delta(emb: Tensor, memory: Tensor, t: float) -> Tensor:
    """delta(F) = phi(F, C+) - phi(F, C-); ``memory`` is (2, K, S) with C- = memory[0], C+ = memory[1]."""
    return soft_angle(emb, memory[1], t) - soft_angle(emb, memory[0], t)  # () or (N,)


def alignment_loss(emb: Tensor, memory: Tensor, label: int, t: float, beta: float, margin: float) -> Tensor:
    """Soft-angle alignment of an embedding to the class memory.

    ``softplus(beta * (m - delta))`` for y = 1 and ``softplus(beta * (m + delta))`` for y = 0. The memory is
    NOT detached: the loss moves both C+ and C- (in gradient mode).

    Parameters
    ----------
    emb : Tensor
        (S,) unit-norm F_omics or F_wsi.
    memory : Tensor
        (2, K, S) unit-norm slots.
    label : int
        0 or 1.

    Returns
    -------
    Tensor
        () loss.
    """
    delta = memory_delta(emb, memory, t)  # ()
    sign = 1.0 if label == 1 else -1.0
    return F.softplus(beta * (margin - sign * delta))  # ()


COMMIT_SLOTS = ("reference", "cosine", "moving", "moving_cosine")  # LossConfig.commit_slot


def commitment_loss(patch_emb: Tensor, slots: Tensor, commit_slot: str = "reference") -> Tensor:
    """MSE(nearest slot of class y, p_i), averaged over patches and dimensions.

    ``commit_slot`` (``LossConfig.commit_slot``) says which slot is nearest, what the MSE is against and whether
    the slot receives a gradient:

    - ``reference`` (the authors' code): nearest = smallest Euclidean distance to the raw slot vector, MSE
      against the raw slot, slot detached. The reference's ``VectorQuantize(orthogonal_reg_weight=10,
      ema_update=False)`` makes its codebook a parameter (for the orthogonality loss), but vector-quantize-pytorch
      1.22.17 detaches the code in the commitment loss unless ``VectorQuantize(learnable_codebook=True)``, which
      the reference does not set: only the patches move;
    - ``cosine``: nearest by cosine, MSE against the unit-norm slot, slot detached (the implementation before
      issue 13);
    - ``moving``: as ``reference`` with the slot NOT detached: the term also pulls the nearest slot toward its
      patches (online clustering of the class's patches; not what the reference does);
    - ``moving_cosine``: as ``cosine`` with the slot not detached (gradient through the normalisation).

    With unit-norm slots (ema and frozen memories, or a gradient memory right after ``set_slots``) the four give
    the same value and the same gradient with respect to the patches.

    Parameters
    ----------
    patch_emb : Tensor
        (P, S) unit-norm patch projections.
    slots : Tensor
        (K, S) the stored slots of class y, raw (not normalised).
    commit_slot : str
        One of :data:`COMMIT_SLOTS`.
    """
    if commit_slot not in COMMIT_SLOTS:
        raise ValueError(f"commit_slot: expected one of {COMMIT_SLOTS}, got {commit_slot!r}")
    p = patch_emb.float()  # (P, S)
    if commit_slot in ("reference", "moving"):
        c = slots.float()  # (K, S) raw
        cd = c.detach()
        nearest = ((cd * cd).sum(-1) - 2.0 * (p.detach() @ cd.T)).argmin(dim=1)  # (P,) ||p - c||^2 - ||p||^2
    else:
        c = F.normalize(slots.float(), dim=-1)  # (K, S) unit
        nearest = (p.detach() @ c.detach().T).argmax(dim=1)  # (P,)
    if commit_slot in ("reference", "cosine"):
        c = c.detach()
    return F.mse_loss(p, c[nearest])  # ()


def orthogonality_penalty(slots: Tensor) -> Tensor:
    """Mean over all K^2 slot pairs (i, j) of cos^2(c_i, c_j), minus 1/K (one class's slots, not detached).

    The pairs include i = j (cos^2 = 1), as in the reference implementation (vector-quantize-pytorch's
    ``orthogonal_loss_fn``), so the penalty is ``sum_{i != j} cos^2 / K^2``: >= 0, and 0 exactly when the slots
    are mutually orthogonal (K = 1 gives 0).

    Parameters
    ----------
    slots : Tensor
        (K, S) unit-norm slots.
    """
    k = slots.shape[0]
    c = slots.float()  # (K, S)
    gram = c @ c.T  # (K, K)
    return gram.pow(2).mean() - 1.0 / k  # ()


def memory_loss(patch_emb: Tensor, slots: Tensor, commit_slot: str, ortho_weight: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """L_mem of one slide: commitment to class y's memory plus the weighted orthogonality penalty of its slots.

    The reference's ``VectorQuantize`` loss (commitment weight 1, ``orthogonal_reg_weight`` 10).

    Parameters
    ----------
    patch_emb : Tensor
        (P, S) unit-norm patch projections.
    slots : Tensor
        (K, S) the stored (raw) slots of class y; normalised here for the orthogonality penalty.
    commit_slot, ortho_weight : str, float
        ``LossConfig.commit_slot`` and ``LossConfig.ortho_weight``.

    Returns
    -------
    mem, commit, ortho : Tensor
        () each; ``mem = commit + ortho_weight * ortho``.
    """
    commit = commitment_loss(patch_emb, slots, commit_slot)  # ()
    ortho = orthogonality_penalty(F.normalize(slots.float(), dim=-1))  # ()
    return commit + ortho_weight * ortho, commit, ortho


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    """MSE(decoder(z), g) over genes."""
    return F.mse_loss(recon.float(), target.float())  # ()


def classification_loss(logits: Tensor, label: int) -> Tensor:
    """Cross-entropy of the (2,) logits against the label."""
    target = torch.tensor([label], dtype=torch.long, device=logits.device)  # (1,)
    return F.cross_entropy(logits.float().unsqueeze(0), target)  # ()
