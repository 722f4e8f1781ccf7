"""``python -m comfy.quant bench``: the small suite end to end through the CLI (CPU), and the pieces it rests on."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from comfy.quant_tools import bench, cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    md, js = d / "bench.md", d / "bench.json"
    assert cli.main(["bench", "--small", "--markdown", str(md), "--json", str(js)]) == 0
    return md.read_text(encoding="utf-8"), json.loads(js.read_text(encoding="utf-8"))


def positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_report_has_header_and_every_section(run):
    md, data = run
    assert md.startswith("## int4 benchmark: ")
    header = md.splitlines()[2]
    for part in ("compute capability", "torch ", "triton ", "comfy-kitchen ", "python ", data["info"]["date"],
                 "kernels (auto): svdquant_w4a4 "):
        assert part in header, part
    for title in ("### AWQ W4A16", "### SVDQuant W4A4", "### Qwen-Image transformer: 2 blocks",
                  "### LoRA on the int4 model (28 layers)"):
        assert title in md, title
    assert "`python -m comfy.quant bench --small` (small suite" in md
    if "triton" not in data["info"]["kernels"].values():  # no project kernel here: the report says so
        assert "Note: the int4 column is kitchen's" in md


def test_linear_rows_have_finite_positive_times(run):
    rows = run[1]["rows"]
    awq = [r for r in rows if r["section"] == "awq"]
    w4a4 = [r for r in rows if r["section"] == "w4a4"]
    s = bench.SMALL
    assert [r["M"] for r in awq] == list(s.awq_m)
    assert len(w4a4) == len(s.w4a4) * len(s.w4a4_m) * len(s.ranks) * len(s.loras)
    assert {(r["rank"], r["loras"]) for r in w4a4} == {(r, n) for r in s.ranks for n in s.loras}
    for r in awq + w4a4:
        for key in ("int4_us", "kitchen_us", "bf16_us", "bf16/int4", "kitchen/int4"):
            assert positive(r[key]), (r, key)
        assert r["fp8_us"] is None or positive(r["fp8_us"])
        assert set(r["methods"]) == {"int4", "kitchen", "bf16", "fp8"}
        assert r["methods"]["int4"] in ("graph", "events", "perf_counter")
    # bf16 / FP8 are measured once per (M, K, N) and shared by the rank and LoRA rows
    by_shape = {}
    for r in w4a4:
        by_shape.setdefault((r["M"], r["K"], r["N"]), set()).add(r["bf16_us"])
    assert all(len(v) == 1 for v in by_shape.values())


def test_model_and_lora_sections(run):
    data = run[1]
    bf16, int4, with_lora = model = [r for r in data["rows"] if r["section"] == "model"]
    assert [r["model"] for r in model] == ["bf16", "int4", "int4 + LoRA r64 on 28 layers"]
    for r in model:
        assert positive(r["forward_ms"]) and positive(r["weights_gib"]) and r["peak_gib"] is None  # CPU: no peak
    assert int4["weights_gib"] < bf16["weights_gib"] and int4["weights_gib"] < with_lora["weights_gib"]
    assert math.isfinite(with_lora["lora_overhead_pct"])
    lora = data["lora"]
    assert lora["layers"] == 28
    for key in ("load_patch_s", "strength_change_s", "unpatch_s"):
        assert positive(lora[key]), key
    assert lora["restored_bit_exact"] and lora["tensors_restored"] and lora["base_deterministic"]


def test_markdown_is_the_printed_report_and_the_json_holds_it(run):
    md, data = run
    assert bench.format_report(data, "python -m comfy.quant bench --small") == md


def test_only_and_iters(tmp_path, capsys):
    out = tmp_path / "awq.json"
    assert cli.main(["bench", "--only", "awq", "--iters", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### AWQ W4A16" in printed and "### SVDQuant" not in printed and "### Qwen-Image" not in printed
    assert "--only awq --iters 2" in printed
    assert {r["section"] for r in json.loads(out.read_text())["rows"]} == {"awq"}


@pytest.mark.parametrize("args", [["--only", "awq,nope"], ["--iters", "0"], ["--markdown", "SAME", "--json", "SAME"],
                                  ["--json", "no/such/dir/out.json"]])
def test_refusals_before_any_work(tmp_path, args, capsys):
    args = [str(tmp_path / "same.md") if a == "SAME" else a for a in args]
    assert cli.main(["bench", *args]) == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_awq_dequantized_is_what_the_layer_computes():
    g = torch.Generator().manual_seed(3)
    lin = bench.int4_linear(bench.awq_tensors(128, 256, g), 128, 256, g)
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    ref = F.linear(x.float(), bench.awq_dequantized(lin).float(), lin.bias.float())
    assert torch.allclose(lin(x).float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_fp8_gemm_matches_bf16():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(64, 128, generator=g).to(torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    for m in (3, 16):
        x = torch.randn(m, 128, generator=g).to(torch.bfloat16)
        calls, note = bench.fp8_calls([w], [b], [x])
        assert calls, note
        out, ref = calls[0]()[:m].float(), F.linear(x.float(), w.float())
        assert (out - ref).norm() / ref.norm() < 0.1


def test_weight_bytes_counts_shared_tensors_once():
    g = torch.Generator().manual_seed(5)
    shared = {}
    q, k = (bench.int4_linear(bench.svdquant_tensors(64, 128, 16, g, shared=shared), 64, 128, g) for _ in range(2))
    one = bench.weight_bytes([q.weight])
    side = sum(t.numel() * t.element_size() for t in shared.values())
    assert bench.weight_bytes([q.weight, k.weight]) == 2 * one - side
    assert one == 64 * 64 + (2 * 64 + 128 * 16 + 64 * 16 + 128) * 2  # codes, scales, down, up, smooth


def test_time_us_on_cpu():
    t, method = bench.time_us([lambda: torch.ones(8).sum()] * 2, 3, torch.device("cpu"))
    assert method == "perf_counter" and positive(t)


def test_rows_time_the_project_kernel_where_the_default_choice_picks_it(monkeypatch):
    """With the project's kernels picked (as on Hopper; here under Triton's interpreter) the int4 column is
    measured on its own; with kitchen's picked it is kitchen's measurement."""
    from comfy.quant import kernels

    if kernels.unavailable_reason("triton_awq") is not None:
        pytest.skip(f"project kernels unavailable: {kernels.unavailable_reason('triton_awq')}")
    g, cpu = torch.Generator().manual_seed(6), torch.device("cpu")
    layers = [bench.int4_linear(bench.awq_tensors(64, 128, g), 64, 128, g) for _ in range(2)]
    xs = bench._inputs(2, 128, 2, g)
    floats = {"bf16_us": 1.0, "fp8_us": None, "methods": {"bf16": "perf_counter", "fp8": "n/a"}, "note": ""}
    base = {"section": "awq", "case": "awq", "M": 2, "K": 128, "N": 64, "rank": None, "loras": 0}
    row = bench.linear_row(base, layers, xs, floats, 2, cpu)
    assert row["int4_kernel"] == "kitchen" and row["int4_us"] == row["kitchen_us"]
    monkeypatch.setattr(kernels, "_hopper", lambda device: True)
    assert bench.project_kernel(layers[0], xs[0])
    row = bench.linear_row(base, layers, xs, floats, 2, cpu)
    assert row["int4_kernel"] == "project" and positive(row["int4_us"]) and row["int4_us"] != row["kitchen_us"]
    assert bench.run_info(cpu)["kernel_note"] == ""
