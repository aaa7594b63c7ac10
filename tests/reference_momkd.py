"""The authors' MoMKD code beside ours: where it lives, how it is imported, and which of its weights is which of ours.

The reference (``../shared/reference/momkd``: ``models/mkd.py`` and ``utils/Mkd_train_utils.py``, Apache-2.0) is a
comparator only: it is imported from that folder, never copied here. Used by ``tests/test_reference_parity.py``
and ``benchmarks/reference_parity.py``.

Folder: ``$MOMKD_REFERENCE`` if set; else ``reference/momkd`` beside the shared data folder (the parent of
``$MOMKD_SHARED_DATA`` when that is set, as ``conftest.py`` resolves the data); else
``../shared/reference/momkd`` relative to the repository.

Import: ``models/mkd.py`` imports ``vq.vector_quantize_pytorch.vector_quantize_pytorch`` (the authors vendor
vector-quantize-pytorch 1.22.17 under ``vq/``); that module name is registered as an alias of the installed
``vector_quantize_pytorch.vector_quantize_pytorch`` (the test extra pins 1.22.17) before the file is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

from momkd_fed.config import MemoryConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
VQ_VERSION = "1.22.17"  # the version the reference vendors (pyproject's test extra pins it)
_VQ_ALIAS = "vq.vector_quantize_pytorch.vector_quantize_pytorch"


def reference_dir() -> Path:
    """The folder holding ``models/mkd.py`` and ``utils/Mkd_train_utils.py`` (see the module docstring)."""
    env = os.environ.get("MOMKD_REFERENCE")
    if env:
        return Path(env)
    data = os.environ.get("MOMKD_SHARED_DATA")
    shared = Path(data).resolve().parent if data else ROOT.parent / "shared"
    return shared / "reference" / "momkd"


def missing_reason() -> str | None:
    """Why the reference cannot be loaded here (folder or a package it needs absent), or None."""
    d = reference_dir()
    if not (d / "models" / "mkd.py").is_file() or not (d / "utils" / "Mkd_train_utils.py").is_file():
        return (f"the authors' reference code is absent: no {d}/models/mkd.py or utils/Mkd_train_utils.py "
                "(set MOMKD_REFERENCE to the folder)")
    for mod in ("vector_quantize_pytorch", "torch_geometric", "sklearn", "tqdm"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install -e '.[test]')"
    return None


def _load(name: str, path: Path) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_reference() -> tuple[types.ModuleType, types.ModuleType]:
    """The reference's ``models/mkd.py`` and ``utils/Mkd_train_utils.py`` as modules (loaded once)."""
    vq = importlib.import_module("vector_quantize_pytorch")
    version = getattr(vq, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("vector-quantize-pytorch")
    if version != VQ_VERSION:
        raise RuntimeError(f"vector-quantize-pytorch {version} installed; the reference needs {VQ_VERSION}")
    for parent in ("vq", "vq.vector_quantize_pytorch"):
        sys.modules.setdefault(parent, types.ModuleType(parent))
    sys.modules.setdefault(_VQ_ALIAS, importlib.import_module("vector_quantize_pytorch.vector_quantize_pytorch"))
    d = reference_dir()
    mkd = _load("momkd_reference_mkd", d / "models" / "mkd.py")
    train_utils = _load("momkd_reference_train_utils", d / "utils" / "Mkd_train_utils.py")
    return mkd, train_utils


def reference_model(model: ModelConfig, memory: MemoryConfig, feature_dim: int, n_genes: int) -> nn.Module:
    """The reference ``MKD`` with our config's dims (it fixes 2 GATv2 layers, 2 heads and a 512-wide omics MLP)."""
    fixed = {"gat_layers": 2, "heads": 2, "omics_hidden": 512}
    bad = {k: getattr(model, k) for k, v in fixed.items() if getattr(model, k) != v}
    if bad:
        raise ValueError(f"the reference MKD cannot express model settings {bad}; it fixes {fixed}")
    mkd, _ = load_reference()
    return mkd.MKD(rna_input_dim=n_genes, wsi_input_dim=feature_dim, wsi_encoder_dim=model.hidden_dim,
                   rna_embedding_dim=model.omics_embed_dim, shared_embedding_dim=model.shared_dim,
                   num_memory_per_class=memory.slots, cls_hidden_dim=model.cls_hidden, attn_tau_init=model.tau_init)


# --------------------------------------------------------------------------------------------------------------
# The parameter-name mapping, written once: our state-dict prefix -> the reference's. The memory is the one
# non-renaming entry: our (2, K, S) slots are the reference's two (1, K, S) codebooks, C- = row 0 = mem_neg,
# C+ = row 1 = mem_pos. GATv2 attention vectors are (H, C) here and (1, H, C) in torch_geometric.

PREFIXES = (
    ("histology_encoder.gats.0.", "wsi_encoder.gat1."),
    ("histology_encoder.gats.1.", "wsi_encoder.gat2."),
    ("histology_encoder.norms.0.", "wsi_encoder.ln1."),
    ("histology_encoder.norms.1.", "wsi_encoder.ln2."),
    ("histology_encoder.res_proj.", "wsi_encoder.res_proj1."),
    ("patch_proj.", "wsi_patch_projector."),
    ("slide_proj.", "wsi_pool_projector."),
    ("omics_encoder.net.", "rna_tower.encoder."),
    ("omics_proj.", "rna_projector."),
    ("omics_decoder.net.", "rna_decoder.decoder."),
    ("classifier.", "wsi_classifier_proto."),
    ("log_tau", "attn_log_tau"),
)
MEMORY = {0: "mem_neg._codebook.embed", 1: "mem_pos._codebook.embed"}  # our memory.slots row -> reference


def reference_name(ours: str) -> str:
    """The reference parameter holding our parameter ``ours`` (not for ``memory.slots``: see :data:`MEMORY`)."""
    for mine, theirs in PREFIXES:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise KeyError(f"no reference parameter for {ours!r}")


def paired_tensors(ours: nn.Module, ref: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, our tensor, the reference's tensor viewed in our shape) for every parameter of both models.

    Raises KeyError unless the mapping covers each parameter of each model exactly once.
    """
    theirs = dict(ref.named_parameters())
    out, used = [], set()
    for name, p in ours.named_parameters():
        if name == "memory.slots":
            for row, ref_name in MEMORY.items():
                out.append((f"memory.slots[{row}]", p[row], theirs[ref_name][0]))
                used.add(ref_name)
            continue
        ref_name = reference_name(name)
        q = theirs[ref_name]
        out.append((name, p, q.view(p.shape)))
        used.add(ref_name)
    left = set(theirs) - used
    if left:
        raise KeyError(f"reference parameters without a counterpart of ours: {sorted(left)}")
    return out


@torch.no_grad()
def copy_into_reference(ours: nn.Module, ref: nn.Module) -> None:
    """Give the reference model exactly our weights (slots raw, as stored)."""
    for _, mine, theirs in paired_tensors(ours, ref):
        theirs.copy_(mine)


@torch.no_grad()
def copy_from_reference(ours: nn.Module, ref: nn.Module) -> None:
    """Give our model exactly the reference's weights."""
    for _, mine, theirs in paired_tensors(ours, ref):
        mine.copy_(theirs)


def edge_index(neighbors: torch.Tensor) -> torch.Tensor:
    """(P, k+1) neighbour index (column 0 = self) -> the reference's (2, E) kNN edges j -> i, self loops left out
    (its GATv2Conv adds them)."""
    p, k1 = neighbors.shape
    src = neighbors[:, 1:].reshape(-1)  # (P*k,)
    dst = torch.arange(p).repeat_interleave(k1 - 1)  # (P*k,)
    return torch.stack([src, dst])  # (2, P*k)


def disable_dropout(ref: nn.Module) -> None:
    """Dropout off everywhere in the reference while it stays in training mode (its memory loss needs that)."""
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):  # WsiEncoder and torch_geometric's GATv2Conv
            m.dropout = 0.0


def hparams(loss_cfg, grad_clip: float) -> dict:
    """Our loss config as the reference loop's ``hparams`` (its memory weight is fixed at 0.1 in the loop)."""
    if loss_cfg.w_mem != 0.1 or loss_cfg.align_t != 5.0 or loss_cfg.align_beta != 20.0 or loss_cfg.ortho_weight != 10:
        raise ValueError("the reference loop fixes w_mem 0.1, t 5, beta 20 and orthogonality weight 10")
    return {"task_weight": loss_cfg.w_ce, "recon_weight": loss_cfg.w_recon, "alpha_rna": loss_cfg.w_align_omics,
            "alpha_wsi": loss_cfg.w_align_wsi, "margin": loss_cfg.align_margin, "gc": grad_clip}
