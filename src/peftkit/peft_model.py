"""``PeftModel`` and its task subclasses: a thin shell over the engine, with saving and loading.

Nothing here branches on the adapter method. Model-level verbs (``merge_and_unload``,
``set_adapter``, ...) live on the engine (``self._engine``: ``base_model``, or for prompt learning
the prompt engine kept beside the user's model) and are reached through it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .core.tuner import AdapterModel
from .io.serialization import read_adapter_weights, remap_keys, save_state_dict
from .mapping import get_peft_model_state_dict, set_peft_model_state_dict
from .types import PeftWarning, TaskType
from .utils import trainer_compat
from .utils.training import checkpointing_is_on, enable_input_require_grads, gradient_checkpointing_enable

_HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only")


class PeftModel(nn.Module):
    """A model with one or more adapters.

    Args:
        model: the base model (changed in place: its target layers are wrapped).
        peft_config: the first adapter's config.
        adapter_name: its name.
        low_cpu_mem_usage: create the adapter on the meta device, to be filled by loading.
    """

    # Modules that this task's head needs trained and saved (sequence classification: the head).
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self._add_task_modules(peft_config)
        engine = _engine_class(peft_config)(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        if engine.state_prefix == "base_model.":
            # prompt learning, laid out as PEFT's: base_model is the user's model, the prompt encoders and the
            # word embeddings are this module's own children, and the engine (not a child) is kept beside
            object.__setattr__(self, "_prompt_engine", engine)
            self.base_model = model
            self.prompt_encoder = engine.prompt_encoder
            self.word_embeddings = engine.word_embeddings
        else:
            self.base_model = engine
        if not autocast_adapter_dtype and hasattr(self._engine, "set_upcast_adapters"):
            self._engine.set_upcast_adapters(False)  # adapters in the base's dtype, as PEFT keeps them then
        self.training = model.training
        self.special_peft_forward_args = {"adapter_names"}
        self.prepare_model_for_gradient_checkpointing(model)  # checkpointing was on before wrapping
        trainer_compat.install()  # transformers.Trainer: adapter-only checkpoints (see utils/trainer_compat.py)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_engine"):
                raise
            return getattr(self._engine, name)

    def train(self, mode: bool = True) -> PeftModel:
        super().train(mode)
        engine = self.__dict__.get("_prompt_engine")
        if engine is not None:
            engine.training = mode  # its sub-modules are this module's own, already switched
        return self

    @property
    def _engine(self) -> AdapterModel:
        """The adapter engine every model-level verb goes to: ``base_model`` itself for weight-space
        methods (PEFT's ``LoraModel`` & co.); for prompt learning, where ``base_model`` is the user's
        model (as in PEFT), the prompt engine kept beside it."""
        engine = self.__dict__.get("_prompt_engine")
        return self._modules["base_model"] if engine is None else engine

    def _add_task_modules(self, config: PeftConfig) -> None:
        if not self.task_modules_to_save or not hasattr(config, "modules_to_save"):
            return
        current = list(config.modules_to_save or [])
        config.modules_to_save = current + [m for m in self.task_modules_to_save if m not in current]

    # ------------------------------------------------------------------ views
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._engine.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self._engine.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self._engine.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)

    @property
    def peft_type(self) -> str:
        return self.peft_config[self.active_adapters[0]].peft_type

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    def get_base_model(self) -> nn.Module:
        return self._engine.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each counted once."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
                n *= 2
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def get_layer_status(self) -> list:
        """Each adapter layer's state (``peftkit.get_layer_status``)."""
        from .utils.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """The adapters' state over the whole model (``peftkit.get_model_status``)."""
        from .utils.status import get_model_status

        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Checkpoint the base model's blocks; the inputs are made to require grad so adapters get gradients."""
        gradient_checkpointing_enable(self.get_base_model(), gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers 5's name for ``gradient_checkpointing_enable`` (what ``Trainer`` calls)."""
        gradient_checkpointing_enable(self.get_base_model(), activation_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def _call(self, **kwargs: Any) -> Any:
        """Forward named inputs, leaving out the ones not given (models differ in what they accept)."""
        extra = kwargs.pop("kwargs", {})
        return self._engine(**{k: v for k, v in kwargs.items() if v is not None}, **extra)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine.generate(*args, **kwargs)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (not made active: call ``set_adapter``)."""
        self._add_task_modules(peft_config)
        self._engine.inject_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self._engine.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._engine.delete_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for these adapters (active or not); not for prompt learning, as in PEFT."""
        if self.active_peft_config.is_prompt_learning:
            raise TypeError(
                f"set_requires_grad is not supported for prompt learning ({self.active_peft_config.peft_type}): "
                "its prompt encoders train while their adapter is active."
            )
        self._engine.set_requires_grad(adapter_names, requires_grad)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s input embeddings require grad when it checkpoints its blocks (so adapters inside
        checkpointed blocks get gradients); a quantized model is left to ``prepare_model_for_kbit_training``."""
        if checkpointing_is_on(model) and not getattr(model, "is_quantized", False):
            enable_input_require_grads(model)
        return model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model runs as the base model."""
        with self._engine.disable_adapter():
            yield

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool | None = None,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        save_embedding_layers: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        """Write each adapter: ``default`` at the root, any other in ``<dir>/<name>/``.

        Args:
            save_directory: the folder (created if needed).
            safe_serialization: safetensors (default) or the legacy ``adapter_model.bin``.
            selected_adapters: which adapters to write (default: all).
            is_main_process: whether this process writes the files. Default: rank 0 of an initialised
                ``torch.distributed`` group, else True. Every rank must call ``save_pretrained``
                when the adapter is sharded (FSDP2): its tensors are gathered first.
            save_embedding_layers: also save the base token embedding and output head (True/False,
                or "auto": when the adapter targets them or the vocabulary was resized).
            path_initial_model_for_weight_conversion: for adapters whose init changed the base
                weights (PiSSA, OLoRA): the folder where the untrained adapter was saved right
                after ``get_peft_model``. The adapter is then written as a plain adapter for the
                *original* base model (for LoRA: rank 2r), loadable anywhere, merged or not.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._engine._check_adapters(names)
        if is_main_process is None:
            is_main_process = _is_rank_zero()
        base = self.get_base_model()
        for name in names:
            folder = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            state = get_peft_model_state_dict(
                self, state_dict=kwargs.get("state_dict"), adapter_name=name, save_embedding_layers=save_embedding_layers
            )
            # companion files (X-LoRA's experts) are gathered on every rank too, and written on the main one
            self._engine.save_companions(folder, name, safe_serialization=safe_serialization, write=is_main_process)
            if not is_main_process:
                continue
            config = self.peft_config[name]
            if config.task_type is None and config.auto_mapping is None:
                config.auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
            if path_initial_model_for_weight_conversion is not None:
                config, state = _convert_initial(config, state, path_initial_model_for_weight_conversion)
            os.makedirs(folder, exist_ok=True)
            save_state_dict(state, folder, safe_serialization=safe_serialization)
            config.save_pretrained(folder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """Upload the adapters, as ``save_pretrained`` writes them, to the Hub model repo ``repo_id``
        (created if it does not exist). Returns the commit (its ``commit_url`` says where).

        ``max_shard_size`` and ``tags`` are accepted for PEFT's signature (adapter files are not
        sharded, and peftkit writes no model card); ``save_kwargs`` go to ``save_pretrained``.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            return api.upload_folder(
                repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message or "Upload adapter with peftkit",
                commit_description=commit_description, revision=revision, create_pr=create_pr,
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter (saved by peftkit or by PEFT) onto ``model``.

        Args:
            model: the base model.
            model_id: a folder written by ``save_pretrained``, or a Hub id.
            adapter_name: the name to give the adapter.
            is_trainable: keep the adapter trainable; by default it is frozen for inference.
            config: use this config instead of the folder's ``adapter_config.json``.
            **kwargs: ``subfolder``, Hub options (``revision``, ``token``, ``cache_dir``...) and
                ``key_mapping`` (regular expression -> replacement on the file's keys, as PEFT's).
        """
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        subfolder = kwargs.get("subfolder")
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
        config.inference_mode = not is_trainable
        config = _engine_class(config).loading_config(config, model_id, **kwargs)
        state = remap_keys(read_adapter_weights(model_id, subfolder, **hub), kwargs.get("key_mapping"))
        target_cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, cls) if cls is PeftModel else cls
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage=True)
        peft_model._fill(adapter_name, config, state, fresh=True)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load another adapter into this model under ``adapter_name`` (not made active).

        If the model already has an adapter of that name, its values are replaced by the file's.
        """
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        subfolder = kwargs.get("subfolder")
        if adapter_name in self.peft_config:
            # new values for an adapter this model has (Trainer resuming from a checkpoint): copied in
            # place, so an optimizer holding these parameters keeps working
            state = remap_keys(read_adapter_weights(model_id, subfolder, **hub), kwargs.get("key_mapping"))
            result = set_peft_model_state_dict(self, state, adapter_name)
            if not is_trainable:
                self.eval()
            return result
        config = kwargs.get("peft_config") or PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
        config.inference_mode = not is_trainable
        state = remap_keys(read_adapter_weights(model_id, subfolder, **hub), kwargs.get("key_mapping"))
        self._add_task_modules(config)
        self._engine.inject_adapter(adapter_name, config, low_cpu_mem_usage=True)
        result = self._fill(adapter_name, config, state, fresh=False)
        if not is_trainable:
            self.eval()
        return result

    def _fill(self, adapter_name: str, config: PeftConfig, state: dict[str, torch.Tensor], fresh: bool) -> Any:
        """Load tensors into an adapter just created on the meta device.

        If the file lacks some of the adapter's tensors, the adapter is rebuilt with real
        initial values first, so that no tensor is left on the meta device.
        """
        try:
            result = set_peft_model_state_dict(self, state, adapter_name=adapter_name)
            if result.missing_keys:
                warnings.warn(
                    f"The adapter file has no values for {len(result.missing_keys)} adapter tensors "
                    f"(e.g. {result.missing_keys[:3]}); they keep their initial values.",
                    PeftWarning,
                )
            tensors = itertools.chain(self._engine.parameters(), self._engine.buffers())
            if result.missing_keys and any(t.device.type == "meta" for t in tensors):
                self._engine.delete_adapter(adapter_name)
                self._engine.inject_adapter(adapter_name, config)
                if fresh:
                    self._engine.set_adapter(adapter_name)
                result = set_peft_model_state_dict(self, state, adapter_name=adapter_name)
        except Exception:
            # leave the model as it was: drop the half-built adapter (and, for a fresh model, every trace)
            if adapter_name in self.peft_config:
                self._engine.delete_adapter(adapter_name)
            if fresh and hasattr(self._engine.model, "peft_config"):
                del self._engine.model.peft_config
            raise
        if result.unexpected_keys:
            warnings.warn(
                f"Keys in the adapter file that fit nothing in the model: {result.unexpected_keys[:5]}",
                PeftWarning,
            )
        return result


def _engine_class(config: PeftConfig) -> type[AdapterModel]:
    from .registry import get_method

    return get_method(config.peft_type).engine or AdapterModel


def _convert_initial(config: PeftConfig, state: dict[str, torch.Tensor], path: str | os.PathLike) -> tuple:
    from .registry import get_method

    spec = get_method(config.peft_type)
    if spec.convert_initial is None:
        raise ValueError(f"{config.peft_type} adapters do not change the base weights: there is nothing to convert.")
    return spec.convert_initial(config, state, read_adapter_weights(path))


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class PeftModelForCausalLM(PeftModel):
    """A causal language model with adapters; ``generate`` works as on the base model."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._call(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            kwargs=kwargs,
        )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder language model (T5, BART) with adapters."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._call(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, kwargs=kwargs,
        )


class _ClassifierModel(PeftModel):
    """Shared forward of the classification-style wrappers (their heads train in full)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._call(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            kwargs=kwargs,
        )


class PeftModelForSequenceClassification(_ClassifierModel):
    """Sequence classification: the ``classifier`` / ``score`` head is added to ``modules_to_save``."""

    task_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(_ClassifierModel):
    """Token classification: the ``classifier`` / ``score`` head is added to ``modules_to_save``."""

    task_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering: the ``qa_outputs`` head is added to ``modules_to_save``."""

    task_modules_to_save = ("qa_outputs",)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._call(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, start_positions=start_positions,
            end_positions=end_positions, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, kwargs=kwargs,
        )


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder used for its hidden states (embeddings)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._call(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            kwargs=kwargs,
        )


MODEL_TYPE_TO_PEFT_MODEL: dict[str | None, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
