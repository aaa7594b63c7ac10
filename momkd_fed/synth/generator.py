"""The generative model of synthetic histology: patch-feature bags driven by each case's genomic profile.

How one slide is made
---------------------
1. **Tissue.** A contiguous blob of P cells on the patch grid (P log-normal per slide), partitioned into
   Voronoi regions of ``n_background`` *background tissue types* shared by all slides (think stroma, fat,
   lymphocytes, normal ducts, generic tumour) with a per-slide Dirichlet mix. Tissue-type means are random
   directions with per-dimension RMS ``phenotype_rms``.
2. **Label-related phenotypes.** ``n_label_phenotypes`` tumour sub-phenotypes, each the generic-tumour mean
   plus an offset of norm ``subtype_norm`` (a few noise standard deviations along one direction: they resemble
   ordinary tumour patches, and one patch alone is an unreliable witness). They occupy a SMALL fraction of the
   bag (``informative_min``..``informative_max``, 3-15%) in 1-2 spatially CLUSTERED blobs per phenotype.
3. **Genomics drives them.** *Genomic programs* are a fixed linear map of the case's gene vector: a random
   rotation of the cohort's ``n_programs`` leading principal components, whitened (unsupervised: labels never
   enter; the main axes of tumour biology drive morphology). Program 0 sets the informative fraction
   (sigmoid), programs 1..L set the phenotype mix (softmax), and all programs shift the appearance of
   label-phenotype patches along fixed random directions (a continuous "grade", ``appearance_norm`` per program
   unit). Histology therefore carries the label signal only as far as these programs do, and only through a
   few dozen patches diluted in a large bag: genomics shows it directly, histology has to find it.
4. **Site effects.** Every site has (a) a shift of the whole feature space, (b) a rank-``stain_rank``
   stain/scanner subspace along which each slide moves with a random strength around a site-specific mean,
   (c) a site-specific perturbation of every tissue type's mean (the same tissue looks a little different at
   every hospital). Every slide also gets an isotropic random offset (``slide_offset`` per dimension: the
   slide-to-slide variation that keeps the site from being perfectly decodable).
5. **Patches.** feature = site-perturbed tissue-type mean (+ grade for label phenotypes) + slide offset + site
   shift + stain + Gaussian noise (std ``noise`` per dimension), float32.

Calibration (done once, against data-formats.md's realism targets, never against MoMKD's results): site
effects are sized so that a logistic regression on slide-mean features names the site for ~80-93% of slides
(foundation-model features of real cohorts: 70-90%); tiny's genes give AUC ~0.9 like TCGA's; the label
phenotypes' norms were raised until an attention-MIL baseline (ABMIL, 8 epochs) clearly beat chance on the
150-slide ``tiny`` of that time (~0.75-0.8 test AUC) while a linear model on slide-mean features stays near 0.6.
(``tiny`` is now 300 slides with a wider model; ABMIL reaches ~0.85-0.90 there, MoMKD ~0.83-0.87.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .tissue import grow_regions, tissue_cells, voronoi_labels

TARGET_MAGNIFICATION = 20  # features are extracted at 20x
PATCH_SIZE = 256  # patch side at the target magnification (px); level-0 side = 256 * level0_mag / 20


def stable_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator seeded by ``seed`` and ``keys`` (strings hashed with SHA-256, not Python's salted hash)."""
    words = [int(seed)]
    for k in keys:
        if isinstance(k, str):
            words.append(int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little"))
        else:
            words.append(int(k))
    return np.random.default_rng(words)


@dataclass(frozen=True)
class HistologyParams:
    """Knobs of the histology generative model (see the module docstring)."""

    feature_dim: int = 32  # D
    n_background: int = 5  # background tissue types shared by all slides (type 0 = generic tumour)
    n_label_phenotypes: int = 3  # tumour sub-phenotypes whose abundance/mix follows the genomic programs
    informative_min: float = 0.03  # smallest fraction of a bag made of label-related phenotypes
    informative_max: float = 0.15  # largest such fraction
    n_programs: int = 8  # genomic programs (>= 1 + n_label_phenotypes): a rotation of the top principal components
    program_gain: float = 2.0  # slope of abundance (sigmoid) and mix (softmax) in the standardised programs
    appearance_norm: float = 2.0  # label-phenotype patches shift by this norm per program unit (morphology grade)
    phenotype_rms: float = 0.45  # per-dimension RMS of a tissue-type mean
    subtype_norm: float = 3.4  # norm of a label phenotype's offset from the generic tumour mean
    noise: float = 1.0  # per-patch Gaussian noise, std per dimension
    voronoi_seeds: int = 8  # background regions per slide
    slide_offset: float = 0.18  # std per dimension of each slide's isotropic random offset
    site_shift_norm: float = 0.5  # norm of each site's shift
    stain_rank: int = 2  # rank of each site's stain/scanner subspace
    stain_mean_norm: float = 0.4  # norm scale of a site's mean stain strength
    stain_slide_norm: float = 0.6  # std of a slide's stain strength around its site's mean (norm units)
    site_jitter_norm: float = 0.4  # norm of a site's perturbation of each tissue-type mean
    median_patches: int = 80  # median bag size (log-normal)
    patches_sigma: float = 0.45  # log-normal sigma of bag sizes
    min_patches: int = 30  # bag size clip, lower
    max_patches: int = 200  # bag size clip, upper


@dataclass
class SlideSample:
    """One synthetic slide.

    Attributes
    ----------
    features : (P, D) float32 patch features.
    coords : (P, 2) int64 top-left (x, y) level-0 pixels on the patch grid.
    tissue : (P,) int64 tissue type; ``>= n_background`` marks label-related phenotypes.
    """

    features: np.ndarray
    coords: np.ndarray
    tissue: np.ndarray
    patch_size_level0: int
    level0_magnification: int
    level0_width: int
    level0_height: int


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))  # (n, d)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class HistologyModel:
    """Fixed random phenotypes, gene-to-program map and site effects; draws slides.

    Parameters
    ----------
    params : HistologyParams
    n_genes : int, G (length of the gene vectors passed to :meth:`fit_programs`).
    seed : int, cohort seed (everything is a deterministic function of it).
    """

    def __init__(self, params: HistologyParams, n_genes: int, seed: int) -> None:
        if params.n_programs < 1 + params.n_label_phenotypes:
            raise ConfigError(f"synth: n_programs={params.n_programs} must be >= 1 + n_label_phenotypes="
                              f"{1 + params.n_label_phenotypes}")
        self.p = params
        self.seed = seed
        d = params.feature_dim
        rng = stable_rng(seed, "histology-model")
        scale = params.phenotype_rms * np.sqrt(d) * rng.uniform(0.8, 1.25, size=(params.n_background, 1))
        self.background = _unit(rng, params.n_background, d) * scale  # (B, D)
        sub = _unit(rng, params.n_label_phenotypes, d) * params.subtype_norm  # (L, D)
        self.label_means = self.background[0] + sub  # (L, D) tumour sub-phenotypes
        self.appearance = _unit(rng, params.n_programs, d) * params.appearance_norm  # (K, D)
        self.rotation = np.linalg.qr(rng.standard_normal((params.n_programs, params.n_programs)))[0]  # (K, K)
        self.n_genes = n_genes
        self.gene_mean = np.zeros(n_genes)
        self.gene_map = np.zeros((params.n_programs, n_genes))  # (K, G) set by fit_programs
        self._sites: dict[str, dict[str, np.ndarray]] = {}

    @property
    def means(self) -> np.ndarray:
        """(B + L, D) tissue-type means before site perturbation."""
        return np.concatenate([self.background, self.label_means], axis=0)

    def fit_programs(self, genes: np.ndarray) -> None:
        """Fit the gene-to-program map on a cohort's gene matrix (N, G), without labels.

        The programs are a fixed random rotation of the K leading principal components of the centred genes,
        whitened (unit variance over the cohort): the main axes of the cohort's tumour biology, mixed.
        """
        g = np.asarray(genes, dtype=np.float64)  # (N, G)
        k = self.p.n_programs
        if g.shape[1] != self.n_genes or len(g) <= k:
            raise ConfigError(f"synth: fitting {k} genomic programs needs more than {k} cases of {self.n_genes} "
                              f"genes; got {g.shape} (lower n_programs)")
        self.gene_mean = g.mean(axis=0)
        _, sv, vt = np.linalg.svd(g - self.gene_mean, full_matrices=False)  # vt: (min(N, G), G)
        whiten = vt[:k] * (np.sqrt(len(g)) / sv[:k, None])  # (K, G): unit-variance PC scores
        self.gene_map = self.rotation @ whiten  # (K, G)

    def programs(self, genes: np.ndarray) -> np.ndarray:
        """Program scores (N, K) of gene vectors (N, G); unit variance over the fitted cohort."""
        return (np.asarray(genes, dtype=np.float64) - self.gene_mean) @ self.gene_map.T  # (N, K)

    def site_effect(self, site: str) -> dict[str, np.ndarray]:
        """The site's shift (D,), stain basis (r, D), mean stain strength (r,), tissue-type means (T, D)."""
        if site not in self._sites:
            p, d = self.p, self.p.feature_dim
            rng = stable_rng(self.seed, "site", site)
            self._sites[site] = {
                "shift": _unit(rng, 1, d)[0] * p.site_shift_norm,
                "stain_basis": np.linalg.qr(rng.standard_normal((d, p.stain_rank)))[0].T,  # (r, D) orthonormal
                "stain_mean": rng.standard_normal(p.stain_rank) * p.stain_mean_norm,
                "means": self.means + _unit(rng, len(self.means), d) * p.site_jitter_norm,
            }
        return self._sites[site]

    def bag_size(self, rng: np.random.Generator) -> int:
        """A log-normal bag size, clipped to [min_patches, max_patches]."""
        p = self.p
        n = int(round(p.median_patches * np.exp(p.patches_sigma * rng.standard_normal())))
        return int(np.clip(n, p.min_patches, p.max_patches))

    def informative_counts(self, rng: np.random.Generator, program: np.ndarray, n: int) -> np.ndarray:
        """Patches per label phenotype (L,) for a bag of ``n`` patches and a case's program scores (K,)."""
        p = self.p
        span = p.informative_max - p.informative_min
        frac = p.informative_min + span / (1 + np.exp(-p.program_gain * program[0]))
        logits = p.program_gain * program[1 : 1 + p.n_label_phenotypes]  # (L,)
        mix = np.exp(logits - logits.max())
        mix /= mix.sum()
        n_inf = int(rng.binomial(n, frac))
        return rng.multinomial(n_inf, mix)

    def slide(self, rng: np.random.Generator, site: str, program: np.ndarray, n_patches: int,
              level0_magnification: int = 40) -> SlideSample:
        """Draw one slide of a case with program scores ``program`` (K,) at ``site``."""
        p, d = self.p, self.p.feature_dim
        eff = self.site_effect(site)
        cells = tissue_cells(rng, n_patches)  # (P, 2)
        counts = self.informative_counts(rng, program, n_patches)  # (L,)
        sizes, kinds = [], []
        for k, c in enumerate(counts):
            if c == 0:
                continue
            parts = [c] if c < 6 or rng.random() < 0.5 else [c // 2, c - c // 2]
            sizes += parts
            kinds += [p.n_background + k] * len(parts)
        region = grow_regions(rng, cells, sizes)  # (P,)
        mix = rng.dirichlet(np.full(p.n_background, 2.0))
        tissue = voronoi_labels(rng, cells, p.voronoi_seeds, mix)  # (P,)
        inside = region >= 0
        tissue[inside] = np.asarray(kinds, dtype=np.int64)[region[inside]]

        offset = rng.standard_normal(d) * p.slide_offset  # (D,)
        strength = eff["stain_mean"] + rng.standard_normal(p.stain_rank) * p.stain_slide_norm  # (r,)
        slide_mean = offset + eff["shift"] + strength @ eff["stain_basis"]  # (D,)
        noise = rng.standard_normal((n_patches, d), dtype=np.float32) * np.float32(p.noise)  # (P, D)
        grade = np.clip(program, -3, 3) @ self.appearance  # (D,) program-driven morphology of label phenotypes
        means = eff["means"][tissue] + slide_mean  # (P, D)
        means[tissue >= p.n_background] += grade
        features = noise + means.astype(np.float32)  # (P, D)

        ps0 = PATCH_SIZE * level0_magnification // TARGET_MAGNIFICATION
        origin = rng.integers(ps0, 24 * ps0, size=2)  # (2,) tissue does not start at the slide corner
        coords = cells * ps0 + origin  # (P, 2) level-0 pixels
        margin = rng.integers(ps0, 24 * ps0, size=2)
        extent = coords.max(axis=0) + ps0 + margin if n_patches else margin
        return SlideSample(features=features, coords=coords.astype(np.int64), tissue=tissue,
                           patch_size_level0=int(ps0), level0_magnification=int(level0_magnification),
                           level0_width=int(extent[0]), level0_height=int(extent[1]))
