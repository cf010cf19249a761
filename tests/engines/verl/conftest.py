"""Tests of the verl plugin (stapo.engines.verl) against the real verl package (`pip install 'verl==0.9.1'`).

Each module starts with `pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)` (from
verl_fakes), so without verl the whole directory is reported as skipped, with the reason.
"""
