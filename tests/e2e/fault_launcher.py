"""Runs the fastserve CLI with a fault injected, for the server's isolation tests:

    python tests/e2e/fault_launcher.py FAULT serve MODEL_DIR --port P ...

FAULT is one of
- `poison-seed`: sampling fails (IndexError) for any batch holding a request with seed 666
  that has generated 2 tokens already (so a stream has started when it fails);
- `die-after-N`: after N successful engine steps the model itself breaks (every forward
  raises), which no request explains: the engine must stop and the server exit 1.
"""

from __future__ import annotations

import sys

POISON_SEED = 666


def poison_seed() -> None:
    from fastserve.engine import sampler

    call = sampler.Sampler.__call__

    def failing(self, logits, batch):
        poisoned = zip(batch.params, batch.output_token_ids)
        if any(p.seed == POISON_SEED and len(out) >= 2 for p, out in poisoned):
            raise IndexError("injected sampling fault")
        return call(self, logits, batch)

    sampler.Sampler.__call__ = failing


def die_after(num_steps: int) -> None:
    from fastserve.engine import runner
    from fastserve.model import llama

    execute = runner.ModelRunner.execute
    done = [0]

    def dying(self, batch):
        if done[0] >= num_steps:
            raise RuntimeError("injected model failure")
        done[0] += 1
        return execute(self, batch)

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected model failure")

    runner.ModelRunner.execute = dying
    original_profile = runner.ModelRunner.profile

    def profile(self):  # the start-up profile runs before the fault counts
        runner.ModelRunner.execute = execute
        try:
            return original_profile(self)
        finally:
            runner.ModelRunner.execute = dying

    runner.ModelRunner.profile = profile
    forward = llama.LlamaForCausalLM.forward

    def forward_until_dead(self, *args, **kwargs):
        if done[0] >= num_steps:
            return broken(self)
        return forward(self, *args, **kwargs)

    llama.LlamaForCausalLM.forward = forward_until_dead


def main() -> int:
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault == "poison-seed":
        poison_seed()
    elif fault.startswith("die-after-"):
        die_after(int(fault.removeprefix("die-after-")))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from fastserve.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
