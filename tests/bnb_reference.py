"""bitsandbytes Linear4bit layers built from a weight or a state dict, the NF4 tests' reference."""

import bitsandbytes as bnb
import torch


def bnb_linear4bit_state_dict(w: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    layer = bnb.nn.Linear4bit(
        w.shape[1], w.shape[0], bias=False, compute_dtype=w.dtype,
        compress_statistics=double_quant, quant_type="nf4",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )
    layer.weight._quantize("cpu")
    return layer.state_dict()


def bnb_linear4bit_from_state_dict(sd: dict[str, torch.Tensor], w_shape: torch.Size):
    layer = bnb.nn.Linear4bit(w_shape[1], w_shape[0], bias=False, quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], stats, device="cpu", module=layer
    )
    return layer
