"""What leaves a site, and how much it can tell: minimum counts, differential privacy, reply validation, robust
averaging, audit log (pure functions on tensors; no flwr).

Modules
-------
- :mod:`.mechanism`: minimum counts per memory slot (``withhold_small_slots``), the Gaussian mechanism on memory
  aggregates (``privatize_memory``), ``add_gaussian_noise``, ``secret_generator``.
- :mod:`.clipping`: ``SlotAccumulator`` (per-slide clipped memory sums and counts), ``clip_update``,
  ``update_delta``.
- :mod:`.accountant`: ``PrivacyAccountant`` (Rényi DP of the Gaussian mechanism composed over rounds, converted to
  (epsilon, delta)).
- :mod:`.release`: ``memory_release``, the site's one call that builds its memory reply from the settings.
- :mod:`.validation`: ``validate_replies`` (``usable_replies`` + update norms + memory plausibility).
- :mod:`.robust`: the ``Aggregator`` interface and its mean / median / trimmed-mean / DP-mean implementations.
- :mod:`.audit`: ``AuditLog``, one JSON line per round per site of what was sent.
- :mod:`.settings`: ``check_privacy`` (cross-field rules), ``dp_covers``.

Defaults
--------
``privacy.enabled`` is False: sites send exact aggregates, subject only to the minimum counts
(``federation.min_slot_count`` slides and ``privacy.min_slot_embeddings`` embeddings per slot), and replies are
validated (update norm bound at 20x the other sites' median). With ``enabled`` (and ``memory.update: ema``), each
site clips every slide's memory contribution to C = 1 and adds Gaussian noise with multiplier sigma = 1 before
sending; at delta = 1e-5 one round then costs epsilon = 4.73 per site and ten rounds 19.0 (improved RDP
conversion; the exact Gaussian value is 4.38 and 17.9). That is a weak guarantee — DP at this scale of data
is — and the noise (std 1 per sum coordinate, S = 64 coordinates per slot) is comparable to the signal of a slot
used by a handful of slides, so small sites lose memory quality; larger sigma buys smaller epsilon at the price
of accuracy. Shared-weight DP (``update_noise_multiplier``) is site-level central DP (see :mod:`.robust`): with
the few sites of a hospital federation its noise swamps the update unless z is small, so it is off by default.

What the epsilon covers (``settings.dp_covers``): the memory release of each training round ("memory") and,
when update noise is on, the shared weights ("shared_weights"). It does *not* cover: the metrics of a reply
(slide counts, losses, AUCs), the calibration histograms of the evaluate reply (class-conditional counts of the
global model's validation scores on fixed bins, runs merged under ``federation.min_slot_count``,
``momkd_fed.calibration.coarsen_histogram``; audited with every evaluate reply), the one-off federated k-means
initialisation (its ``kmeans_step`` replies have the
same sums/counts structure and can be released through ``SlotAccumulator`` + ``privatize_memory`` with one
accountant step each; ``kmeans_seed`` sends local centroids and has no DP variant here), the genomic
normalisation moments, and the shared weights when update noise is off. The audit log records ``dp_covers``
with every line so that no reader mistakes a memory-only epsilon for a guarantee on the model.

SecAgg+ (flwr 1.42): studied, not used
--------------------------------------
What it is, measured in the installed package (``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``,
``flwr/client/mod/secure_aggregation/secaggplus_mod.py``): ``SecAggPlusWorkflow`` runs only inside the legacy
``DefaultWorkflow`` fit stage and refuses any context that is not a ``LegacyContext`` (TypeError); the round
loop, sampling (``strategy.configure_fit``) and aggregation (``strategy.aggregate_fit``) belong to a legacy
``flwr.server.strategy.Strategy``. On the client, ``secaggplus_mod`` wraps a ClientApp built from a legacy
``client_fn`` (NumPyClient); in 1.42 a ClientApp built with ``client_fn`` routes every message to it, so it
cannot also serve ``@app.query`` handlers. The mod turns the fit result into one list of arrays, multiplies it
by ``num_examples / max_weight``, clips every value to ``[-clipping_range, clipping_range]`` (default 8),
quantises to 2^22 levels (stochastic rounding), masks, and **clears every ArrayRecord of the reply** before
sending the masked vector; the server unmasks the sum and divides by the summed weights: a weighted average of
one parameter list, the same weight for every entry. It needs at least 3 sampled sites (``num_shares`` > 2).

Why it cannot serve this protocol without weakening the design:

1. *Orchestration*: our ServerApp is a Message-API ``@app.main()`` with a ``flwr.serverapp.strategy`` FedAvgM
   subclass, custom query rounds before round 1 (``kmeans_seed``, ``kmeans_step``, ``omics_moments``), per-round
   checkpoints and resume of our own state. SecAgg+ would force the legacy loop and a legacy ClientApp, i.e. a
   second implementation of the round logic, and the queries would still travel in the clear.
2. *One weighted average is not what we compute*: the shared weights are slide-weighted over all sites **except**
   the genomic encoder, averaged over paired sites only (a different weight vector); the memory merge needs
   **sums** of per-slot sums and counts (each slot has its own denominator), not a num_examples-weighted mean.
   These can be encoded into one summed vector — sites send ``[n*w_common, p*n*w_genomic, n, p*n, sums,
   counts]`` (p = paired) as their "parameters" with a constant weight, and the server divides afterwards.
   Numerically that is workable (a clip range of ~1e4 for the slot counts gives a quantisation step of ~5e-3,
   ~2e-5 after division by the total slides), so precision is not the blocker; but the payload then no longer is
   model parameters, the legacy strategy's averaging becomes a no-op to work around, and points 1, 3 and 4 remain.
3. *The memory record would be dropped*: the mod clears every ArrayRecord of the reply, so the memory aggregates
   cannot travel next to the masked weights.
4. *It removes the server's defences*: per-reply validation (update-norm bound, memory plausibility), the
   server's re-check of ``min_slot_count`` per site, and robust aggregation (median, trimmed mean) all need each
   site's values, which secure aggregation hides by design.
5. *Scale*: hospital federations of 2 sites are common; SecAgg+ needs at least 3, and with 2 the sum reveals
   the other site's contribution to each participant anyway.

So SecAgg+ is not wired in (no half-working variant). The extension point is :mod:`.robust`: the server calls an
``Aggregator`` for the shared weights and a ``MemorySum`` for the memory totals; ``MeanAggregator``,
``DPMeanAggregator`` and ``PlainMemorySum`` need only sums over sites (``sum n_i w_i``, ``sum n_i``, per-slot sums
and counts), so a secure-sum implementation over the Message API (e.g. pairwise masks agreed in a query round,
with the encoding of point 2 and field arithmetic sized for it) can replace them without touching the rest. It
would still have to give up point 4, which is why the robust aggregators cannot have a secure variant.
"""

from .accountant import PrivacyAccountant, epsilon_from_rho, gaussian_epsilon_exact
from .audit import AUDIT_FILE, AuditLog, audit_record, describe_arrays
from .clipping import (ClipStats, SlotAccumulator, assign_slots, clip_shared_weights, clip_update, tensor_norm,
                       update_delta)
from .mechanism import (Withheld, add_gaussian_noise, noisy_threshold, privatize_memory, secret_generator,
                        withhold_small_slots, withhold_small_usage)
from .release import MemoryRelease, memory_release
from .robust import (Aggregator, DPMeanAggregator, MeanAggregator, MedianAggregator, MemorySum, PlainMemorySum,
                     TrimmedMeanAggregator, make_aggregator)
from .settings import check_privacy, dp_covers, memory_dp, update_dp
from .validation import validate_replies

__all__ = [
    "AUDIT_FILE", "Aggregator", "AuditLog", "ClipStats", "DPMeanAggregator", "MeanAggregator", "MedianAggregator",
    "MemoryRelease", "MemorySum", "PlainMemorySum", "PrivacyAccountant", "SlotAccumulator", "TrimmedMeanAggregator",
    "Withheld", "add_gaussian_noise", "assign_slots", "audit_record", "check_privacy", "clip_shared_weights",
    "clip_update",
    "describe_arrays", "dp_covers", "epsilon_from_rho", "gaussian_epsilon_exact", "make_aggregator", "memory_dp",
    "memory_release", "noisy_threshold", "privatize_memory", "secret_generator", "tensor_norm", "update_delta",
    "update_dp", "validate_replies", "withhold_small_slots", "withhold_small_usage",
]
