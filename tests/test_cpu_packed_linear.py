"""oneDNN linears over pre-packed weights (kernels/cpu/packed_linear.py, runtime/layers/cpu_packing.py): bit-equal to
``F.linear`` on the row-major weight for fresh random inputs, taken by the dispatcher, and packed at engine start
without a second copy of the weights; float32 and unsupported dtypes stay row-major and say why."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from xinf_sglang.kernels import linear
from xinf_sglang.kernels.cpu import packed_linear
from xinf_sglang.runtime.layers import cpu_packing
from xinf_sglang.runtime.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from xinf_sglang.runtime.tp.distributed import TPInfo

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (577, 576), (3, 13), (1, 8), (4099, 72)]
PACKABLE = [d for d in packed_linear.DTYPES if packed_linear.unavailable_reason(d) is None]
needs_packing = pytest.mark.skipif(not PACKABLE, reason="oneDNN packs no 16-bit dtype on this CPU")


@needs_packing
@pytest.mark.parametrize("dtype", PACKABLE)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40, 64, 257])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_equals_f_linear_bit_for_bit(dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 100003 + n * 31 + k + with_bias)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    packed = packed_linear.pack_weight(w)
    assert packed_linear.is_packed(packed) and packed.shape == (n, k) and packed.dtype == dtype
    y = linear(x, packed, b)  # through the dispatcher
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y, F.linear(x, w, b))


@needs_packing
def test_packed_takes_batched_and_strided_inputs() -> None:
    dtype = PACKABLE[0]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g).to(dtype)
    packed = packed_linear.pack_weight(w)
    x3 = torch.randn(2, 5, 64, generator=g).to(dtype)
    assert torch.equal(linear(x3, packed), F.linear(x3, w))
    wide = torch.randn(7, 100, generator=g).to(dtype)[:, :64]  # a column slice: rows not contiguous
    assert torch.equal(linear(wide, packed), F.linear(wide, w))
    assert linear(torch.empty(0, 64, dtype=dtype), packed).shape == (0, 96)


def test_float32_and_unsupported_dtypes_are_refused_with_a_reason() -> None:
    assert "float32" in packed_linear.unavailable_reason(torch.float32)
    with pytest.raises(ValueError, match="cannot pack"):
        packed_linear.pack_weight(torch.randn(4, 4))
    for dtype in packed_linear.DTYPES:
        reason = packed_linear.unavailable_reason(dtype)
        assert reason is None or isinstance(reason, str) and reason


def _block(dtype: torch.dtype) -> torch.nn.ModuleDict:
    """One decoder block's linears (no tensor parallelism), weights drawn at random."""
    tp = TPInfo()
    with torch.device("cpu"):
        mods = torch.nn.ModuleDict({
            "qkv": QKVParallelLinear(64, 16, 4, 2, True, tp),
            "gate_up": MergedColumnParallelLinear(64, [96, 96], False, tp),
            "down": RowParallelLinear(96, 64, False, tp),
        })
    g = torch.Generator().manual_seed(11)
    for p in mods.parameters():
        p.data = torch.randn(p.shape, generator=g).to(dtype)
    return mods


@needs_packing
def test_engine_packing_replaces_weights_in_place_and_keeps_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_packing.ENV_SWITCH, "1")
    dtype = PACKABLE[0]
    mods = _block(dtype)
    x = {name: torch.randn(9, m.weight.shape[1]).to(dtype) for name, m in mods.items()}
    # F.linear, not the module: at 9 rows the row-major weight takes the skinny GEMV, whose sums differ
    before = {name: F.linear(x[name], m.weight, m.bias) for name, m in mods.items()}
    row_major = {name: m.weight for name, m in mods.items()}
    line = cpu_packing.pack_cpu_linears(mods, torch.device("cpu"), dtype)
    assert line.startswith("3 dense weights")
    for name, m in mods.items():
        assert m.weight.is_mkldnn and not m.weight.requires_grad
        assert m.weight.param_layout is row_major[name].param_layout  # what the loaders read stays
        assert torch.equal(m(x[name]), before[name])
    assert {p.data_ptr() for p in mods.parameters() if not p.is_mkldnn}.isdisjoint(
        {w.data_ptr() for w in row_major.values()})  # the module holds no row-major copy


def test_engine_packing_says_why_it_did_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_packing.ENV_SWITCH, "1")
    mods = _block(torch.float32)
    assert "float32" in cpu_packing.pack_cpu_linears(mods, torch.device("cpu"), torch.float32)
    assert not any(p.is_mkldnn for p in mods.parameters())
    monkeypatch.delenv(cpu_packing.ENV_SWITCH)  # the default
    assert "off" in cpu_packing.pack_cpu_linears(_block(torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    assert cpu_packing.pack_cpu_linears(mods, torch.device("meta"), torch.float32) == "not on the CPU"


@needs_packing
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases through the packed path
def test_engine_greedy_tokens_do_not_change_with_packing(tiny_model, arch: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """20 requests decode together (over the 16 rows of the skinny GEMV, so both runs take oneDNN): packed and
    row-major weights give the same tokens."""
    from .engine_helpers import engine_greedy, varied_prompts

    model = tiny_model(arch)
    prompts = varied_prompts(model, 20, max_len=40)
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_packing.ENV_SWITCH, switch)
        runs.append(engine_greedy(model, prompts, 8, dtype=PACKABLE[0].__repr__().removeprefix("torch.")))
    assert runs[0] == runs[1]
