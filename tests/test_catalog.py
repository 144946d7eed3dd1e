"""The preset catalog (presets/*.json): fields, handles, configs against the
published architectures, and parameter counts from the real backbone built
without allocating its weights (see keras_gemma.models.deferred_variables)."""

import functools
import inspect
import json
import re
import resource
import sys
from importlib import resources

import keras
import numpy as np
import pytest

import keras_gemma
from keras_gemma.presets import catalog
from keras_gemma.presets import context_length
from keras_gemma.models.deferred_variables import abstract_backbone
from keras_gemma.models.deferred_variables import deferred_variables
from tests import helpers

REQUIRED_FIELDS = {
    "family": str,
    "description": str,
    "params": int,
    "params_source": str,
    "instruction_tuned": bool,
    "stop_tokens": list,
    "kaggle_handle": str,
    "hf_repo": str,
    "config": dict,
}
FAMILIES = ("gemma", "gemma2", "gemma3")
KAGGLE_HANDLE = re.compile(r"^kaggle://[\w.-]+/[\w.-]+/keras/([\w.-]+)/([1-9]\d*)$")
HF_REPO = re.compile(r"^google/[A-Za-z0-9][\w.-]*$")


# === The architectures, transcribed from the Gemma facts sheet the project was
# given (GEMMA_FACTS.md, kept outside this repository) ===


def _gemma1(D, L, N, K, F):
    return dict(
        vocabulary_size=256000, hidden_dim=D, num_layers=L, num_query_heads=N,
        num_key_value_heads=K, head_dim=256, intermediate_dim=F, query_scale=256,
        attention_logit_soft_cap=None, final_logit_soft_cap=None,
        sliding_window=None, layer_types=["global"] * L,
        use_sandwich_norms=False, use_query_key_norm=False,
        rope_max_wavelength=10000.0, local_rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
    )


def _gemma2(D, L, N, K, H, F, query_scale):
    return dict(
        vocabulary_size=256000, hidden_dim=D, num_layers=L, num_query_heads=N,
        num_key_value_heads=K, head_dim=H, intermediate_dim=F,
        query_scale=query_scale,
        attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
        sliding_window=4096,
        layer_types=["sliding" if i % 2 == 0 else "global" for i in range(L)],
        use_sandwich_norms=True, use_query_key_norm=False,
        rope_max_wavelength=10000.0, local_rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
    )


def _gemma3(D, L, N, K, H, F, query_scale, window, rope_scaling):
    return dict(
        vocabulary_size=262144, hidden_dim=D, num_layers=L, num_query_heads=N,
        num_key_value_heads=K, head_dim=H, intermediate_dim=F,
        query_scale=query_scale,
        attention_logit_soft_cap=None, final_logit_soft_cap=None,
        sliding_window=window,
        layer_types=[
            "global" if (i + 1) % 6 == 0 else "sliding" for i in range(L)
        ],
        use_sandwich_norms=True, use_query_key_norm=True,
        rope_max_wavelength=1e6, local_rope_max_wavelength=1e4,
        rope_scaling_factor=rope_scaling,
    )


ARCHITECTURES = {
    ("gemma", "2b"): _gemma1(D=2048, L=18, N=8, K=1, F=16384),
    ("gemma", "7b"): _gemma1(D=3072, L=28, N=16, K=16, F=24576),
    ("gemma2", "2b"): _gemma2(D=2304, L=26, N=8, K=4, H=256, F=9216, query_scale=256),
    ("gemma2", "9b"): _gemma2(D=3584, L=42, N=16, K=8, H=256, F=14336, query_scale=256),
    ("gemma2", "27b"): _gemma2(D=4608, L=46, N=32, K=16, H=128, F=36864, query_scale=144),
    ("gemma3", "270m"): _gemma3(D=640, L=18, N=4, K=1, H=256, F=2048,
                                query_scale=256, window=512, rope_scaling=1.0),
    ("gemma3", "1b"): _gemma3(D=1152, L=26, N=4, K=1, H=256, F=6912,
                              query_scale=256, window=512, rope_scaling=1.0),
    ("gemma3", "4b"): _gemma3(D=2560, L=34, N=8, K=4, H=256, F=10240,
                              query_scale=256, window=1024, rope_scaling=8.0),
    ("gemma3", "12b"): _gemma3(D=3840, L=48, N=16, K=8, H=256, F=15360,
                               query_scale=256, window=1024, rope_scaling=8.0),
    ("gemma3", "27b"): _gemma3(D=5376, L=62, N=32, K=16, H=128, F=21504,
                               query_scale=168, window=1024, rope_scaling=8.0),
}

# Published counts, tied embedding counted once (GEMMA_FACTS.md).
PUBLISHED_PARAMS = {
    ("gemma", "2b"): 2_506_172_416,
    ("gemma", "7b"): 8_537_680_896,
    ("gemma2", "2b"): 2_614_341_888,
    ("gemma2", "9b"): 9_241_705_984,
    ("gemma2", "27b"): 27_227_128_320,
    ("gemma3", "270m"): 268_098_176,
    ("gemma3", "1b"): 999_885_952,
}

# Every official checkpoint the catalog must hold, and its architecture.
OFFICIAL = {
    "gemma_2b_en": ("gemma", "2b"),
    "gemma_instruct_2b_en": ("gemma", "2b"),
    "gemma_1.1_instruct_2b_en": ("gemma", "2b"),
    "code_gemma_2b_en": ("gemma", "2b"),
    "code_gemma_1.1_2b_en": ("gemma", "2b"),
    "gemma_7b_en": ("gemma", "7b"),
    "gemma_instruct_7b_en": ("gemma", "7b"),
    "gemma_1.1_instruct_7b_en": ("gemma", "7b"),
    "code_gemma_7b_en": ("gemma", "7b"),
    "code_gemma_instruct_7b_en": ("gemma", "7b"),
    "code_gemma_1.1_instruct_7b_en": ("gemma", "7b"),
    "gemma2_2b_en": ("gemma2", "2b"),
    "gemma2_instruct_2b_en": ("gemma2", "2b"),
    "gemma2_9b_en": ("gemma2", "9b"),
    "gemma2_instruct_9b_en": ("gemma2", "9b"),
    "gemma2_27b_en": ("gemma2", "27b"),
    "gemma2_instruct_27b_en": ("gemma2", "27b"),
    "gemma3_270m": ("gemma3", "270m"),
    "gemma3_instruct_270m": ("gemma3", "270m"),
    "gemma3_1b": ("gemma3", "1b"),
    "gemma3_instruct_1b": ("gemma3", "1b"),
    "gemma3_4b_text": ("gemma3", "4b"),
    "gemma3_instruct_4b_text": ("gemma3", "4b"),
    "gemma3_12b_text": ("gemma3", "12b"),
    "gemma3_instruct_12b_text": ("gemma3", "12b"),
    "gemma3_27b_text": ("gemma3", "27b"),
    "gemma3_instruct_27b_text": ("gemma3", "27b"),
}

HF_REPOS = {
    "gemma2_2b_en": "google/gemma-2-2b",
    "gemma2_instruct_2b_en": "google/gemma-2-2b-it",
    "gemma2_9b_en": "google/gemma-2-9b",
    "gemma2_instruct_9b_en": "google/gemma-2-9b-it",
    "gemma2_27b_en": "google/gemma-2-27b",
    "gemma2_instruct_27b_en": "google/gemma-2-27b-it",
    "gemma3_270m": "google/gemma-3-270m",
    "gemma3_instruct_270m": "google/gemma-3-270m-it",
    "gemma3_1b": "google/gemma-3-1b-pt",
    "gemma3_instruct_1b": "google/gemma-3-1b-it",
    "gemma3_4b_text": "google/gemma-3-4b-pt",
    "gemma3_instruct_4b_text": "google/gemma-3-4b-it",
    "gemma3_12b_text": "google/gemma-3-12b-pt",
    "gemma3_instruct_12b_text": "google/gemma-3-12b-it",
    "gemma3_27b_text": "google/gemma-3-27b-pt",
    "gemma3_instruct_27b_text": "google/gemma-3-27b-it",
}

CATALOG = catalog()
NAMES = sorted(CATALOG)

BACKBONE_PARAMETERS = inspect.signature(keras_gemma.GemmaBackbone.__init__).parameters
BACKBONE_ARGS = {
    name: p for name, p in BACKBONE_PARAMETERS.items()
    if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
}


def effective_config(config):
    """The entry's config with GemmaBackbone's defaults filled in and the
    `None` shorthands resolved (query_scale -> head_dim, local RoPE ->
    global RoPE, layer_types -> all global)."""
    full = {
        name: p.default for name, p in BACKBONE_ARGS.items()
        if p.default is not inspect.Parameter.empty
    }
    full.update(config)
    if full["query_scale"] is None:
        full["query_scale"] = full["head_dim"]
    if full["local_rope_max_wavelength"] is None:
        full["local_rope_max_wavelength"] = full["rope_max_wavelength"]
    if full["layer_types"] is None:
        full["layer_types"] = ["global"] * full["num_layers"]
    return full


def formula_params(config):
    """Parameter count from the architecture alone (tied embedding once)."""
    c = effective_config(config)
    V, D, L = c["vocabulary_size"], c["hidden_dim"], c["num_layers"]
    N, K, H, F = (c["num_query_heads"], c["num_key_value_heads"],
                  c["head_dim"], c["intermediate_dim"])
    attention = D * N * H + 2 * D * K * H + N * H * D
    mlp = 3 * D * F
    norms = (4 if c["use_sandwich_norms"] else 2) * D
    qk_norms = 2 * H if c["use_query_key_norm"] else 0
    return V * D + L * (attention + mlp + norms + qk_norms) + D


def peak_rss_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@functools.cache
def _abstract_count(config_json):
    before = peak_rss_bytes()
    count = abstract_backbone(**json.loads(config_json)).count_params()
    return count, peak_rss_bytes() - before


def abstract_count(config):
    """(count_params, growth of the process's peak RSS) for an abstract
    build, cached per distinct config (base and instruct share one)."""
    return _abstract_count(json.dumps(config, sort_keys=True))


# === The catalog files ===


def test_catalog_files_merge_without_collisions():
    files = [
        path for path in resources.files("keras_gemma.presets").iterdir()
        if path.name.endswith(".json")
    ]
    assert {path.name for path in files} >= {"gemma1.json", "gemma2.json", "gemma3.json"}
    seen = {}
    for path in files:
        for name in json.loads(path.read_text(encoding="utf-8")):
            assert name not in seen, f"{name} is in both {seen[name]} and {path.name}"
            seen[name] = path.name
    assert set(seen) == set(CATALOG)


def test_catalog_holds_every_official_checkpoint():
    missing = sorted(set(OFFICIAL) - set(CATALOG))
    assert not missing, f"missing from the catalog: {missing}"
    assert keras_gemma.GemmaBackbone.presets == CATALOG


# === Per entry ===


@pytest.mark.parametrize("name", NAMES)
def test_entry_fields(name):
    entry = CATALOG[name]
    for field, kind in REQUIRED_FIELDS.items():
        assert field in entry, f"{name} has no {field!r}"
        assert isinstance(entry[field], kind), f"{name}.{field} is not a {kind.__name__}"
    assert entry["family"] in FAMILIES
    assert entry["description"].strip() and entry["params_source"].strip()
    assert entry["params"] > 0 and not isinstance(entry["params"], bool)


@pytest.mark.parametrize("name", NAMES)
def test_entry_handles(name):
    entry = CATALOG[name]
    match = KAGGLE_HANDLE.match(entry["kaggle_handle"])
    assert match, f"{name}: bad kaggle_handle {entry['kaggle_handle']!r}"
    # The catalog name is the Kaggle (KerasHub) preset name.
    assert match.group(1) == name
    assert HF_REPO.match(entry["hf_repo"]), f"{name}: bad hf_repo {entry['hf_repo']!r}"
    if name in HF_REPOS:
        assert entry["hf_repo"] == HF_REPOS[name]
    if entry["family"] in ("gemma2", "gemma3"):
        assert f"/{entry['family']}/keras/" in entry["kaggle_handle"]


@pytest.mark.parametrize("name", NAMES)
def test_stop_tokens_follow_instruction_tuning(name):
    entry = CATALOG[name]
    tuned = entry["instruction_tuned"]
    expected = ["<eos>", "<end_of_turn>"] if tuned else ["<eos>"]
    assert entry["stop_tokens"] == expected
    assert ("instruct" in name) == tuned
    assert entry["hf_repo"].endswith("-it") == tuned


@pytest.mark.parametrize("name", NAMES)
def test_config_arguments_are_backbone_arguments(name):
    config = CATALOG[name]["config"]
    unknown = sorted(set(config) - set(BACKBONE_ARGS))
    assert not unknown, f"{name}: not GemmaBackbone arguments: {unknown}"
    required = {
        arg for arg, p in BACKBONE_ARGS.items() if p.default is inspect.Parameter.empty
    }
    assert required <= set(config), f"{name}: missing {sorted(required - set(config))}"
    assert "dtype" not in config and "dropout" not in config


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_matches_published_architecture(name):
    entry = CATALOG[name]
    family, _ = OFFICIAL[name]
    assert entry["family"] == family
    actual = effective_config(entry["config"])
    expected = ARCHITECTURES[OFFICIAL[name]]
    differing = {
        key: (actual[key], value) for key, value in expected.items()
        if actual[key] != value
    }
    assert not differing, f"{name}: (catalog, expected) {differing}"
    if family == "gemma3" and entry["config"]["hidden_dim"] >= 2560:
        assert "262208" in entry["description"]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_context_length_is_the_published_one(name):
    """GEMMA_FACTS.md's ctx column: 8192 for Gemma 1 and 2, 32768 for Gemma 3
    270M and 1B, 131072 for Gemma 3 4B, 12B and 27B."""
    entry = CATALOG[name]
    small_gemma3 = entry["config"]["hidden_dim"] <= 1152
    expected = {"gemma": 8192, "gemma2": 8192, "gemma3": 32768 if small_gemma3 else 131072}
    assert context_length(entry["config"]) == expected[entry["family"]]


def test_counts_and_handles_equal_keras_hubs_presets():
    """KerasHub's preset metadata (the reference for the Kaggle Keras
    presets) gives every entry's parameter count and handle: a transcribed
    shape or handle version that drifted would differ."""
    from keras_hub.src.models.gemma.gemma_presets import backbone_presets as gemma
    from keras_hub.src.models.gemma3.gemma3_presets import backbone_presets as gemma3

    keras_hub_presets = {**gemma, **gemma3}
    for name, entry in CATALOG.items():
        reference = keras_hub_presets[name]
        assert (entry["params"], entry["kaggle_handle"]) == (
            reference["metadata"]["params"], reference["kaggle_handle"]
        ), name


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    """Builds the entry's real GemmaBackbone without allocating weights and
    counts its parameters: it must match the published count where there is
    one, the entry's `params`, and the architecture formula."""
    entry = CATALOG[name]
    count, rss_growth = abstract_count(entry["config"])
    assert count == entry["params"], f"{name}: built {count:,}, catalog says {entry['params']:,}"
    assert count == formula_params(entry["config"])
    published = PUBLISHED_PARAMS.get(OFFICIAL.get(name))
    if published is not None:
        assert count == published, f"{name}: built {count:,}, published {published:,}"
    assert entry["params_source"].startswith("Published count") == (published is not None)
    # Nothing was materialized: the largest float32 weight of every entry,
    # its embedding, takes at least 640 MiB (Gemma 3 270M).
    assert rss_growth < 512 * 2**20, f"{name}: peak RSS grew {rss_growth / 2**20:.0f} MiB"


# === The abstract build itself ===


def test_abstract_build_matches_a_real_build():
    config = dict(
        vocabulary_size=100, sliding_window=4, use_sandwich_norms=True,
        use_query_key_norm=True, layer_types=["sliding", "global"],
        **helpers.TINY_MHA,
    )
    real = keras_gemma.GemmaBackbone(**config)
    abstract = abstract_backbone(**config)
    assert [(w.path, tuple(w.shape), w.dtype) for w in abstract.weights] == [
        (w.path, tuple(w.shape), w.dtype) for w in real.weights
    ]
    assert abstract.count_params() == real.count_params() == formula_params(config)
    def config_of(model):
        return {k: v for k, v in model.get_config().items() if k != "name"}

    assert config_of(abstract) == config_of(real)
    assert all(w._value is None for w in abstract.weights)


def test_abstract_build_rejects_bad_configs():
    config = dict(vocabulary_size=100, **helpers.TINY_MQA)
    with pytest.raises(TypeError, match="unexpected arguments.*num_kv_heads"):
        abstract_backbone(**config, num_kv_heads=1)
    with pytest.raises(ValueError, match="sliding_window is not set"):
        abstract_backbone(**config, layer_types=["sliding", "global"])


def test_abstract_weights_are_never_initialized_later():
    config = dict(vocabulary_size=100, **helpers.TINY_MQA)
    abstract = abstract_backbone(**config)
    # Leaving an ordinary stateless scope initializes pending variables;
    # the abstract build must not have left its variables pending.
    with keras.StatelessScope():
        pass
    assert all(w._value is None for w in abstract.weights)
    # Nor may it disturb variables created normally afterwards.
    real = keras_gemma.GemmaBackbone(**config)
    assert np.isfinite(keras.ops.convert_to_numpy(real.weights[0].value)).all()


def test_deferred_variables_cannot_nest_in_a_stateless_scope():
    with keras.StatelessScope(), pytest.raises(RuntimeError, match="StatelessScope"):
        with deferred_variables():
            pass
