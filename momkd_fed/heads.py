"""Which heads of a model file were trained, which one it answers with, and the label every printed AUC carries.

A MoMKD model has two heads: the **classifier** (softmax P(y=1)) and the **memory** head (the score
delta(F_wsi) against the class memory; no parameters of its own). ABMIL has the classifier only. Every checkpoint
records ``heads`` (``{"classifier": "trained" | "untrained", "memory": "trained"}``) and ``primary_head`` (the head
``predict`` answers with by default):

- a centralised ``train`` run and a site's personal model: every head trained; primary = classifier;
- the federated global model (``best_model.pt``, ``global_model.pt``): the memory head is trained (shared
  encoders + global memory); the classifier only where ``federation.shared`` shares ``classifier.`` -- with the
  default sharing it never leaves a site and the global model's classifier is the random initial one. Primary =
  the classifier where trained, else the memory head (the head the federation validated and picked its best round
  with, ``federation.selection``).

``predict`` never answers with an untrained head (:func:`choose_head`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .config import Config
from .errors import CheckpointError

TRAINED = "trained"
UNTRAINED = "untrained"
HEAD_NAMES = {"classifier": "classifier", "memory": "memory head"}  # for "<model>, <head>" labels


def model_heads(cfg: Config, classifier_trained: bool = True) -> dict[str, str]:
    """``{"classifier": trained|untrained[, "memory": "trained"]}`` of a model built from ``cfg``."""
    heads = {"classifier": TRAINED if classifier_trained else UNTRAINED}
    if cfg.model.name == "momkd":
        heads["memory"] = TRAINED
    return heads


def global_model_heads(cfg: Config) -> dict[str, str]:
    """The heads of the federated global model: the classifier is trained only if ``federation.shared`` shares it."""
    from .federation.sharing import classifier_shared

    return model_heads(cfg, classifier_trained=classifier_shared(cfg.federation.shared))


def primary_head(heads: Mapping[str, str]) -> str | None:
    """The classifier where trained, else the memory head where trained, else None (nothing to answer with)."""
    for head in ("classifier", "memory"):
        if heads.get(head) == TRAINED:
            return head
    return None


def checkpoint_heads(meta: Mapping, cfg: Config) -> dict[str, str]:
    """The heads a checkpoint records; for a file written before heads were recorded, inferred from its kind
    (a federated file: :func:`global_model_heads`; anything else: every head trained)."""
    heads = meta.get("heads")
    if isinstance(heads, Mapping) and heads:
        return {str(k): str(v) for k, v in heads.items()}
    kind = str((meta.get("extra") or {}).get("kind", ""))
    return global_model_heads(cfg) if kind.startswith("federated") else model_heads(cfg)


def choose_head(meta: Mapping, cfg: Config, requested: str | None, path: str | Path) -> str:
    """The head ``predict`` answers with: ``requested``, or the checkpoint's primary head.

    Raises
    ------
    CheckpointError
        One line naming the file, the head and the fix: a head the model does not have, an untrained head, or a
        model without any trained head.
    """
    heads = checkpoint_heads(meta, cfg)
    trained = [h for h, s in heads.items() if s == TRAINED]
    if requested is None:
        head = meta.get("primary_head") or primary_head(heads)
        if head is None:
            raise CheckpointError(f"{path}: no head of this model was trained ({heads}); it cannot predict (fix: a "
                                  f"federation whose federation.shared shares the classifier, or a site's "
                                  f"personal_model.pt)")
        return str(head)
    if requested not in heads:
        raise CheckpointError(f"{path}: this {cfg.model.name} model has no {requested} head (heads: "
                              f"{', '.join(heads)}; fix: --head {' or --head '.join(trained) or 'is not possible'})")
    if heads[requested] != TRAINED:
        fix = (f"--head {trained[0]}" if trained else "another model file")
        raise CheckpointError(
            f"{path}: the {requested} head of this model is untrained (a federated global model whose "
            f"{requested} never left the sites); it is not used (fix: {fix}, or a participating site's "
            f"personal_model.pt for its own {requested})")
    return requested


def model_label(model: str, head: str) -> str:
    """``"global model, memory head"``, ``"personal model, classifier"``: how every printed AUC is named."""
    return f"{model}, {HEAD_NAMES.get(head, head)}"
