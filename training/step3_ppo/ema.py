"""An exponential moving average of the actor's weights (DeepSpeed-Chat's --enable_ema), kept in fp32 on CPU."""
from __future__ import annotations

from pathlib import Path

import torch

from chatrlhf.training.saving import write_hf
from chatrlhf.training.zero3 import gathered
from chatrlhf.utils import distributed as dist

EMA_FILE = "actor_ema.pt"


class ActorEMA:
    def __init__(self, engine, beta: float):
        self.beta = beta
        with gathered(engine):
            self.state = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}

    @torch.no_grad()
    def update(self, engine) -> None:
        """ema = beta * ema + (1 - beta) * weights, after an optimizer step."""
        with gathered(engine):
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    self.state[name].lerp_(p.detach().float().cpu(), 1.0 - self.beta)

    def save(self, checkpoint_dir: Path) -> None:
        if dist.is_main_process():
            torch.save(self.state, Path(checkpoint_dir) / EMA_FILE)
        dist.barrier()

    def load(self, checkpoint_dir: Path) -> None:
        self.state = torch.load(Path(checkpoint_dir) / EMA_FILE, weights_only=True)

    def save_pretrained(self, engine, output_dir, tokenizer) -> None:
        """The averaged weights in Hugging Face format (LoRA merged), like the actor itself."""
        if dist.is_main_process():
            dtype = next(engine.module.parameters()).dtype
            # named_parameters() names are what state_dict() uses for parameters; buffers come from the module.
            state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items() if k not in self.state}
            state.update({k: v.to(dtype) for k, v in self.state.items()})
            write_hf(engine.module, state, Path(output_dir), tokenizer, engine.lora_scaling, False)
        dist.barrier()
