"""diloco.Muon: the library's Muon (C++ diloco::muon_update) as a torch.optim.Optimizer."""

import torch

from . import _C


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): momentum SGD with its update orthogonalized by a Newton-Schulz
    iteration; the inner optimizer of MuLoCo (arXiv 2505.23725). For matrices only: give biases,
    norms, embeddings and the output head to AdamW (two optimizers, both stepped every inner
    step). The update is the C++ library's (diloco::muon_update, documented in
    libdiloco/include/diloco/optim/muon.h); this class keeps param_groups and state so that
    learning-rate schedulers and state_dict() work as with any torch.optim optimizer.

    Args:
        params: the matrices (2 or more dimensions) to optimize, or param groups.
        lr: learning rate (> 0).
        momentum: in [0, 1).
        nesterov: Nesterov momentum.
        weight_decay: decoupled weight decay (>= 0).
        ns_steps: Newton-Schulz iterations (1..100).
        scale: "spectral" (sqrt(max(1, m/n)), Jordan et al.) or "match_adamw"
            (0.2 sqrt(max(m, n)): the update's RMS matches AdamW's, so its lr carries over).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                 ns_steps=5, scale="spectral"):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, scale=scale)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise _C.OptionError(
                        "[Muon] a parameter of shape %s has fewer than 2 dimensions; Muon takes "
                        "matrices: give biases, norms (and usually embeddings and the output "
                        "head) to AdamW" % (tuple(p.shape),))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                _C.muon_update(p, p.grad, state["momentum_buffer"], float(group["lr"]),
                               float(group["momentum"]), bool(group["nesterov"]),
                               float(group["weight_decay"]), int(group["ns_steps"]),
                               str(group["scale"]))
        return loss
