"""bench/gpu_check.py --smoke: the device check's plumbing on CPU (every section runs, the JSON is complete, and the
8-rank projection really measures rank 0's eighth of the work)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR", "PYENV_ROOT") if k in os.environ}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TORCH_COMPILE_DISABLE="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and "unmeasured on GPU" in res["device"]
    assert res["attention"]["chosen"] == "sdpa" and res["attention"]["fwd_bwd_ms"]["sdpa"] > 0
    assert res["fused_kernels"]["kernels"] == ["mlp", "ce"] and res["fused_kernels"]["note"] == "unmeasured: no GPU"
    train = res["train_1gpu_preset"]
    assert train["steps"] == 2 and train["ms_per_step"] > 0 and train["compile_s"] >= 0
    assert any(l.startswith("compile_warmup steps:2 qat_variants:1 loop_variants:2") for l in train["log_tail"])
    assert res["attention"]["doc_mask"] is True
    assert res["train_step_loop"]["on"]["ms_per_step"] > 0 and res["train_step_loop"]["off"]["ms_per_step"] > 0
    proj = res["eval_projection_8ranks"]
    for phase in ("roundtrip_plain", "sliding_diagnostic", "adaptive_pass"):
        p = proj[phase]
        # rank 0 of 8 scores exactly its slice of every chunk's windows: an eighth, rounded down per chunk
        assert p["windows_1rank"] // 8 - 2 <= p["windows_rank0_of_8"] <= p["windows_1rank"] / 8, (phase, p)
        assert p["one_rank_share_s"] >= p["comm_modelled_s"] > 0 and p["naive_div8_s"] > 0
    assert proj["adaptive_pass"]["ttt_seqs_per_chunk_rank0_of_8"] == proj["adaptive_pass"]["ttt_seqs_per_chunk_1rank"] // 8
    lora = proj["docs_lora_pass"]  # the frontier's pass, projected beside the stream pass (not in the total)
    assert lora["one_rank_share_s"] > 0 and lora["naive_div8_s"] > 0 and lora["sample_docs"] > 0
    assert lora["sample_phases"] == sorted(set(lora["sample_phases"])) and min(lora["sample_phases"]) >= 1
    total = proj["total"]
    assert abs(total["one_rank_share_s"] - sum(proj[k]["one_rank_share_s"] for k in
                                               ("roundtrip_plain", "sliding_diagnostic", "adaptive_pass", "ngram_build"))) < 1e-6
    assert proj["assumptions"]["busbw_gbs"] == 200.0
