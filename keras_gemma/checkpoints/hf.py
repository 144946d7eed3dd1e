"""Hugging Face transformers Gemma checkpoints: config and weight mapping.

HF stores PyTorch `[out, in]` matrices; our EinsumDense kernels are
`[heads, D, head_dim]` for q/k/v, `[heads, head_dim, D]` for the output and
`[in, out]` for the feed-forward layers.
"""

import numpy as np

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "global"}


def _rope(config):
    """`(global theta, local theta, global linear scaling factor)` from either
    the per-layer-type `rope_parameters` (transformers 5) or the older
    `rope_theta` / `rope_local_base_freq` / `rope_scaling` keys."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        sliding = params.get("sliding_attention") or {}
    else:
        full = dict(params)
        sliding = {}
    global_theta = full.get("rope_theta", config.get("rope_theta", 10000.0))
    local_theta = sliding.get(
        "rope_theta", config.get("rope_local_base_freq", global_theta)
    )
    scaling = full if full.get("rope_type") == "linear" else config.get("rope_scaling")
    factor = 1.0
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        factor = float(scaling["factor"])
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"Unsupported RoPE scaling {scaling}; only linear is.")
    return float(global_theta), float(local_theta), factor


def backbone_kwargs_from_hf_config(config):
    """`GemmaBackbone` arguments from an HF `config.json` dict."""
    model_type = config.get("model_type")
    if model_type == "gemma3":  # Multimodal wrapper: the text part.
        config, model_type = config["text_config"], "gemma3_text"
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Unknown architecture model_type={model_type!r}; keras_gemma "
            f"reads {', '.join(MODEL_TYPES)}."
        )
    num_layers = config["num_hidden_layers"]
    num_heads = config["num_attention_heads"]
    hidden_dim = config["hidden_size"]
    global_theta, local_theta, scaling_factor = _rope(config)
    kwargs = dict(
        vocabulary_size=config["vocab_size"],
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_key_value_heads=config.get("num_key_value_heads", num_heads),
        hidden_dim=hidden_dim,
        intermediate_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or hidden_dim // num_heads,
        layer_norm_epsilon=config.get("rms_norm_eps", 1e-6),
        rope_max_wavelength=global_theta,
    )
    if model_type == "gemma":
        return kwargs
    layer_types = config.get("layer_types")
    if layer_types is None:
        if model_type == "gemma2":
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(num_layers)]
        else:
            pattern = config.get("sliding_window_pattern", 6)
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(num_layers)]
    kwargs.update(
        query_scale=config.get("query_pre_attn_scalar"),
        attention_logit_soft_cap=config.get("attn_logit_softcapping"),
        final_logit_soft_cap=config.get("final_logit_softcapping"),
        sliding_window=config.get("sliding_window"),
        layer_types=[_LAYER_TYPES[t] for t in layer_types],
        use_sandwich_norms=True,
        use_query_key_norm=model_type == "gemma3_text",
        local_rope_max_wavelength=local_theta,
        rope_scaling_factor=scaling_factor,
    )
    return kwargs


def hf_weight_names(backbone):
    """`{HF tensor name: (our variable, converter)}` for every weight of the
    backbone, in the HF naming of its family."""
    sandwich = backbone.use_sandwich_norms
    N, K, H = backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim

    def heads_in(num_heads):  # [heads*H, D] -> [heads, D, H]
        return lambda w: w.reshape(num_heads, H, -1).transpose(0, 2, 1)

    def identity(w):
        return w

    def transpose(w):
        return w.T

    mapping = {
        "model.embed_tokens.weight": (backbone.token_embedding.embeddings, identity),
        "model.norm.weight": (backbone.layer_norm.scale, identity),
    }
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}."
        attention = block.attention
        names = {
            "input_layernorm": (block.pre_attention_norm.scale, identity),
            "self_attn.q_proj": (attention.query_dense.kernel, heads_in(N)),
            "self_attn.k_proj": (attention.key_dense.kernel, heads_in(K)),
            "self_attn.v_proj": (attention.value_dense.kernel, heads_in(K)),
            # [D, N*H] -> [N, H, D]
            "self_attn.o_proj": (
                attention.output_dense.kernel,
                lambda w: w.T.reshape(N, H, -1),
            ),
            "mlp.gate_proj": (block.gating_ffw.kernel, transpose),
            "mlp.up_proj": (block.gating_ffw_2.kernel, transpose),
            "mlp.down_proj": (block.ffw_linear.kernel, transpose),
        }
        if sandwich:
            names["post_attention_layernorm"] = (block.post_attention_norm.scale, identity)
            names["pre_feedforward_layernorm"] = (block.pre_ffw_norm.scale, identity)
            names["post_feedforward_layernorm"] = (block.post_ffw_norm.scale, identity)
        else:
            # In Gemma 1, HF's post_attention_layernorm is the norm before the MLP.
            names["post_attention_layernorm"] = (block.pre_ffw_norm.scale, identity)
        if backbone.use_query_key_norm:
            names["self_attn.q_norm"] = (attention.query_norm.scale, identity)
            names["self_attn.k_norm"] = (attention.key_norm.scale, identity)
        for name, target in names.items():
            mapping[f"{prefix}{name}.weight"] = target
    return mapping


def load_hf_weights(backbone, get_tensor, source="checkpoint"):
    """Assign HF-named weights to `backbone`, one tensor at a time.

    `get_tensor(name)` returns a numpy array or raises `KeyError`. Every
    weight must be present with the right shape; errors name the tensor.
    """
    for name, (variable, convert) in hf_weight_names(backbone).items():
        try:
            tensor = get_tensor(name)
        except KeyError:
            raise KeyError(f"{source} is missing tensor {name!r}.") from None
        value = convert(np.asarray(tensor))
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(np.shape(tensor))}, "
                f"which does not fit {variable.path} {tuple(variable.shape)}. "
                "Is the config right for these weights?"
            )
        variable.assign(value)
