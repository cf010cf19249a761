"""`stapo train demo` overrides for a tiny, quick run (imported by name: `from tiny_demo_args import ...`).

    tiny_demo_args(model_dir, out, **extra)   one step on the tiny model, a small synthetic set and a
                                              2-problem held-out eval; `extra` replaces or adds fields
"""

from __future__ import annotations

from pathlib import Path


def tiny_demo_args(model_dir: str | Path, out: str | Path, **extra: object) -> list[str]:
    fields: dict[str, object] = dict(
        model=str(model_dir), output_dir=str(out), max_steps=1, save_steps=1, eval_samples=1, eval_limit=2,
        max_completion_length=4, per_device_train_batch_size=4, num_generations=4,
        train_data="synthetic:add1?n=16&seed=0", eval_data="synthetic:add1?n=2&split=heldout")
    fields.update(extra)
    return [f"{k}={v}" for k, v in fields.items()]
