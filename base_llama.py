"""The base class every Llama model shares: its config, weight initialisation, device and dtype."""
import math

import torch
import torch.nn as nn

from config import LlamaConfig


class LlamaPreTrainedModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config

    def init_weights(self):
        """GPT-2 / llama2.c initialisation: N(0, 0.02) everywhere, except the two projections that
        write into the residual stream, scaled by 1/sqrt(2 * n_layers) so the stream's variance
        does not grow with depth. Norm gains start at one."""
        self.apply(self._init_module)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("compute_output.weight", "w2.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_module(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
