"""Deterministic tiny random-weight checkpoints for tests and demos (no model hub needed).

``make_tiny_model(out_dir, arch, seed)`` writes a complete Hugging Face checkpoint folder that
``AutoTokenizer`` / ``AutoModelForCausalLM`` load like a real one:

- ``config.json`` + ``model.safetensors``: a Llama, Qwen2 (q/k/v bias, tied embeddings) or Qwen3 (q/k norm)
  model of ~0.2M parameters, or a mixture of experts (Qwen3-MoE, Qwen2-MoE with a shared expert, Mixtral) whose every tensor, biases and norm weights included, is drawn from a seeded RNG.
  HF initialises biases to 0 and norms to 1; we re-draw them so a loader that skips them fails parity.
- tokenizer files: a byte-level BPE trained with ``tokenizers`` on a fixed list of Python standard-library
  sources, wrapped as a fast tokenizer with ChatML special tokens and a ChatML chat template.
- ``generation_config.json``: stops on ``<|im_end|>`` and ``<|endoftext|>``.

Same arch + seed + overrides give byte-identical weights and the same tokenizer (on one Python version:
the training text is that version's standard library). The CLI is ``sglite make-tiny-model OUT``
(:mod:`xinf_sglang.tools.make_tiny_model`).
"""

from __future__ import annotations

import functools
import os
import pathlib
import sysconfig
import zlib
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

Arch = Literal["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]
ARCHS: tuple[str, ...] = get_args(Arch)

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START, IM_END)

# Qwen-style ChatML, without Qwen's default system prompt so tests control every rendered token.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split pattern. ``AutoTokenizer`` loads a ``qwen2`` folder with ``Qwen2Tokenizer``, which
# rebuilds the normalizer / pre-tokenizer from scratch (NFC + this split + ByteLevel) and keeps only our
# vocab and merges; training with exactly that pipeline makes every arch tokenize identically.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TOKENIZER_VOCAB_SIZE = 1024  # trained vocab incl. 256 byte symbols and the 3 specials; a multiple of 64

# Training text: standard-library modules present in every supported Python (3.10+), in sorted order.
CORPUS_MODULES: tuple[str, ...] = tuple(
    sorted(
        (
            "argparse.py",
            "collections/__init__.py",
            "contextlib.py",
            "csv.py",
            "dataclasses.py",
            "functools.py",
            "heapq.py",
            "json/__init__.py",
            "json/decoder.py",
            "json/encoder.py",
            "pprint.py",
            "queue.py",
            "string.py",
            "textwrap.py",
        )
    )
)

# Shape of the default tiny model; every key can be overridden through ``make_tiny_model(**overrides)``.
BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}

ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},  # Qwen2's attention always has q/k/v bias
    "qwen3": {"tie_word_embeddings": True, "attention_bias": False},  # like Qwen3-0.6B
    # Mixtures of experts: 3 layers, one of them dense (the two ways HF picks them), uneven expert counts.
    "qwen3_moe": {"tie_word_embeddings": False, "num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "norm_topk_prob": True, "mlp_only_layers": [1]},
    "qwen2_moe": {"tie_word_embeddings": False, "num_hidden_layers": 3, "num_experts": 6, "num_experts_per_tok": 3,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96, "norm_topk_prob": False,
                  "decoder_sparse_step": 2},
    "mixtral": {"tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2},
    # MLA + DeepSeek-MoE. V2-Lite-like: no q LoRA, greedy softmax routing, first layer dense, 2 shared experts.
    "deepseek_v2": {"tie_word_embeddings": False, "num_hidden_layers": 3, "num_key_value_heads": 4,
                    "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                    "v_head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2,
                    "moe_intermediate_size": 32, "first_k_dense_replace": 1, "topk_method": "greedy",
                    "routed_scaling_factor": 1.0, "norm_topk_prob": False,
                    # YaRN without mscale keys: cos/sin scaled by 0.1 ln(factor) + 1, the softmax not
                    "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}},
    # V3-like: q LoRA, sigmoid scores + correction bias over 4 groups (noaux_tc), scaled weights, YaRN rope whose
    # mscale / mscale_all_dim differ (real V3 has them equal): both the cos/sin and the softmax scales are exercised.
    "deepseek_v3": {"tie_word_embeddings": False, "num_hidden_layers": 3, "num_key_value_heads": 4,
                    "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                    "v_head_dim": 16, "n_routed_experts": 16, "num_experts_per_tok": 3, "n_shared_experts": 1,
                    "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
                    "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}},
}

ARCH_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}

# Config classes accept unknown kwargs silently; these legacy names are real aliases we let through.
LEGACY_CONFIG_KEYS = frozenset({"rope_scaling", "rope_theta"})
# Config keys that exist but that this builder decides; accepting them would silently do nothing.
FIXED_CONFIG_KEYS: dict[str, str] = {
    "dtype": "weights are always written in float32",
    "initializer_range": "every tensor is re-drawn by this module",
    "architectures": "set by arch",
    "model_type": "set by arch",
    "transformers_version": "written by save_pretrained",
    "_name_or_path": "written by save_pretrained",
}

NORM_SCALE = 0.1  # norm weights ~ 1 + 0.1 * randn
BIAS_SCALE = 0.1  # biases ~ 0.1 * randn
# Embedding / lm_head std in units of 1/sqrt(hidden): logits get std ~2, so the greedy top-1 usually leads the
# runner-up by a margin that reduced-precision kernels do not flip, while no single token takes all the mass.
EMBEDDING_GAIN = 2.0
VOCAB_MULTIPLE = 64  # the config's vocab_size is the tokenizer's length rounded up to this


def make_tiny_model(
    out_dir: str | os.PathLike[str], arch: Arch = "llama", seed: int = 0, **overrides: Any
) -> pathlib.Path:
    """Write a deterministic random-weight HF checkpoint of ``arch`` into ``out_dir`` and return its path.

    ``overrides`` are config keys (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``, ``tie_word_embeddings``, ``rope_scaling``, ...). ``out_dir``
    must be missing or empty so that no stale file from another build ends up in the folder.
    """
    _validate_call(arch, seed)
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass a new or empty folder")
    tokenizer = _hf_tokenizer(_train_tokenizer(), max_length=_max_positions(overrides))
    config = _build_config(arch, overrides, tokenizer_len=len(tokenizer))
    model = _random_model(arch, config, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _validate_call(arch: str, seed: int) -> None:
    """Reject a bad arch or seed with a message that names the valid values."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _max_positions(overrides: dict[str, Any]) -> int:
    return int(overrides.get("max_position_embeddings", BASE_CONFIG["max_position_embeddings"]))


# ---------------------------------------------------------------------------------------------------- tokenizer


def _corpus_texts() -> list[str]:
    """The training text: a fixed, sorted list of standard-library sources (missing ones skipped)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / name for name in CORPUS_MODULES if (stdlib / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"no training text found under {stdlib}")
    return [p.read_text(encoding="utf-8") for p in paths]


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process (it is arch- and seed-independent) and keep it as JSON."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_texts(), trainer=trainer)
    return tokenizer.to_str()


def _train_tokenizer() -> Tokenizer:
    """A fresh ``tokenizers.Tokenizer`` with the trained vocab (a copy, so callers may mutate it)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json())


def _hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """Wrap the trained tokenizer as a HF fast tokenizer with ChatML specials and chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # keeps decode(encode(x)) == x
    )


# ---------------------------------------------------------------------------------------------------- model


def _build_config(arch: str, overrides: dict[str, Any], tokenizer_len: int) -> PretrainedConfig:
    """The HF config of ``arch``: base shape, then arch defaults, then the caller's overrides (validated)."""
    import transformers

    config_cls = getattr(transformers, ARCH_CLASSES[arch][0])
    _check_override_keys(config_cls, overrides)
    padded_vocab = -(-tokenizer_len // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    values = {**BASE_CONFIG, "vocab_size": padded_vocab, **ARCH_CONFIG[arch], **overrides}
    _check_shape(values, tokenizer_len)
    if arch not in ("qwen2", "deepseek_v2", "deepseek_v3") and "head_dim" not in overrides:
        # Qwen3Config defaults head_dim to 128 whatever the hidden size; derive it as Llama does.
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    values.setdefault("eos_token_id", eos_id)
    values.setdefault("pad_token_id", eos_id)
    values.setdefault("bos_token_id", None)  # the tokenizer adds no BOS, like Qwen's
    return config_cls(**values)


def _check_override_keys(config_cls: type, overrides: dict[str, Any]) -> None:
    """Config classes swallow unknown kwargs; a typo in a test must fail instead of building the default."""
    fixed = sorted(set(overrides) & set(FIXED_CONFIG_KEYS))
    if fixed:
        raise ValueError("; ".join(f"{key} cannot be overridden: {FIXED_CONFIG_KEYS[key]}" for key in fixed))
    aliases = set(getattr(config_cls, "attribute_map", {}))  # e.g. Qwen3-MoE's num_experts -> num_local_experts
    valid = (set(config_cls().to_dict()) | aliases | LEGACY_CONFIG_KEYS) - set(FIXED_CONFIG_KEYS)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; valid keys: {', '.join(sorted(valid))}")


def _check_shape(values: dict[str, Any], tokenizer_len: int) -> None:
    """Shape constraints HF checks late or not at all."""
    if values["vocab_size"] < tokenizer_len:
        raise ValueError(f"vocab_size={values['vocab_size']} is smaller than the tokenizer ({tokenizer_len} tokens)")
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if "head_dim" not in values and values["hidden_size"] % heads:
        raise ValueError(f"hidden_size={values['hidden_size']} is not a multiple of num_attention_heads={heads}")


def _random_model(arch: str, config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """Instantiate ``arch`` in float32 and overwrite every parameter with seeded random values."""
    import torch
    import transformers
    from transformers import GenerationConfig

    model_cls = getattr(transformers, ARCH_CLASSES[arch][1])
    with torch.random.fork_rng(devices=[]):  # HF's init draws from the global RNG; leave the caller's alone
        model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        # named_parameters() lists a tied weight once, so a tied lm_head keeps the embedding's values.
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(_draw(name, tuple(param.shape), seed)))
        for name, buffer in model.named_buffers():  # DeepSeek-V3's correction bias is a buffer: make it count
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.from_numpy(_draw(name, tuple(buffer.shape), seed)))
    eos_ids = [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(EOS_TOKEN)]
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=eos_ids[1])
    return model


def _draw(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random values for one parameter, seeded by (seed, name) so a tensor does not depend on the others.

    numpy's PCG64 + ``standard_normal`` is platform-independent, unlike torch's CPU normal kernels whose
    vectorised paths differ by instruction set, so files match across machines.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape)
    if name.endswith("norm.weight"):
        values = 1.0 + NORM_SCALE * noise
    elif name.endswith(".bias"):
        values = BIAS_SCALE * noise
    elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
        values = EMBEDDING_GAIN * noise / np.sqrt(shape[-1])  # shape (vocab, hidden): fan-in is hidden
    else:
        values = noise / np.sqrt(shape[-1])  # 1/sqrt(fan_in) keeps activations O(1) through the stack
    return values.astype(np.float32)


# ---------------------------------------------------------------------------------------------------- size


def parameter_count(checkpoint: str | os.PathLike[str]) -> int:
    """Number of stored parameters in a checkpoint's ``model.safetensors`` (a tied lm_head counts once)."""
    from safetensors import safe_open

    with safe_open(str(pathlib.Path(checkpoint) / "model.safetensors"), framework="np") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
