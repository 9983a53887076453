"""Batch segmentation of many recorded sequences on Ray Data (``python -m app.batch``).

:mod:`~app.batching.sequences` turns SRC arguments into checked sequences, :mod:`~app.batching.stages`
holds what runs on the workers (the read stage and the model actors), :mod:`~app.batching.outputs`
what the driver writes (per-sequence folders, the manifest) and :mod:`~app.batching.engine` wires them
into one Ray Data dataset. Ray is imported only when a run starts, so this package imports without it.
"""
