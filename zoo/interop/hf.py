"""Any zoo CausalLM as a Hugging Face transformers model (needs the `hf` extra).

    import zoo.interop.hf                                  # registers model type "sessa_zoo" with the Auto classes
    from zoo.interop.hf import ZooForCausalLM
    hf = ZooForCausalLM.from_zoo(model, gin_config.operative_config())
    hf.save_pretrained("out/")                             # config.json (with the gin config) + model.safetensors
    hf = AutoModelForCausalLM.from_pretrained("out/")      # rebuilds the model from its gin config
    out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=32, do_sample=False)

`ZooConfig` carries the model's gin config (the text `zoo.gin_config.operative_config()` returns);
`ZooForCausalLM(config)` parses it and builds the model with `zoo.gin_config.build_model()`, so any
stack of any registered mixers works. `generate()` runs on the zoo's own decoding cache
(zoo.cache.StackCache, wrapped as a transformers `Cache`): left-padded batches (attention_mask
0 on the pads, on the left only) decode exactly as each row alone, as in zoo.generate.

Security: a gin config can `import` Python modules (that is how user-registered mixers are found),
so loading one runs code, like transformers' trust_remote_code. from_pretrained refuses a config
with `import` or `include` lines unless called with trust_gin_imports=True; load only checkpoints
you trust. from_pretrained also replaces any gin config parsed before it (it parses the stored one).
"""

from __future__ import annotations

import contextvars
import re
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("zoo.interop.hf needs Hugging Face transformers: pip install 'sessa-zoo[hf]' "
                      "(transformers>=5.24,<6)") from e

from zoo import gin_config
from zoo.cache import StackCache
from zoo.train import configurables as _train_configurables  # noqa: F401  (a run's config.gin also binds training)

MODEL_TYPE = "sessa_zoo"
_CODE_LINE = re.compile(r"^\s*(import\s|from\s+\S+\s+import\s|include\s)")
_TRUST_GIN_IMPORTS = contextvars.ContextVar("trust_gin_imports", default=False)  # set by from_pretrained


class ZooConfig(PreTrainedConfig):
    """A zoo model's configuration: `gin_config`, the gin text that builds it (its operative config),
    plus the numbers transformers reads (vocab_size, hidden_size, num_hidden_layers, token ids)."""

    model_type = MODEL_TYPE

    gin_config: str = ""
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None


class ZooCache(Cache):
    """A zoo StackCache (one decoding state per layer, any mix of mixers) as a transformers Cache.

    Rows can be reordered or repeated (beam search, several sequences per prompt); the cache cannot
    be cropped (recurrent states cannot be rolled back), so assisted decoding is not available."""

    def __init__(self, stack: StackCache):
        super().__init__(layers=[])
        self.stack = stack

    def __len__(self) -> int:
        return self.stack.num_layers

    def __repr__(self) -> str:
        return f"ZooCache({self.stack!r})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.stack.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.stack.max_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.stack.reorder(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.stack.reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.stack.reorder(torch.arange(self.stack.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a zoo decoding cache cannot be cropped (recurrent states cannot be rolled back)")

    def reset(self) -> None:
        raise NotImplementedError("a zoo decoding cache cannot be reset; let generate() allocate a new one")

    def activate_past_recording(self) -> None:
        pass

    @property
    def batch_size(self) -> int:
        return self.stack.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.stack.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.stack.num_layers  # tells generate() that the cache knows how many tokens it holds

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.stack.num_layers


def seq_idx_from_attention_mask(attention_mask: Tensor | None, num_new: int) -> Tensor | None:
    """A transformers attention mask (B, L) of 1 (token) / 0 (pad), pads on the left only, -> the zoo's
    segment ids for the last `num_new` positions: -1 on pads, 0 on tokens (None when there are no pads)."""
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2 or attention_mask.shape[1] < num_new:
        raise ValueError(f"attention_mask must be (B, L) with L >= {num_new} (the new tokens); got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask must pad on the left only (each row 0...0 1...1): zoo models keep a "
                         "padded prompt apart from its pads by segment, so pad the prompts on the left")
    new = mask[:, -num_new:]
    if bool(new.all()):
        return None
    return torch.where(new, 0, -1).long()


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # recurrent layers: no cache cropping, so no assisted decoding

    def _init_weights(self, module: nn.Module) -> None:
        """Zoo modules initialise themselves when built. transformers builds a model it loads on the
        meta device and refills buffers it does not load (non-persistent ones, e.g. RoPE frequencies)
        with empty memory; they get back the values they were built with."""
        for name, value in getattr(self, "_buffer_init", {}).get(id(module), ()):
            getattr(module, name).copy_(value)


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """A zoo CausalLM behind the transformers interface: forward (input_ids, attention_mask, labels,
    cache) -> CausalLMOutputWithPast, generate(), save_pretrained / from_pretrained."""

    def __init__(self, config: ZooConfig, model: nn.Module | None = None):
        super().__init__(config)
        if model is None:
            # built for real even inside from_pretrained's meta-device context, so the non-persistent
            # buffers have their values to restore after loading
            device = torch.get_default_device()
            with torch.device("cpu" if device.type == "meta" else device):
                model = build_from_gin(config.gin_config, trust_imports=_TRUST_GIN_IMPORTS.get())
        self.model = model
        self._buffer_init = {}
        modules = dict(model.named_modules())
        for full, buffer in model.named_buffers():
            owner, _, name = full.rpartition(".")
            if name in modules[owner]._non_persistent_buffers_set:
                self._buffer_init.setdefault(id(modules[owner]), []).append((name, buffer.detach().clone()))
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_zoo(cls, model: nn.Module, gin_config_text: str, **config_kwargs: Any) -> "ZooForCausalLM":
        """Wrap a built zoo CausalLM; `gin_config_text` must build it (zoo.gin_config.operative_config()
        right after building). config_kwargs: token ids (bos_token_id, eos_token_id, pad_token_id)."""
        if not isinstance(gin_config_text, str) or "build_model.model" not in gin_config_text:
            raise ValueError("gin_config_text must be the gin config that built the model (with a "
                             "`build_model.model = ...` binding), e.g. zoo.gin_config.operative_config()")
        layers = getattr(getattr(model, "stack", None), "layers", None)
        config = ZooConfig(gin_config=gin_config_text, vocab_size=model.vocab_size, hidden_size=model.dim,
                           num_hidden_layers=None if layers is None else len(layers),
                           tie_word_embeddings=getattr(model, "head", None) is None, **config_kwargs)
        return cls(config, model=model)

    @classmethod
    def from_pretrained(cls, *args: Any, trust_gin_imports: bool = False, **kwargs: Any):
        """transformers' from_pretrained, strict: every weight of the model must be in the checkpoint and
        every checkpoint tensor must be used. trust_gin_imports: allow a gin config with `import` /
        `include` lines (they run code; see the module docstring)."""
        want_info = kwargs.pop("output_loading_info", False)
        token = _TRUST_GIN_IMPORTS.set(trust_gin_imports)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        finally:
            _TRUST_GIN_IMPORTS.reset(token)
        problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            raise ValueError(f"checkpoint {args[0] if args else ''} does not match the model its gin config builds: "
                             + "; ".join(f"{k} {v}" for k, v in problems.items() if v))
        # transformers may leave CPU weights as views into the memory-mapped file, at unaligned addresses
        # where CPU matmuls round differently; own copies compute exactly as the model that was saved
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ transformers plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self.model, "head", None)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int) -> None:
        """generate(): allocate the zoo's own decoding cache for the whole run (prompt + new tokens)."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length)
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        model_kwargs["cache"] = ZooCache(StackCache.allocate(self.model, rows, max(1, max_cache_length)))

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: ZooCache | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) -> logits (B, T, V) in the model's dtype. attention_mask (B, L): 1 on tokens,
        0 on left pads (L = cached + new tokens with a cache). cache: a ZooCache (generate() makes
        one), advanced in place. labels (B, T): next-token loss (shifted inside, -100 ignored).
        position_ids and other transformers inputs are not needed (positions follow the segments)."""
        if input_ids is None:
            raise ValueError("ZooForCausalLM needs input_ids (inputs_embeds are not supported)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("ZooForCausalLM takes input_ids only; inputs_embeds are not supported")
        if cache is not None and not isinstance(cache, ZooCache):
            raise TypeError(f"cache must be a ZooCache (generate() allocates one); got {type(cache).__name__}")
        seq_idx = seq_idx_from_attention_mask(attention_mask, input_ids.shape[1])
        logits = self.model(input_ids, seq_idx=seq_idx, cache=None if cache is None else cache.stack)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits.float(), labels=labels, vocab_size=self.config.vocab_size)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def build_from_gin(text: str, trust_imports: bool = False) -> nn.Module:
    """Parse gin config `text` (replacing the current gin config) and build its model.
    A config with `import` or `include` lines runs code and is refused unless trust_imports."""
    if not text.strip():
        raise ValueError("the config has no gin_config: it was not written by ZooForCausalLM.save_pretrained")
    lines = [line.strip() for line in text.splitlines() if _CODE_LINE.match(line)]
    if lines and not trust_imports:
        raise PermissionError("this gin config imports or includes code, which loading would run: "
                              f"{'; '.join(lines)}. Load it only if you trust its source, with "
                              "from_pretrained(..., trust_gin_imports=True)")
    gin_config.parse([], [text])
    return gin_config.build_model()


AutoConfig.register(MODEL_TYPE, ZooConfig, exist_ok=True)
AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)

__all__ = ["MODEL_TYPE", "ZooCache", "ZooConfig", "ZooForCausalLM", "build_from_gin", "seq_idx_from_attention_mask"]
