import keras
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import Sampler
from keras_hub.src.utils.tensor_utils import any_equal

from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(CatalogPresets, CausalLM):
    """Gemma for next-token prediction and text generation.

    `call` maps `{"token_ids", "padding_mask"}` to logits
    `[batch, seq, vocabulary_size]`. `generate()` takes strings (with a
    preprocessor) or right-padded `{"token_ids", "padding_mask"}` (without),
    prefills a per-layer KV cache in one pass and decodes token by token.
    Choose the sampler with `compile(sampler=...)`: `"greedy"`, `"top_k"`,
    `"top_p"`, `"random"` or a `keras_hub.samplers.Sampler` (for example
    `keras_hub.samplers.TopKSampler(k=10, temperature=0.7)`).

    Example:
    ```python
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("./my_preset")
    gemma_lm.generate("The capital of France is", max_length=32)
    gemma_lm.compile(sampler="top_k")
    gemma_lm.generate(["one", "two prompts"], max_length=32)

    # LoRA fine-tuning.
    gemma_lm.backbone.enable_lora(rank=4)
    gemma_lm.fit(["some text", "more text"], batch_size=2)
    ```
    """

    backbone_cls = GemmaBackbone
    preprocessor_cls = GemmaCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        outputs = backbone.token_logits(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Load the model, tokenizer and preprocessor from a catalog name, a
        `kaggle://`/`hf://` handle or a preset directory (ours, or written by
        KerasHub's `GemmaCausalLM.save_to_preset`)."""
        return loading.load_task(cls, preset, load_weights, **kwargs)

    def compile(self, *args, sampler="greedy", **kwargs):
        super().compile(*args, sampler=sampler, **kwargs)
        _check_sampler(self.sampler)

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Generate text (or token ids without a preprocessor).

        `stop_token_ids="auto"` stops on the preprocessor's `stop_tokens`
        (`<eos>`, plus `<end_of_turn>` for instruction-tuned presets); `None`
        generates up to `max_length`.
        """
        if stop_token_ids == "auto" and self.preprocessor is not None:
            stop_token_ids = self.preprocessor.stop_token_ids
        return super().generate(
            inputs, max_length=max_length, stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def export_to_transformers(self, path):
        """Write a Hugging Face transformers directory (safetensors,
        config.json, tokenizer.model) that loads with equal logits."""
        from keras_gemma.checkpoints.hf import export_to_transformers

        export_to_transformers(self, path)

    def call_with_cache(
        self, token_ids, cache, cache_update_index, cache_write_end=None
    ):
        """One cached forward pass; returns `(logits, hidden_states, cache)`."""
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, cache_update_index, cache_write_end
        )
        return self.backbone.token_logits(hidden_states), hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """Generate for one batch of right-padded `{"token_ids", "padding_mask"}`.

        The prompt is prefilled into the cache in one pass; then, starting at
        the shortest prompt's end, each step feeds the previous token and the
        sampler fills only the positions that were padding.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        batch_size, max_length = ops.shape(token_ids)
        prompt_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        start = ops.min(prompt_lengths)
        # Prefill in one pass. Decoding restarts at the shortest prompt's end
        # and feeds the later positions again, so only earlier ones are kept.
        # Only the cache and hidden states are needed: no vocabulary logits
        # for the whole padded prompt.
        cache = self.backbone.empty_cache(batch_size, max_length)
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, 0, cache_write_end=start
        )

        def next_token_logits(prompt, cache, index):
            # Feed the token before `index`; its logits predict `index`.
            previous = ops.slice(prompt, [0, index - 1], [batch_size, 1])
            logits, hidden, cache = self.call_with_cache(previous, cache, index - 1)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        token_ids = self.sampler(
            next=next_token_logits,
            prompt=token_ids,
            cache=cache,
            index=start,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return {
            "token_ids": token_ids,
            "padding_mask": _generated_mask(token_ids, padding_mask, stop_token_ids),
        }


def _generated_mask(token_ids, prompt_mask, stop_token_ids):
    """True for the prompt and generated tokens up to and including the first
    stop token after the prompt; False after it."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    generated = ops.logical_not(ops.cast(prompt_mask, "bool"))
    stops = ops.cast(any_equal(token_ids, stop_token_ids, generated), "int32")
    stops_before = ops.cumsum(stops, axis=-1) - stops
    return ops.equal(stops_before, 0)


def _check_sampler(sampler):
    """Reject sampler settings that would silently misbehave."""
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a keras_hub Sampler; got {sampler!r}.")
    name = type(sampler).__name__
    temperature = getattr(sampler, "temperature", 1.0)
    if not temperature > 0:
        raise ValueError(
            f"{name}: temperature must be > 0, got {temperature}. Use "
            "sampler='greedy' for deterministic decoding."
        )
    k = getattr(sampler, "k", None)
    if k is not None and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"{name}: k must be an integer >= 1, got {k!r}.")
    p = getattr(sampler, "p", None)
    if p is not None and not 0 < p <= 1:
        raise ValueError(f"{name}: p must be in (0, 1], got {p!r}.")
