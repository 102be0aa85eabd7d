"""Where each transformer layer lives, decided before anything large is allocated.

The planner counts the bytes every placement needs, compares them with the free GPU memory and the
available host memory, keeps as many layers resident on the GPU as fit and streams the rest from
host memory; a model that fits nowhere is refused with the numbers.

- costs.py: what a placement costs, in GPU and host bytes and in seconds of compute, copies and
  CPU steps (ModelCosts, from the flags and layer_shape.py);
- plan.py: stronghold's placement, the Plan (resident layers, window, what the streamed layers
  keep, CPU optimizer threads, the predicted iteration) and make_plan, which picks it;
- preflight.py: every method's pre-flight check (check), its refusal (DoesNotFit) and the most
  layers it admits (layers_that_fit).
"""

from .costs import GiB, ModelCosts, host_bytes
from .plan import DoesNotFit, Plan, make_plan
from .preflight import available_memory, check, layers_that_fit, megatron_check, zero_check

__all__ = ["GiB", "ModelCosts", "host_bytes", "Plan", "DoesNotFit", "make_plan", "check", "megatron_check",
           "zero_check", "available_memory", "layers_that_fit"]
