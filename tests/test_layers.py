"""runtime/layers and runtime/distributed: each sharded layer loads its rank's slice of a full checkpoint tensor
(random tensors, rank 1 of 2 and replicated KV heads), the partial results of the ranks add up (or join) to the
unsharded result, shapes and divisibility are checked, and the generic loader fills a rank-1 model completely."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from xinf_sglang.runtime.tp.distributed import TPInfo
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from xinf_sglang.runtime.model_loader.model_config import ModelConfig
from xinf_sglang.runtime.model_loader.loader import expected_loads, load_weights
from xinf_sglang.runtime.models.registry import model_class

RANK1 = TPInfo(rank=1, size=2)
HIDDEN, HEAD_DIM = 8, 4


def _full(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _load(layer, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    layer.weight_loader(getattr(layer, name), tensor, shard_id)


def _heads(t: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows of heads ``[first, first + count)`` of a ``[heads * HEAD_DIM, ...]`` tensor."""
    return t[first * HEAD_DIM : (first + count) * HEAD_DIM]


@pytest.mark.parametrize(
    "num_kv_heads, tp, kv_head",
    [(2, RANK1, 1), (1, RANK1, 0), (2, TPInfo(rank=1, size=4), 0), (2, TPInfo(rank=2, size=4), 1)],
    ids=["kv-split", "kv-replicated", "kv-replicated-4-rank1", "kv-replicated-4-rank2"],
)
def test_qkv_takes_its_query_heads_and_the_kv_head_they_read(num_kv_heads, tp, kv_head):
    num_heads = 4
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads, num_kv_heads, bias=True, tp=tp)
    q_per_rank = num_heads // tp.size
    assert (layer.num_heads, layer.num_kv_heads) == (q_per_rank, 1)
    full = {s: (_full(n * HEAD_DIM, HIDDEN, seed=i), _full(n * HEAD_DIM, seed=10 + i))
            for i, (s, n) in enumerate([("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads)])}
    for shard_id, (weight, bias) in full.items():
        _load(layer, "weight", weight, shard_id)
        _load(layer, "bias", bias, shard_id)
    for i, name in enumerate(["weight", "bias"]):
        q, k, v = getattr(layer, name).split(layer.output_sizes)
        assert torch.equal(q, _heads(full["q"][i], tp.rank * q_per_rank, q_per_rank))
        assert torch.equal(k, _heads(full["k"][i], kv_head, 1))
        assert torch.equal(v, _heads(full["v"][i], kv_head, 1))


def test_gate_up_takes_its_slice_of_the_intermediate_features():
    intermediate = 6
    layer = MergedColumnParallelLinear(HIDDEN, [intermediate, intermediate], bias=False, tp=RANK1)
    gate, up = _full(intermediate, HIDDEN, seed=1), _full(intermediate, HIDDEN, seed=2)
    _load(layer, "weight", gate, 0)
    _load(layer, "weight", up, 1)
    assert layer.output_sizes == (3, 3)
    assert torch.equal(layer.weight, torch.cat([gate[3:], up[3:]]))


def test_row_parallel_takes_its_input_columns_and_the_ranks_sum_to_the_full_output():
    weight, bias, x = _full(5, HIDDEN, seed=1), _full(5, seed=2), _full(3, HIDDEN, seed=3)
    ranks = [RowParallelLinear(HIDDEN, 5, bias=True, tp=TPInfo(rank=r, size=2)) for r in range(2)]
    for layer in ranks:
        _load(layer, "weight", weight)
        _load(layer, "bias", bias)
    assert torch.equal(ranks[1].weight, weight[:, 4:])
    assert torch.equal(ranks[1].bias, bias)  # replicated; added by rank 0 only
    total = ranks[0].partial(x[:, :4]) + ranks[1].partial(x[:, 4:])
    torch.testing.assert_close(total, F.linear(x, weight, bias))


def test_vocab_embedding_takes_its_rows_and_the_ranks_sum_to_the_full_lookup():
    table, ids = _full(10, HIDDEN, seed=1), torch.tensor([0, 4, 5, 9, 7])
    ranks = [VocabParallelEmbedding(10, HIDDEN, TPInfo(rank=r, size=2)) for r in range(2)]
    for layer in ranks:
        _load(layer, "weight", table)
    assert torch.equal(ranks[1].weight, table[5:])
    assert torch.equal(ranks[1].partial(ids)[:2], torch.zeros(2, HIDDEN))  # ids 0 and 4 live on rank 0
    assert torch.equal(ranks[0].partial(ids) + ranks[1].partial(ids), F.embedding(ids, table))


def test_lm_head_takes_its_vocab_rows_and_the_ranks_join_to_the_full_logits():
    table, h = _full(10, HIDDEN, seed=1), _full(3, HIDDEN, seed=2)
    ranks = [ParallelLMHead(10, HIDDEN, TPInfo(rank=r, size=2)) for r in range(2)]
    for layer in ranks:
        _load(layer, "weight", table)
    assert torch.equal(ranks[1].weight, table[5:])
    joined = torch.cat([layer.local_logits(h) for layer in ranks], dim=-1)
    torch.testing.assert_close(joined, h @ table.T)


def test_at_size_one_the_layers_are_the_unsharded_ops():
    weight, x, ids = _full(6, HIDDEN, seed=1), _full(2, HIDDEN, seed=2), torch.tensor([1, 3])
    row, head = RowParallelLinear(HIDDEN, 6, bias=False, tp=TPInfo()), ParallelLMHead(6, HIDDEN, TPInfo())
    embedding = VocabParallelEmbedding(6, HIDDEN, TPInfo())
    for layer in (row, head, embedding):
        _load(layer, "weight", weight)
    torch.testing.assert_close(row(x), F.linear(x, weight))
    torch.testing.assert_close(head(x), F.linear(x, weight))
    assert torch.equal(embedding(ids), weight[ids])


def test_the_collectives_are_the_one_place_that_needs_process_groups():
    """A plain TPInfo shards but cannot communicate: only a tp_group.TPGroup (tests/test_tp.py) can."""
    layer = RowParallelLinear(HIDDEN, 4, bias=False, tp=RANK1)
    _load(layer, "weight", _full(4, HIDDEN))
    with pytest.raises(ConfigError, match="no process group"):
        layer(_full(1, HIDDEN // 2))
    head = ParallelLMHead(10, HIDDEN, RANK1)
    with pytest.raises(ConfigError, match="no process group"):
        head(_full(1, HIDDEN))


def test_a_checkpoint_tensor_of_the_wrong_full_shape_is_refused():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2, bias=False, tp=RANK1)
    with pytest.raises(ValueError, match=r"has shape \(12, 8\), the model expects \(8, 8\)"):
        _load(layer, "weight", _full(12, HIDDEN), "k")  # three KV heads where the config has two
    row = RowParallelLinear(HIDDEN, 4, bias=False, tp=RANK1)
    with pytest.raises(ValueError, match=r"the model expects \(4, 8\)"):
        _load(row, "weight", _full(4, HIDDEN // 2))  # already a shard, not the full tensor


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2, False, TPInfo(0, 3)), "num_attention_heads \\(4\\)"),
        (lambda: QKVParallelLinear(HIDDEN, HEAD_DIM, 6, 2, False, TPInfo(0, 3)), "multiple of num_key_value_heads"),
        (lambda: VocabParallelEmbedding(11, HIDDEN, RANK1), "vocab_size \\(11\\) is not divisible by .* size 2"),
        (lambda: RowParallelLinear(7, 4, False, RANK1), "input size 7"),
        (lambda: TPInfo(rank=2, size=2), "0 <= rank < size"),
    ],
    ids=["heads", "kv-heads", "vocab", "row-input", "rank"],
)
def test_shapes_that_do_not_split_are_config_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_the_generic_loader_fills_a_rank_1_model_from_a_full_checkpoint(tiny_model, arch):
    """Every parameter and shard of rank 1 of 2 is filled (the same completeness check as a real load), each
    with its slice of the checkpoint."""
    folder = tiny_model(arch)
    cfg = ModelConfig.from_dir(folder)
    tensors = load_file(folder / "model.safetensors")
    model = model_class(cfg.architecture)(cfg, RANK1)
    assert load_weights(model, tensors.items()) == expected_loads(model)
    attn = model.model.layers[1].self_attn
    q, k, _ = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes)
    q_rows, kv_rows = cfg.num_heads // 2 * cfg.head_dim, cfg.num_kv_heads // 2 * cfg.head_dim
    assert torch.equal(q, tensors["model.layers.1.self_attn.q_proj.weight"][q_rows:])
    assert torch.equal(k, tensors["model.layers.1.self_attn.k_proj.weight"][kv_rows:])
    assert torch.equal(attn.o_proj.weight, tensors["model.layers.1.self_attn.o_proj.weight"][:, q_rows:])
    vocab = cfg.vocab_size // 2
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"][vocab:])
