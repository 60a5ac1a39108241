"""Test-side shim: lets accelerate attach FSDP on CPU processes.

accelerate turns `distributed_type: FSDP` into FSDP only on accelerator devices (its FSDP branch sits
under the multi-GPU types); on CPU the same launch becomes DDP over gloo. After accelerate has set
up its CPU state, this switches that state to FSDP with the plugin built from the launcher's
environment, exactly as accelerate does on GPUs. From there on everything is accelerate's and
transformers' own FSDP code: `fully_shard` per wrap class, mixed precision policy, state-dict
gathering at save, sharded checkpoints and their loading on resume. torch's FSDP2 runs over gloo.
"""

import os

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def install():
    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None
        if asked and self.distributed_type == DistributedType.MULTI_CPU:
            plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
