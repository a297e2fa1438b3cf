"""benchmarks/profile_dit.py: kernel names fall in the right category, and a CPU run of the tiny model
accounts for all of its time."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import profile_dit  # noqa: E402


@pytest.mark.parametrize("name, category", [
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("sparse_block_attention_kernel", "attention"),
    ("pool_blocks_kernel", "attention"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("_rms_norm_kernel", "fused element-wise"),
    ("_gated_residual_kernel", "fused element-wise"),
    ("_residual_layer_norm_kernel", "fused element-wise"),
    ("nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_gelubias_TNT", "matmul"),
    ("void at::native::elementwise_kernel<128, 4>", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_kernel_categories(name, category):
    assert profile_dit.category_of(name) == category


def test_linear_flops_of_one_block():
    class Config:
        dim, ffn_dim, num_layers = 4, 8, 1

    # per token: 6 dim^2 + 2 dim ffn = 96 + 64 = 160 multiply-adds; text rows: 2 dim^2 = 32
    assert profile_dit.linear_flops(Config, tokens=10, text_len=3, batch=2) == 2.0 * 2 * (10 * 160 + 3 * 32)


def test_tiny_cpu_profile_accounts_for_every_op(tmp_path):
    out = tmp_path / "profile.json"
    script = os.path.join(ROOT, "benchmarks", "profile_dit.py")
    result = subprocess.run([sys.executable, script, "--tiny", "--frames", "5", "--height", "64", "--width", "64",
                             "--backend", "torch", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    categories = report["category_seconds"]
    assert set(categories) == {"attention", "matmul", "fused element-wise", "other"}
    assert sum(categories.values()) == pytest.approx(report["kernel_seconds"])
    assert categories["matmul"] > 0 and categories["attention"] > 0
    assert report["outside_attention_seconds"] == pytest.approx(report["kernel_seconds"] - categories["attention"])
