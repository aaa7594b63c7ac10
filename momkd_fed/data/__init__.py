"""The data layer: patch-feature files, manifests, genomics, spatial graphs, splits, the site cache and checks.

Modules (import them directly; this package imports nothing heavy so ``momkd_fed.data.bag`` stays cheap):

- ``bag``: Bag / SiteData, the in-memory contract with the engine
- ``h5``: TRIDENT / CLAM .h5 writers and the validating reader ``read_slide_h5``
- ``graph``: kNN neighbour index (``knn_neighbors``, ``neighbors_from_edge_index``)
- ``manifest``: ``read_manifest``; ``omics``: ``read_omics`` and mergeable normalisation moments
- ``splits``: ``patient_splits``; ``cache``: the site-local slide cache; ``site``: ``load_site``
- ``check``: ``check_site`` / ``check_federation`` / ``summarize_site`` for ``momkd-fed check-data``
"""

from .bag import SPLITS, Bag, SiteData

__all__ = ["SPLITS", "Bag", "SiteData"]
