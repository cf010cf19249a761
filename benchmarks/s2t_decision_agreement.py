"""How much S2T's decision on the old policy (`decision_policy=old`) agrees with the decision on the current
one (`current`, the paper's pi_theta), at the paper's layout: several optimizer steps per generation, several
micro-batches per step.

The embedded model (SmolLM2-135M-Instruct) trains STAPO on the demo task with `decision_policy=old`; at
every optimizer step, before its update, both decisions are taken on the same step (its micro-batches as
TRL buffered them): `old` on pi_old's log-probs and entropies (TRL's old-log-prob pass while generating),
`current` on a fresh forward of the weights the step updates. Per optimizer step after a generation (1..K)
the silenced sets are compared. On step 1 pi_old and pi_theta are the same weights: any difference is a
token within float noise of a threshold (the two forwards batch the rows differently), counted as such.

    python benchmarks/s2t_decision_agreement.py [--generations 2] [--steps 4] [--micro-batches 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time

NOISE = 1e-3  # a token this close (nats, log-prob or entropy) to a threshold is within float noise of it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per generation (the paper: 4)")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--rows", type=int, default=8, help="completions per micro-batch (one prompt's group of 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the per-step table to this file")
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import TrainerCallback

    from stapo.config import load_config
    from stapo.core import s2t_decision, s2t_population, s2t_threshold
    from stapo.engines.trl import STAPOTrainer
    from stapo.engines.trl.trainer import OLD_ENTROPY_KEY
    from stapo.models import load_tokenizer, resolve_model
    from stapo.train import build_stapo_config, load_rows, make_reward_function, prompt_for

    torch.set_num_threads(args.threads)
    overrides = [f"per_device_train_batch_size={args.rows}", f"gradient_accumulation_steps={args.micro_batches}",
                 f"steps_per_generation={args.micro_batches * args.steps}",
                 f"max_steps={args.generations * args.steps}", "decision_policy=old", "save_steps=100000",
                 "output_dir=/tmp/s2t_decision_agreement", "report_to=[]"]
    run = load_config("demo", overrides)
    targs = build_stapo_config(run)
    targs.metrics_jsonl = False
    tokenizer = load_tokenizer(run.model)
    rows = load_rows(run.train_data, run, **run.train_data_kwargs)
    ds = datasets.Dataset.from_list([{"prompt": prompt_for(r["problem"], tokenizer, run), "answer": r["answer"]}
                                     for r in rows])
    trainer = STAPOTrainer(model=resolve_model(run.model), reward_funcs=[make_reward_function(run)], args=targs,
                           train_dataset=ds, processing_class=tokenizer)
    settings = trainer.filter_params.s2t
    log_tau_p = math.log(settings.tau_p)
    table = []

    class Compare(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, **kwargs):
            ga = a.gradient_accumulation_steps
            start = (trainer._step - ga) % a.steps_per_generation
            parts = trainer._buffered_inputs[start : start + ga]
            values = {"current": [], "old": []}
            with torch.no_grad():
                for part in parts:
                    lp, ent, _ = trainer._policy_forward(trainer.model, part)
                    adv = part["advantages"][:, None].expand_as(lp)
                    valid = part["completion_mask"].bool()
                    values["current"].append((lp, ent, adv, valid))
                    values["old"].append((part["old_per_token_logps"], part[OLD_ENTROPY_KEY], adv, valid))
            sets, taus = {}, {}
            for policy, vals in values.items():
                tau = s2t_threshold([s2t_population(*v, settings) for v in vals], settings)
                sets[policy] = [s2t_decision(*v, settings, step_tau_h=tau).spurious for v in vals]
                taus[policy] = float(tau)
            cur = torch.cat([s.flatten() for s in sets["current"]])
            old = torch.cat([s.flatten() for s in sets["old"]])
            differ = cur ^ old
            near = 0
            if differ.any():  # how far each differing token is from the thresholds, under either policy
                fields = {p: [torch.cat([v[i].flatten() for v in values[p]]) for i in range(2)] for p in values}
                for policy, (lp, ent) in fields.items():
                    close = ((lp - log_tau_p).abs() < NOISE) | ((ent - taus[policy]).abs() < NOISE)
                    fields[policy] = close
                near = int((differ & (fields["current"] | fields["old"])).sum())
            row = dict(step=state.global_step + 1, step_after_generation=state.global_step % args.steps + 1,
                       valid_tokens=int(sum(int(v[3].sum()) for v in values["current"])),
                       silenced_current=int(cur.sum()), silenced_old=int(old.sum()), both=int((cur & old).sum()),
                       differ=int(differ.sum()), differ_near_threshold=near,
                       tau_h_current=taus["current"], tau_h_old=taus["old"])
            table.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every step: a run stopped early keeps what it measured
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump({"args": vars(args), "steps": table}, f, indent=2)

    trainer.add_callback(Compare())
    t0 = time.perf_counter()
    trainer.train()
    print(f"# {len(table)} optimizer steps in {time.perf_counter() - t0:.0f} s")
    print("| step after generation | steps | valid tokens | silenced: current | old | both | Jaccard | differ "
          "| of which within 1e-3 of a threshold |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in range(1, args.steps + 1):
        rows_k = [r for r in table if r["step_after_generation"] == k]
        s = {key: sum(r[key] for r in rows_k) for key in ("valid_tokens", "silenced_current", "silenced_old", "both",
                                                          "differ", "differ_near_threshold")}
        union = s["silenced_current"] + s["silenced_old"] - s["both"]
        jaccard = s["both"] / union if union else 1.0
        print(f"| {k} | {len(rows_k)} | {s['valid_tokens']} | {s['silenced_current']} | {s['silenced_old']} | "
              f"{s['both']} | {jaccard:.3f} | {s['differ']} | {s['differ_near_threshold']} |")


if __name__ == "__main__":
    main()
