"""ops.cpu: whether bf16 matmuls pay on this CPU."""

import pytest

from codexmini.ops import cpu


def test_bf16_never_pays_without_a_native_multiply_and_the_override_decides_otherwise(monkeypatch):
    cpu.bf16_matmul_pays.cache_clear()
    monkeypatch.setenv(cpu.ENV, "1")
    assert cpu.bf16_matmul_pays(8, 16, 8, native=False) is False  # emulated bf16: the override cannot make it pay
    assert cpu.bf16_matmul_pays(8, 16, 8, native=True) is True
    cpu.bf16_matmul_pays.cache_clear()
    monkeypatch.setenv(cpu.ENV, "0")
    assert cpu.bf16_matmul_pays(8, 16, 8, native=True) is False
    cpu.bf16_matmul_pays.cache_clear()
    monkeypatch.setenv(cpu.ENV, "yes")
    with pytest.raises(ValueError, match="CODEXMINI_CPU_BF16='yes': set it to 0"):
        cpu.bf16_matmul_pays(8, 16, 8, native=True)
    cpu.bf16_matmul_pays.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_the_measurement_answers_a_bool_and_is_kept(monkeypatch, native):
    monkeypatch.delenv(cpu.ENV, raising=False)
    cpu.bf16_matmul_pays.cache_clear()
    first = cpu.bf16_matmul_pays(64, 64, 64, native=native)
    assert isinstance(first, bool) and cpu.bf16_matmul_pays(64, 64, 64, native=native) is first
    assert cpu.bf16_matmul_pays.cache_info().hits >= 1
    cpu.bf16_matmul_pays.cache_clear()
