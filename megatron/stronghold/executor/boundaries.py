"""The streamed layers' boundaries between forward and backward: each layer's input for every
micro-batch of the step (s x b x h), which backward runs the layer again from.

They stay on the GPU when the plan finds room, or wait in pinned host memory: a layer's inputs are
copied out while the layer runs on them (the GPU copy is freed once both are done), and backward
copies layer l - 1's back in while layer l runs. The host buffers are allocated once and reused
every step; each copy waits for the one before it that used the same buffer.

Without CUDA the same copies run between host tensors, as the executor's weights do.
"""

import torch


class Boundaries:
    def __init__(self, num_layers: int, spill: bool, device: torch.device, h2d=None, d2h=None, link=None):
        self.num_layers, self.spill, self.device = num_layers, spill, device
        self.cuda = device.type == "cuda"
        self.h2d, self.d2h = h2d, d2h
        self.link = link if link is not None else {"host-to-device": 0, "device-to-host": 0}
        self.kept = [[] for _ in range(num_layers)]  # on the device: kept or copied back
        self.host = [[] for _ in range(num_layers)]  # pinned buffers, reused every step
        self.copied_out = [None] * num_layers  # event: layer l's inputs are on the host
        self.copied_in = [None] * num_layers  # event: layer l's inputs are back on the device

    def put(self, layer: int, inputs: list) -> None:
        """Keep layer `layer`'s inputs (one per micro-batch) until backward takes them."""
        if not self.spill:
            self.kept[layer] = list(inputs)
            return
        buffers = self._buffers(layer, inputs)
        if self.cuda:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # the inputs are computed
            if self.copied_in[layer] is not None:
                self.d2h.wait_event(self.copied_in[layer])  # the last step's copy back has read the buffers
            with torch.cuda.stream(self.d2h):
                for buffer, x in zip(buffers, inputs):
                    buffer.copy_(x, non_blocking=True)
                    x.record_stream(self.d2h)  # freed once the copy is done too
                self.copied_out[layer] = self.d2h.record_event()
        else:
            for buffer, x in zip(buffers, inputs):
                buffer.copy_(x)
        self.link["device-to-host"] += sum(x.numel() * x.element_size() for x in inputs)
        self.kept[layer] = []

    def prefetch(self, layer: int) -> None:
        """Start bringing layer `layer`'s inputs back (nothing to do when they stayed)."""
        if not self.spill or self.kept[layer] or layer < 0:
            return
        buffers = self.host[layer]
        if self.cuda:
            self.h2d.wait_event(self.copied_out[layer])
            with torch.cuda.stream(self.h2d):
                self.kept[layer] = [b.to(self.device, non_blocking=True) for b in buffers]
                self.copied_in[layer] = self.h2d.record_event()
        else:
            self.kept[layer] = [b.clone() for b in buffers]
        self.link["host-to-device"] += sum(b.numel() * b.element_size() for b in buffers)

    def take(self, layer: int, microbatch: int) -> torch.Tensor:
        """Layer `layer`'s input of one micro-batch, on the device; backward's last use of it."""
        self.prefetch(layer)
        x, self.kept[layer][microbatch] = self.kept[layer][microbatch], None
        if self.spill and self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.copied_in[layer])
            x.record_stream(current)  # allocated on the copy stream, used and freed on this one
        if microbatch == len(self.kept[layer]) - 1:
            self.kept[layer] = []
        return x

    def _buffers(self, layer: int, inputs: list) -> list:
        if len(self.host[layer]) != len(inputs) or any(b.shape != x.shape or b.dtype != x.dtype
                                                       for b, x in zip(self.host[layer], inputs)):
            self.host[layer] = [torch.empty(x.shape, dtype=x.dtype, pin_memory=self.cuda) for x in inputs]
        return self.host[layer]

    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.host for b in layer)
