"""Hyperparameter sweeps with Ray Tune: every trial is a full Ray Train run of the training recipe.

- ``space``: the sweep file (a training config plus a ``tune`` block) and the search space (pure).
- ``plan``: the driver-side check before Ray starts, and how many trials a cluster holds at once.
- ``schedulers``: early stopping by name (ASHA, median stopping), in epochs.
- ``sweep``: the Ray shell: the trial function, Ray Tune, resuming, writing the results.
- ``results``: the trials table, its CSV, the best config (pure).
- ``plot``: the validation metric per epoch of every trial, as a PNG (Pillow).

Run one with ``python jobs/tune.py --config configs/tune_demo.yaml``.
"""
