"""Worker of test_at_grpo.py::test_at_grpo_two_processes_one_attacking_rank_finishes (torchrun, 2 CPU processes, gloo).

One AT-GRPO step in which only rank 0 has questions to attack (``at_grpo._unit`` patched),
with ZeRO-3's collectives simulated: a forward pre-hook on the policy all-reduces a marker on every
forward pass (ZeRO-3 / FSDP all-gather the parameters there), and ``generate`` keeps the processes
in step as it does under ZeRO-3 (``synced_gpus``). Unequal attack work across the processes then
hangs or fails. Writes ``rank<k>.json``: forward count, train_info.

    python -m torch.distributed.run --nproc_per_node 2 --master_port 29541 tests/at_grpo_two_ranks.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers.generation.utils as gen_utils
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import per_process_toy  # noqa: E402

from safemed_lib import at_grpo, grpo  # noqa: E402
from safemed_lib.config import GRPORecipe  # noqa: E402

MARK = 1000.0  # what one process contributes per forward: anything else paired with it is out of step


def main(out: Path) -> None:
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    items, vlm = per_process_toy(out, state.process_index)
    forwards = [0]

    def zero3_like(module, args):
        forwards[0] += 1
        t = torch.tensor([MARK])
        dist.all_reduce(t)
        if t.item() != MARK * state.num_processes:
            raise RuntimeError(f"rank {state.process_index}: forward passes out of step across processes ({t.item()})")

    vlm.model.register_forward_pre_hook(zero3_like)
    gen_utils.is_deepspeed_zero3_enabled = lambda: True  # generate: synced_gpus, as under ZeRO-3
    # only rank 0 attacks its questions (draws below the fraction 0.5), rank 1 none
    at_grpo._unit = lambda *parts: 0.0 if state.process_index == 0 else 0.99
    recipe = GRPORecipe(steps=1, lr=1e-3, num_generations=2, batch_size=4, beta=0.0, max_completion_length=4)
    vlm = grpo.train_grpo(vlm, items, recipe, mode="nothink", out_dir=out / "run", device="cpu", save_steps=10,
                          adversarial={"eps": 8 / 255, "alpha": 2 / 255, "steps": 2, "fraction": 0.5})
    facts = {"forwards": forwards[0], **getattr(vlm, "train_info", {})}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
