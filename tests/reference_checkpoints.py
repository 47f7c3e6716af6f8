"""Reference-code PoLAR checkpoints built the way that code builds them, for format tests.

The reference code adds, per adapted linear layer, ``lora_A`` / ``lora_B`` / ``lora_S`` ``nn.ModuleDict``s of
``nn.Linear`` layers (``lora_S`` an ``nn.Linear(r, r)``) and registers a torch parametrisation on ``lora_S``'s
weight chosen by ``parameterize_S``; its forward is ``B(S(A x)) · lora_alpha / r``. Its adapter_config.json is a
LoraConfig (peft_type LORA) plus ``adapter_name`` and ``parameterize_S``. Here the layers are real torch layers with
real ``torch.nn.utils.parametrize`` parametrisations, the tensors are the layers' own ``state_dict()`` (so the S key
is ``lora_S.<adapter>.parametrizations.weight.original``) and the expected ΔW is read off the layers' forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from torch.nn.utils import parametrize


class FreeS(nn.Module):  # parameterize_S = "identity": S moves freely
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class DiagonalS(nn.Module):  # "diagonal": only the diagonal of the stored matrix acts
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.diag_embed(torch.diagonal(weight))


class RemovedS(nn.Module):  # "removal": S is the identity whatever is stored
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)


PARAMETRISATIONS = {"identity": FreeS, "diagonal": DiagonalS, "removal": RemovedS}


class ReferenceAdapter(nn.Module):
    """The adapter part of one reference-code layer."""

    def __init__(self, in_features: int, out_features: int, r: int, adapter: str, parameterize_s: str) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, out_features, bias=False)})
        self.lora_S = nn.ModuleDict({adapter: nn.Linear(r, r, bias=False)})
        parametrize.register_parametrization(self.lora_S[adapter], "weight", PARAMETRISATIONS[parameterize_s]())
        self.adapter = adapter

    def delta(self, scaling: float) -> torch.Tensor:
        """ΔW (out × in) by the reference forward B(S(A x)) · scaling on the rows of the identity."""
        a, b, s = (getattr(self, n)[self.adapter] for n in ("lora_A", "lora_B", "lora_S"))
        with torch.no_grad():
            eye = torch.eye(a.in_features, dtype=torch.float64)
            return (b.double()(s.double()(a.double()(eye))) * scaling).T.float()


def write_reference_checkpoint(directory: Path, model: nn.Module, targets: tuple[str, ...], *, parameterize_s: str,
                               r: int = 4, alpha: float = 16, adapter: str = "polar", keep_adapter_name: bool = True,
                               record_parameterize_s: bool = True, fmt: str = "safetensors",
                               seed: int = 7) -> dict[str, torch.Tensor]:
    """Write a reference-layout adapter for ``model``'s linear layers named ``targets``; returns the expected ΔW
    per module path (without PEFT's ``base_model.model.`` prefix).

    Every stored tensor is random (the stored S too, also for "diagonal" / "removal", where the reference would
    leave the ignored entries at zero), so a reader that ignores the parametrisation gets a different ΔW.
    ``keep_adapter_name=False`` writes the keys as PEFT's save_pretrained does (``.<adapter>`` removed).
    """
    torch.manual_seed(seed)
    state, expected = {}, {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and name.endswith(targets)):
            continue
        holder = ReferenceAdapter(module.in_features, module.out_features, r, adapter, parameterize_s)
        with torch.no_grad():
            nn.init.orthogonal_(holder.lora_A[adapter].weight)
            nn.init.orthogonal_(holder.lora_B[adapter].weight)
            holder.lora_S[adapter].parametrizations.weight.original.copy_(torch.randn(r, r))
        for key, tensor in holder.state_dict().items():
            if not keep_adapter_name:
                key = key.replace(f".{adapter}.", ".")
            state[f"base_model.model.{name}.{key}"] = tensor.detach().clone().contiguous()
        expected[name] = holder.delta(alpha / r)
    directory.mkdir(parents=True)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.05,
                        task_type="CAUSAL_LM").to_dict()
    config = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    config["peft_type"], config["adapter_name"] = "LORA", adapter
    if record_parameterize_s:
        config["parameterize_S"] = parameterize_s
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(directory / "adapter_model.safetensors"))
    else:
        torch.save(state, directory / "adapter_model.bin")
    return expected
