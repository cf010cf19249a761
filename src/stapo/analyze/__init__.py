"""Diagnostics for STAPO runs: which tokens S2T silences, their gradients, and training curves.

    tokens   summarize / threshold_sweep over a `Rollouts` (captured or collected from a model)
    collect  collect_rollouts: sample, grade and score a model's completions on prompts
    curves   the training curves' vocabulary: title, axis label, unit, metric keys (figures and tables)
    runs     load_run / overlay training curves of several run directories
    plots    the PNG figures (p vs H scatter, grad-proxy histogram, curves)
    report   one self-contained HTML file with all of it

Torch and matplotlib are imported by the submodules, not here.
"""
