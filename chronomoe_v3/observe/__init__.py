"""The fast clock: per-forward statistics, coherence at three clocks, bimodality, token basins, and the
`LayerObserver` that owns one layer's fast state. Device tensors only, no host synchronisation per forward;
nothing here knows about edits except through `LayerObserver.on_edit(record)`."""
