"""Quantized weights for a frozen base model: 4-bit NormalFloat (QLoRA) and per-row int8.

Block-wise quantization. A tensor is flattened and cut into blocks of B consecutive values (the last block
padded with zeros). Each block is divided by its absolute maximum, which maps it into [-1, 1], and every
value is replaced by the index of the nearest of a few fixed levels, the code book:

    absmax_b = max |x_i| over block b
    code_i   = argmin_k | x_i / absmax_b - levels[k] |      nearest level (a tie goes to the lower one)
    x_i     ~= levels[code_i] * absmax_b                    dequantization

An outlier only coarsens its own block, which is why the blocks are small: 64 values for weights, 256 for
the optimizer states of optimizer.AdamW8bit, which uses the same two functions.

NF4, NormalFloat 4-bit (Dettmers et al. 2023, QLoRA, https://arxiv.org/abs/2305.14314). Trained weights
are close to normally distributed, so after the absmax scaling the best 16 levels are those that split
N(0, 1)'s probability mass evenly: quantiles of N(0, 1), normalised to [-1, 1]. QLoRA takes 8 positive
ones at probabilities linspace(p, 1/2, 9)[:-1] and 7 negative ones at linspace(p, 1/2, 8)[:-1] (with
p = 0.9677083 for the outermost instead of 1, whose quantile is infinite), plus an exact 0: 16 levels,
two 4-bit codes per byte (the first value in the high nibble). Weights then cost 4 bits plus a float32
absmax per 64 values (0.5 bit): 4.5 bits per parameter.

Double quantization (QLoRA, section 3): the absmax values themselves are quantized, 8-bit in blocks of
256 with the dynamic map below, after subtracting their mean (they are all positive; centred, they use
the signed map's whole range): 8/64 + 32/(64*256) bits per parameter instead of 32/64, 4.127 in all.

The dynamic map (Dettmers 2016, https://arxiv.org/abs/1511.04561; the 8-bit optimizers paper,
https://arxiv.org/abs/2110.02861): 256 levels spread over magnitudes from 1e-7 to 1, like a float with a
decimal exponent. At exponent e = 0..6, 2^e levels (2^(e+1) for the unsigned map, which needs no sign)
sit at the midpoints of an even grid of [0.1, 1], times 10^(e-6); the signed map has them with both
signs; 0 and 1 complete the 256. Small values keep a precision relative to their size, which suits
Adam's moments, whose magnitudes vary over orders of magnitude within a block.

int8: per output row, scale_r = max_j |W_rj| / 127 and W_rj ~= scale_r * round(W_rj / scale_r), as the
"vector-wise" quantization of LLM.int8() (Dettmers et al. 2022) without its outlier handling. 8 bits plus
a float32 per row.

The modules: NF4Linear and Int8Linear replace a frozen nn.Linear (quantize_model does it for a whole model)
and rebuild the full-precision weight, in the input's dtype, each time it is used: in forward, and again in
backward, where only the input gets a gradient. LoRA (lora.inject_lora) wraps them as it wraps nn.Linear:
QLoRA. dequantize_model turns a model back into plain nn.Linear layers, for the exporters.
"""
import functools
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# QLoRA's NF4 levels, as published (tests/test_quantize.py rebuilds them from N(0, 1)'s quantiles).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
NF4_ZERO = 7  # the code of 0.0: what pads an odd number of codes to whole bytes


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted levels of the 8-bit dynamic map (module docstring), float32."""
    levels = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2 ** (e + (not signed)) + 1)  # float32, as the reference computes it
        magnitudes = (grid[:-1] + grid[1:]) / 2 * 10.0 ** (e - 6)
        levels += [magnitudes, -magnitudes] if signed else [magnitudes]
    return torch.cat(levels).sort().values


CODE_BOOKS = {"nf4": NF4_LEVELS, "dynamic": dynamic_map(signed=True), "udynamic": dynamic_map(signed=False)}


@functools.lru_cache(maxsize=None)
def _levels(code_book: str, device: torch.device) -> torch.Tensor:
    """CODE_BOOKS[code_book] on a device, copied there once."""
    return CODE_BOOKS[code_book].to(device)


def quantize_blockwise(x: torch.Tensor, code_book: str, block_size: int) -> tuple:
    """(codes, absmax): x flattened, one uint8 code per value (the index of the nearest level of
    CODE_BOOKS[code_book] after dividing by its block's absmax), and the float32 absmax of each block."""
    flat = x.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    levels = _levels(code_book, x.device)
    midpoints = (levels[:-1] + levels[1:]) / 2  # nearest level = how many midpoints lie below the value
    codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return codes.view(-1)[: flat.numel()], absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code_book: str, block_size: int) -> torch.Tensor:
    """The float32 values (flat) that quantize_blockwise's codes and absmax stand for."""
    n = codes.numel()
    values = _levels(code_book, codes.device)[codes.reshape(-1).long()]
    values = F.pad(values, (0, -n % block_size)).view(-1, block_size) * absmax.float().unsqueeze(1)
    return values.view(-1)[:n]


# ----------------------------------------------------------------------------------------------
# NF4


def nf4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> tuple:
    """(packed, absmax): two 4-bit NF4 codes per byte (uint8, ceil(numel / 2) of them; the first code in
    the high nibble) and the float32 absmax of each block of block_size values. With double_quant,
    absmax is the triple (codes, scales, offset) of quantize_absmax instead."""
    codes, absmax = quantize_blockwise(w, "nf4", block_size)
    codes = F.pad(codes, (0, codes.numel() % 2), value=NF4_ZERO)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, (quantize_absmax(absmax) if double_quant else absmax)


def nf4_dequantize(packed: torch.Tensor, absmax, shape, block_size: int = 64, dtype=torch.float32) -> torch.Tensor:
    """The tensor of `shape` and `dtype` that nf4_quantize's packed codes and absmax (a tensor, or the
    double-quantized triple) stand for."""
    if isinstance(absmax, (tuple, list)):
        absmax = dequantize_absmax(*absmax)
    n = math.prod(shape)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]
    return dequantize_blockwise(codes, absmax, "nf4", block_size).view(shape).to(dtype)


def quantize_absmax(absmax: torch.Tensor, block_size: int = 256) -> tuple:
    """Double quantization: (codes uint8, scales float32 per block of 256, offset float32 scalar) with
    absmax ~= dynamic_map[codes] * scales + offset, offset the mean absmax."""
    offset = absmax.mean()
    codes, scales = quantize_blockwise(absmax - offset, "dynamic", block_size)
    return codes, scales, offset


def dequantize_absmax(codes, scales, offset, block_size: int = 256) -> torch.Tensor:
    return dequantize_blockwise(codes, scales, "dynamic", block_size) + offset


# ----------------------------------------------------------------------------------------------
# int8


def int8_quantize(w: torch.Tensor) -> tuple:
    """(codes int8 of w's shape, scale float32 per row): w ~= codes * scale[:, None]."""
    absmax = w.detach().float().abs().amax(dim=1)
    codes = torch.round(w.detach().float() * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).to(torch.int8)
    return codes, absmax / 127.0


def int8_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float().unsqueeze(1)).to(dtype)


# ----------------------------------------------------------------------------------------------
# the layers


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T with W = layer.dequantize(x.dtype), rebuilt in forward and again in backward (grad_x =
    grad_y W) rather than kept in between: kept for every layer until the backward pass, the
    full-precision weights would cost the very memory the quantization saves. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        return (grad_y @ ctx.layer.dequantize(grad_y.dtype)).to(ctx.x_dtype), None


class QuantizedLinear(nn.Module):
    """What NF4Linear and Int8Linear share: a frozen y = x W^T (+ bias) whose W is held quantized (in
    buffers: nothing here trains) and rebuilt by dequantize() when used. `dtype` is the dtype of the
    weight it replaced, which merging and exporting give back. Quantize once the model has its dtype:
    model.to(dtype) afterwards would cast the float32 statistics too."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The full-precision (out_features, in_features) weight, in dtype (default: self.dtype)."""
        raise NotImplementedError

    def forward(self, x):
        y = _DequantizedLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self, weight=None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight, or `weight` if given (and the bias)."""
        weight = self.dequantize() if weight is None else weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(QuantizedLinear):
    """A frozen linear layer with NF4 weights (block_size values per absmax, double-quantized absmax by
    default): buffers weight_nf4 (the packed codes) and absmax, or absmax_codes / absmax_scales /
    absmax_offset with double quantization."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True, block_size: int = 64):
        super().__init__(linear)
        self.double_quant, self.block_size = double_quant, block_size
        packed, absmax = nf4_quantize(linear.weight, block_size, double_quant)
        self.register_buffer("weight_nf4", packed)
        if double_quant:
            for name, value in zip(("absmax_codes", "absmax_scales", "absmax_offset"), absmax):
                self.register_buffer(name, value)
        else:
            self.register_buffer("absmax", absmax)

    def dequantize(self, dtype=None) -> torch.Tensor:
        absmax = (self.absmax_codes, self.absmax_scales, self.absmax_offset) if self.double_quant else self.absmax
        return nf4_dequantize(self.weight_nf4, absmax, (self.out_features, self.in_features), self.block_size,
                              dtype or self.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.double_quant}"


class Int8Linear(QuantizedLinear):
    """A frozen linear layer with per-row absmax int8 weights: buffers weight_int8 (out, in) and
    weight_scale (out,).

    In inference mode (decoding.decode) on the CPU, a float32 input goes through PyTorch's fbgemm int8
    GEMM instead, where this build has it: the input is quantized too, per call, to 8 bits (7 used, to
    stay clear of overflow in AVX2's multiply-add), and the products are summed in int32, several times
    faster than dequantizing (bench/quant.py). Its outputs differ from the dequantized weight's by that
    input quantization (tests/test_quantize.py bounds it); fbgemm=False always dequantizes. Training and
    validation losses (grad mode, torch.no_grad), and torch.compile'd decoding, use the dequantized weight."""

    def __init__(self, linear: nn.Linear, fbgemm: bool = True):
        super().__init__(linear)
        self.fbgemm = fbgemm
        codes, scale = int8_quantize(linear.weight)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_scale", scale)
        self._fbgemm = (None, None)  # (the buffers' identity and version it was packed from, packed weight)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return int8_dequantize(self.weight_int8, self.weight_scale, dtype or self.dtype)

    def forward(self, x):
        if (self.fbgemm and not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
                and x.device.type == "cpu" and x.dtype == torch.float32):
            packed = self.fbgemm_weight()
            if packed is not None:
                return torch.ops.quantized.linear_dynamic(x, packed, True)
        return super().forward(x)

    def fbgemm_weight(self):
        """The weight packed for fbgemm (None where PyTorch has no such kernel), packed on first use and
        again whenever the buffers change (load_state_dict, .to())."""
        key = (self.weight_int8.data_ptr(), self.weight_int8._version, self.weight_scale._version)
        if self._fbgemm[0] != key:
            try:
                with warnings.catch_warnings():  # PyTorch's quantized tensors are deprecated, not gone
                    warnings.simplefilter("ignore")
                    zero_points = torch.zeros(self.out_features, dtype=torch.long)
                    weight = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(),
                                                                      zero_points, 0)
                    bias = None if self.bias is None else self.bias.float()
                    self._fbgemm = (key, torch.ops.quantized.linear_prepack(weight, bias))
            except (RuntimeError, AttributeError, NotImplementedError):
                self._fbgemm = (key, None)
        return self._fbgemm[1]


QUANTIZED = {"nf4": NF4Linear, "int8": Int8Linear}
KINDS = ("none", *QUANTIZED)  # what --quantize accepts


# ----------------------------------------------------------------------------------------------
# whole models


def _name_matches(name: str, names) -> bool:
    """'layers.0.attention.compute_query' matches 'compute_query' or its full name."""
    return name in names or name.rpartition(".")[2] in names


def quantize_model(model: nn.Module, kind: str, skip=("output",), **options) -> list:
    """Replace, in place, every nn.Linear of the model (those inside lora.LoRALayers included) by its
    quantized version, except those named in `skip` (attribute names such as 'output', the output
    projection, left in full precision unless skip=() asks for it, or full dotted names). Embeddings
    are not linear layers and stay as they are. `options` go to the layer (NF4Linear: double_quant,
    block_size). kind "none" does nothing. Returns the replaced modules' names."""
    if kind == "none":
        return []
    if kind not in QUANTIZED:
        raise ValueError(f"unknown quantization {kind!r}; expected one of {KINDS}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [name for name, m in model.named_modules()
             if name and isinstance(m, nn.Linear) and not _name_matches(name, skip)]  # name "": the model itself
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, QUANTIZED[kind](getattr(parent, attr), **options))
    return names


def quantized_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every quantized layer by a plain nn.Linear with its dequantized weight (frozen,
    as the quantized base was), e.g. before exporting; returns the model. A LoRA model's adapters stay:
    lora.unload_lora folds them in, into the dequantized weights (merging dequantizes)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                    module.to_linear().requires_grad_(False))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: its state dict's tensors (quantized codes and statistics included, not
    caches such as the RoPE tables), tied ones once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
