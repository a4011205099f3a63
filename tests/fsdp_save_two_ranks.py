"""Worker of test_grpo.py::test_fsdp_two_processes_sharded_training_and_save (torchrun, 2 CPU processes, gloo).

Runs GRPO under FSDP2 as ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets it up
(the parent passes that launch environment), with one change: accelerate only turns FSDP on for
GPU back-ends, so the CPU state is promoted to FSDP here (``AcceleratorState`` patched). The
model's parameters are then really sharded (``fully_shard``: each process holds half of each
tensor, DTensors) and the final save goes through ``grpo_dist.save_final`` on both processes.
Writes ``rank<k>.json`` (how many parameters were DTensors, the elements each process held) and,
on rank 0, ``full.pt``: the trained parameters gathered in full (``DTensor.full_tensor``) and
``init.pt``, the starting ones, for the parent to compare with the saved model.

With ``--attack``, AT-GRPO in which only rank 0 has questions to attack: under real sharding every
forward pass all-gathers parameters, so unequal attack work across the processes hangs.

    python -m torch.distributed.run --nproc_per_node 2 --master_port 29545 tests/fsdp_save_two_ranks.py OUT_DIR [--attack]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import per_process_toy  # noqa: E402

from safemed_lib import at_grpo, grpo, prompts  # noqa: E402
from safemed_lib.config import GRPORecipe  # noqa: E402

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """AcceleratorState as on GPUs: a launch with ACCELERATE_USE_FSDP gives FSDP (accelerate keeps MULTI_CPU)."""
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


class Gathered(TrainerCallback):
    """At the end of training: how the trainer's model is sharded, and its parameters gathered in full."""

    def __init__(self):
        self.facts, self.full = {}, {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        self.facts = {"dtensors": sum(isinstance(p, DTensor) for p in params.values()), "params": len(params),
                      "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                                         for p in params.values())}
        self.full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                     for n, p in params.items()}  # a collective: every process takes part


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that differs within a group (a random tiny model never answers in format): text length."""
    return [float(len(prompts.completion_text(c))) for c in completions]


def main(out: Path, attack: bool) -> None:
    torch.set_num_threads(1)
    AcceleratorState.__init__ = _fsdp_on_cpu
    state = PartialState(cpu=True)
    items, vlm = per_process_toy(out, state.process_index)
    init = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    look = Gathered()
    grpo.reward_funcs = lambda mode: [length_reward]  # rewards that differ within a group: the weights move
    recipe = GRPORecipe(steps=2, lr=5e-2, num_generations=4, batch_size=4, beta=0.0, max_completion_length=4)
    adversarial = None
    if attack:  # AT-GRPO with only rank 0 attacking its questions (draws below the fraction 0.5), rank 1 none
        at_grpo._unit = lambda *parts: 0.0 if state.process_index == 0 else 0.99
        adversarial = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 2, "fraction": 0.5}
    vlm = grpo.train_grpo(vlm, items, recipe, mode="nothink", out_dir=out / "run", device="cpu", save_steps=10,
                          callbacks=[look], save_dir=out / "model", adversarial=adversarial)
    facts = {**look.facts, "numel": sum(t.numel() for t in init.values()), **getattr(vlm, "train_info", {})}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(facts))
    if state.is_main_process:
        torch.save(look.full, out / "full.pt")
        torch.save(init, out / "init.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), attack="--attack" in sys.argv[2:])
