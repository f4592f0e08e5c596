"""In-memory parameter names <-> checkpoint keys.

In memory an adapter's tensors sit under its name (``q_proj.lora_A.default.weight``,
``head.modules_to_save.default.weight``); in a file the name is gone
(``base_model.model.q_proj.lora_A.weight``, ``base_model.model.head.weight``). The map is
built from the model's structure, so saving and loading read the same table both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.layer import AdapterLayer, BufferDict
from ..core.tuner import AdapterModel, top_level_modules
from ..core.wrappers import ModulesToSaveWrapper

PREFIX = "base_model.model."


@dataclass
class Slot:
    """Where one checkpoint tensor lives in the model.

    Attributes:
        owner: the module (or ParameterDict) holding it.
        leaf: its attribute name (or ParameterDict key) on ``owner``.
        mem_key: its key in the PeftModel's own ``state_dict()``.
        layer: the adapter layer it belongs to (None for modules_to_save and biases).
    """

    owner: nn.Module
    leaf: str
    mem_key: str
    layer: AdapterLayer | None = None
    file_sized: bool = False  # the file decides its size (SHiRA's entry count)

    def get(self) -> torch.Tensor:
        if isinstance(self.owner, (nn.ParameterDict, BufferDict)):
            return self.owner[self.leaf]
        return getattr(self.owner, self.leaf)

    def set(self, value: torch.Tensor) -> None:
        """Put a tensor in place: copy into a real one of the same shape, or replace a meta one.

        Integer tensors (positions) keep their own dtype, whatever dtype the file used.
        """
        old = self.get()
        with torch.no_grad():
            if old.device.type != "meta" and old.shape == value.shape:
                old.copy_(_like(old, value))
                return
            if not old.is_floating_point():
                dtype = old.dtype
            elif self.layer is not None:
                dtype = self.layer.adapter_dtype()
            else:
                dtype = old.dtype
            device = self.layer.anchor.device if self.layer is not None else old.device
            value = value.to(device=device, dtype=dtype)
            new = value if isinstance(self.owner, BufferDict) else nn.Parameter(value, requires_grad=old.requires_grad)
        if isinstance(self.owner, (nn.ParameterDict, BufferDict)):
            self.owner[self.leaf] = new
        else:
            setattr(self.owner, self.leaf, new)


def _like(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as ``old``: a sharded parameter (FSDP2's DTensor) gets this rank's shard."""
    if not (hasattr(old, "device_mesh") and hasattr(old, "placements")):
        return value
    from torch.distributed.tensor import distribute_tensor

    local = old.to_local()
    return distribute_tensor(value.to(device=local.device, dtype=local.dtype), old.device_mesh, old.placements)


class PromptSlot(Slot):
    """The ``prompt_embeddings`` of a prompt-learning adapter: its encoder's output.

    Reading runs the encoder; writing replaces the encoder by a table of the given values
    (a file holds no encoder).
    """

    def get(self) -> torch.Tensor:
        return self.owner.prompt_encoder[self.leaf]()

    def set(self, value: torch.Tensor) -> None:
        from ..prompt.encoders import PromptTable

        engine = self.owner
        weight = engine.word_embeddings.weight
        dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
        engine.prompt_encoder[self.leaf] = PromptTable(value.detach().to(device=weight.device, dtype=dtype).clone())
        engine._sync_trainable()


def adapter_key_map(tuner: AdapterModel, adapter: str) -> dict[str, Slot]:
    """Checkpoint key -> ``Slot`` for every tensor of one adapter."""
    out: dict[str, Slot] = dict(tuner.own_slots(adapter))
    file_prefix = PREFIX
    state = tuner.state_prefix  # the user's model's place in the PeftModel's state_dict
    if hasattr(tuner, "prompt_encoder"):  # prompt learning: PEFT's file has no ".model" level
        file_prefix = "base_model."
        out["prompt_embeddings"] = PromptSlot(tuner, adapter, f"prompt_encoder.{adapter}.embedding.weight")
    for path, module in top_level_modules(tuner.model):
        base = path + "." if path else ""
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_attrs + module.buffer_attrs:
                container = getattr(module, attr)
                if adapter not in container:
                    continue
                entry = container[adapter]
                mem = f"{state}{base}{attr}.{adapter}"
                if isinstance(entry, torch.Tensor):
                    sized = attr in module.file_sized_attrs
                    out[PREFIX + base + module.checkpoint_name(attr)] = Slot(container, adapter, mem, module, sized)
                else:
                    for sub, owner, leaf in _tensors(entry):
                        ckpt = PREFIX + base + module.checkpoint_name(attr, sub)
                        out[ckpt] = Slot(owner, leaf, f"{mem}.{sub}", module)
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for sub, owner, leaf in _tensors(module.modules_to_save[adapter]):
                out[file_prefix + base + sub] = Slot(owner, leaf, f"{state}{base}modules_to_save.{adapter}.{sub}")
    for key, slot in _bias_slots(tuner, adapter).items():
        out.setdefault(key, slot)  # a trained modules_to_save copy wins over the original's bias
    return out


def _bias_slots(tuner: AdapterModel, adapter: str) -> dict[str, Slot]:
    """Biases saved with the adapter under ``bias="all"`` or ``"<prefix>only"``."""
    bias = getattr(tuner.peft_config.get(adapter), "bias", "none")
    if bias == "none":
        return {}
    layers = [m for _, m in tuner.adapter_layers()]
    layer_bases = {id(m.base_layer) for m in layers}
    adapter_params = {id(p) for m in layers for a in m.adapters for p in m.adapter_parameters(a)}
    out = {}
    for path, module in tuner.model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue  # their ``bias`` is a view of the wrapped module's; that one is visited itself
        param = module._parameters.get("bias")
        if param is None or id(param) in adapter_params:
            continue
        if "modules_to_save." in path or path.endswith("original_module") or ".original_module." in path:
            continue
        if bias == "all" or id(module) in layer_bases:
            out[f"{PREFIX}{path}.bias"] = Slot(module, "bias", f"{tuner.state_prefix}{path}.bias")
    return out


def _tensors(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(dotted name, owner module, attribute) for each parameter and persistent buffer."""
    found = []
    for mod_name, mod in module.named_modules():
        prefix = mod_name + "." if mod_name else ""
        for name, _ in mod.named_parameters(recurse=False):
            found.append((prefix + name, mod, name))
        for name, _ in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                found.append((prefix + name, mod, name))
    return found


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_is_targeted(tuner: AdapterModel, config) -> bool:
    """True when the config adapts the model's token embedding or output head (by PEFT's rule)."""
    import re

    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    if isinstance(targets, str):
        names = [n for n, _ in tuner.model.named_modules() if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES)]
        return any(re.fullmatch(targets, n) for n in names)
    return any(name in targets for name in EMBEDDING_LAYER_NAMES)


def embedding_slots(tuner: AdapterModel, targeted: bool) -> dict[str, Slot]:
    """The base tensors of the input and output embeddings, as PEFT saves them.

    Targeted embeddings are saved from inside their adapter layer (``...embed_tokens.base_layer.weight``);
    untargeted ones (a resized vocabulary) under their own path (``...embed_tokens.weight``).
    """
    model = tuner.model
    if not hasattr(model, "get_input_embeddings"):
        return {}
    wanted = []
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        if isinstance(layer, AdapterLayer):
            wanted.append(layer.base_layer)
        elif not targeted:
            wanted.append(layer)
    out: dict[str, Slot] = {}
    for path, module in model.named_modules():
        if any(module is w for w in wanted):
            for sub, owner, leaf in _tensors(module):
                out[f"{PREFIX}{path}.{sub}"] = Slot(owner, leaf, f"{tuner.state_prefix}{path}.{sub}")
    return out
