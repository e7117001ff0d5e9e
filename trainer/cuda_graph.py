"""The whole training step replayed as one CUDA graph.

At the ``gpu`` preset's size a step is a thousand small kernels, and the host's work to
launch them, not the GPU, sets the pace (``bench/step_profile.py``: the GPU busy a third of
the time). A CUDA graph records the step's kernels once and replays them with one launch.
Everything a step does runs inside the graph: the batch gathered from the images held on
the GPU by a static index tensor, the augmentation drawn from a generator registered with
the graph (seeded before each replay as the eager step seeds its own, so a resumed run
draws the same), forward under autocast, the loss, backward, the non-finite flag, and fused
AdamW with ``capturable=True`` reading its learning rate from a tensor. Nothing in it reads
back to the host (a test holds the step to that).

Used for one process training on CUDA from images held in memory (not under torchrun, not
on crops read from disk), unless ``cuda_graph`` is off. The first steps run eagerly on a
side stream, as capture wants; if the capture fails, training goes on eagerly and says why.
"""

from __future__ import annotations

import torch

WARMUP_STEPS = 3  # eager steps before the capture: the optimiser's state, cuBLAS and cuDNN set up


def graph_reason(cfg, device: torch.device, world: int, crops) -> str | None:
    """Why the step cannot be a CUDA graph in this run, or None when it can."""
    if device.type != "cuda":
        return "not on CUDA"
    if not cfg.cuda_graph:
        return "cuda_graph is off"
    if world > 1:
        return "under torchrun"
    if crops is not None:
        return "crops read from disk"
    return None


def conform_optimizer(optimizer: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """Make a (possibly just loaded) optimiser fit this run: capturable with its learning
    rate in a tensor on ``device`` for a CUDA graph, plain floats otherwise. A checkpoint's
    param groups overwrite these options when it is loaded."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = capturable
        group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if capturable else lr


def plain_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict with a tensor learning rate as a float and capturable off,
    so that a checkpoint loads on any device."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


class GraphedStep:
    """A trainer's step as a CUDA graph: ``step(idx)`` trains on the images ``idx``."""

    def __init__(self, trainer) -> None:
        self.t = trainer
        device = trainer.device
        self.idx = torch.zeros(trainer.cfg.batch_size, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device)
        self.side = torch.cuda.Stream(device)  # eager steps run here, as capture wants
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.eager_steps = 0
        self.failed = False  # the capture failed: every step runs eagerly
        self.notice: str | None = None  # for the trainer to say, once

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimisation step on the images ``idx`` (a device tensor of batch size).
        The returned loss is overwritten by the next step: add it up before then."""
        t, st = self.t, self.t.state
        t.set_step_lr()
        self.idx.copy_(idx)
        if self.graph is None and not self.failed and self.eager_steps >= WARMUP_STEPS:
            self._capture()
        # Seeded as the eager step seeds its own generator; a replay reads the seed and
        # the offset (0 after seeding) as they are when it starts.
        self.generator.manual_seed(t._step_seed(st.batch))
        if self.graph is not None:
            self.graph.replay()
        else:
            main = torch.cuda.current_stream(t.device)
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                t.optimizer.zero_grad(set_to_none=True)
                self.loss = self._body()
            main.wait_stream(self.side)
            self.eager_steps += 1
        st.step += 1
        st.batch += 1
        return self.loss

    def _body(self) -> torch.Tensor:
        t = self.t
        loss = t.forward_loss(t.images[self.idx], t.masks[self.idx], self.generator, cache=False)
        t.backward_update(loss)
        return loss.detach()

    def _capture(self) -> None:
        t = self.t
        graph = torch.cuda.CUDAGraph()
        t.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes the gradients anew
        try:
            graph.register_generator_state(self.generator)  # torch >= 2.5
            with torch.cuda.graph(graph):
                self.loss = self._body()
        except Exception as exc:  # nothing ran: the weights are as the last eager step left them
            self.failed = True
            self.notice = (
                f"the training step could not be captured as a CUDA graph ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); "
                "training goes on without one, more slowly"
            )
            return
        self.graph = graph


__all__ = ["WARMUP_STEPS", "GraphedStep", "conform_optimizer", "graph_reason", "plain_state_dict"]
