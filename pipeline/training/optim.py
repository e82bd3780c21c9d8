"""Nesterov SGD whose hyperparameters live on the device, so that a captured step follows the schedules."""

from __future__ import annotations

import torch

HYPERPARAMETERS = ("lr", "momentum")


def capturing() -> bool:
    """Whether this thread's CUDA stream is being captured into a graph (never, without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class NesterovSGD(torch.optim.Optimizer):
    """torch.optim.SGD(nesterov=True), without weight decay or dampening (the seed has neither): the
    same update, in the same state_dict layout.

    torch's SGD reads lr and momentum as Python numbers, so a CUDA graph that captured its step
    would replay the values of the capture forever. Here the step reads them from tensors on the
    parameters' device; the param groups still hold plain numbers (what the schedules set, the
    history reads and the checkpoint saves), copied into those tensors by `sync` when they change,
    which `step` does itself unless it is being captured. The momentum buffers exist from the
    start and keep their memory when a state is loaded, so a captured step stays valid.
    """

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self._values: list[dict[str, torch.Tensor]] = []
        self._synced: list[dict[str, float]] = []
        for group in self.param_groups:
            device = group["params"][0].device
            self._values.append({name: torch.zeros((), device=device) for name in HYPERPARAMETERS})
            self._synced.append({})
            for parameter in group["params"]:
                self.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
        self.sync()

    def sync(self) -> None:
        """Copy the param groups' numbers that changed into the device tensors the step reads.

        Compared on the host, so an unchanged value costs no kernel; a fill is queued, never waited for.
        """
        for group, values, synced in zip(self.param_groups, self._values, self._synced):
            for name in HYPERPARAMETERS:
                if synced.get(name) != group[name]:
                    values[name].fill_(group[name])
                    synced[name] = group[name]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("NesterovSGD takes no closure")
        if not capturing():
            self.sync()
        for group, values in zip(self.param_groups, self._values):
            params = [parameter for parameter in group["params"] if parameter.grad is not None]
            if not params:
                continue
            grads = [parameter.grad for parameter in params]
            buffers = [self.state[parameter]["momentum_buffer"] for parameter in params]
            momentum, lr = [values["momentum"]] * len(params), [values["lr"]] * len(params)
            # torch's SGD, pass for pass: b = momentum * b + g; p -= lr * (g + momentum * b). The
            # multiply-adds by a device scalar are the fused kernels torch runs with a number.
            torch._foreach_mul_(buffers, values["momentum"])
            torch._foreach_add_(buffers, grads)
            update = torch._foreach_addcmul(grads, buffers, momentum)
            torch._foreach_addcmul_(params, update, lr, value=-1)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the existing momentum buffers, whose memory a captured step writes."""
        buffers = {parameter: self.state[parameter]["momentum_buffer"]
                   for group in self.param_groups for parameter in group["params"]}
        super().load_state_dict(state_dict)
        for parameter, buffer in buffers.items():
            loaded = self.state[parameter].get("momentum_buffer")
            if loaded is not None:
                buffer.copy_(loaded)
            else:
                buffer.zero_()
            self.state[parameter]["momentum_buffer"] = buffer
        self.sync()
