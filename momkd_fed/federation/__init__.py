"""Federation maths as pure functions on tensors (no flwr): what is shared, how replies are merged.

- :mod:`.sharing`: sort a state dict into shared / memory / private (``partition_state``).
- :mod:`.contract`: the reply contract (record names, keys, metric names), defined once.
- :mod:`.replies`: ``SiteReply`` and ``usable_replies`` (drop error and malformed replies).
- :mod:`.aggregate`: FedAvg over slides with paired-only keys, and the FedAvgM server step.
- :mod:`.memory_merge`: merge memory aggregates (ema) or trained slots (gradient) into the global memory.
- :mod:`.kmeans`: federated spherical k-means for the initial memory.
- :mod:`.round_merge`: ``merge_round``, one round's server merge composed from the above.
- :mod:`.selection`: ``BestRound``, the round whose global model is kept (best pooled validation AUC).

Genomic normalisation statistics are merged with ``momkd_fed.data.omics`` (``merge_moments``).
"""
