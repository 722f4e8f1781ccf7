"""Integration: this project inside a patched copy of real upstream ComfyUI (commit 4f874c5), on CPU.

Each test runs one scenario of ``upstream_scenarios.py`` in a subprocess (``upstream_env.run_in_comfyui``)
and asserts here, against expectations computed in this process from the files it wrote with this
repository's code. Skipped when the upstream tree is absent (``$COMFYUI_PATH`` or
``../shared/upstream/ComfyUI``) and, for the patched copy, until ``comfy/quant_tools/upstream/comfyui.patch``
exists.
"""
from __future__ import annotations

import pytest
import torch

import upstream_env as U
from upstream_env import comfyui, comfyui_unpatched, models, upstream_source  # noqa: F401 (fixtures)


def test_smoke_unpatched_upstream_imports_on_cpu(comfyui_unpatched, models, tmp_path):
    """Plain upstream imports its diffusion path on CPU with the stand-ins, folder_paths finds the test's
    files, and it cannot load the int4 file (so what the patched copy does is the patch's doing)."""
    r = U.run_in_comfyui(comfyui_unpatched.path, "smoke", tmp_path, models_dir=models.dir, try_load=models.int4_name)
    assert not r["errors"], U.format_errors(r["errors"])
    assert all(r["node_classes"].values()), r["node_classes"]
    assert r["torch_device"] == "cpu"
    assert not r["has_comfy_quant"]
    assert set(r["diffusion_models"]) >= {models.int4_name, models.nunchaku_name}
    assert set(r["loras"]) >= {lf.name for lf in models.loras.values()}
    assert r["output_directory"] == str(tmp_path / "output")
    assert r["plain_load"] != "loaded", "unpatched upstream loaded the int4 file"


# ------------------------------------------------------------------------------------ patched copy
LAYOUTS = {"svdquant_w4a4": "TensorCoreSVDQuantW4A4Layout", "awq_w4a16": "TensorCoreAWQW4A16Layout"}
REQUIRED_JSON = {"svdquant_w4a4": ("format", "act_unsigned", "rank", "group_size"),
                 "awq_w4a16": ("format", "group_size")}
UNTOUCHED = "transformer_blocks.0.attn.add_q_proj"   # an int4 layer no LoRA targets
QKV = ("to_q", "to_k", "to_v")


def _inputs(layers, seed, shape=(2, 5)):
    """A seeded fp32 input per layer; GELU-shaped where the layer quantizes its input unsigned."""
    import lora_helpers as H
    return {p: H.rand_input((*shape, U.in_features(t)), torch.float32, seed + 17 * i,
                            gelu=bool(c.get("act_unsigned")))
            for i, (p, (t, c)) in enumerate(sorted(layers.items()))}


def _save(tensors, path):
    import safetensors.torch
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_upstream_unit_tests_stay_green(comfyui):
    """Upstream's own tests-unit/comfy_quant pass in the patched copy."""
    run = comfyui.unit_tests
    print(f"[upstream unit tests] {run.summary} ({comfyui.installed})")
    assert run.returncode == 0, run.output_tail


def test_unet_loader_int4_layers_match_host_and_reference(comfyui, models, tmp_path):
    """``nodes.UNETLoader().load_unet(name, "default")`` on the int4 Qwen-Image file and on the Nunchaku file:

    * the int4 layers are exactly the file's (Nunchaku: the split layers the conversion must give), each a
      ``MixedPrecisionOps.Linear`` whose weight is a kitchen ``QuantizedTensor`` (the one upstream's
      ``comfy.quant_ops`` re-exports) of the format's layout, with the file's act_unsigned / rank / group_size;
    * every int4 layer's output on a seeded input (2×5 rows) is within ``kernel_tolerance(Σ|terms|, dtype, k)``
      of the float64 reference computed from the STORED tensors (``reference.svdquant_forward`` /
      ``awq_forward``; Nunchaku: from the natural tensors the file was packed from), k = K (+ R for the
      low-rank branch) accumulated products; and within twice that of THIS repository's host
      (``comfy.sd.load_diffusion_model`` of the same file, same inputs, same dtype, one thread): both are
      within the bound of the same reference. (They are in fact expected bit-equal: same kernels.)
    """
    from reference import kernel_tolerance
    expected = {"int4": models.int4_layers, "nunchaku": models.nunchaku_layers}
    inputs = {}
    for tag, layers in expected.items():
        inputs.update({f"{tag}:{p}": x for p, x in _inputs(layers, 1000 if tag == "int4" else 2000).items()})
    r = U.run_in_comfyui(comfyui.path, "load", tmp_path, models_dir=models.dir,
                         inputs=_save(inputs, tmp_path / "inputs.safetensors"),
                         files={"int4": models.int4_name, "nunchaku": models.nunchaku_name})
    assert not r["errors"], U.format_errors(r["errors"])
    got = U.scenario_tensors(r)
    for tag, layers in expected.items():
        info = r["files"][tag]
        assert set(info["layers"]) == set(layers), (f"{tag}: int4 layers differ; missing "
                                                    f"{sorted(set(layers) - set(info['layers']))}, extra "
                                                    f"{sorted(set(info['layers']) - set(layers))}")
        for p, li in info["layers"].items():
            conf = layers[p][1]
            assert li["module_class"].endswith("MixedPrecisionOps.Linear"), (p, li["module_class"])
            assert li["is_upstream_quantized_tensor"] and li["is_kitchen_quantized_tensor"], (p, li)
            assert li["layout"] == LAYOUTS[conf["format"]], (p, li["layout"], conf)
            for key in ("act_unsigned", "rank", "group_size"):
                if key in conf and key in li:
                    assert li[key] == conf[key], (p, key, li[key], conf[key])
        dtype = U.dtype_from_name(info["dtype"])
        xs = {p: got[f"x.{tag}:{p}"] for p in layers}
        name = models.int4_name if tag == "int4" else models.nunchaku_name
        host = U.host_layer_outputs(models.path(name), xs, dtype)
        worst_ref = worst_host = 0.0
        bit_equal = 0
        for p, (t, conf) in layers.items():
            y = got[f"y.{tag}:{p}"]
            ref, mag = U.int4_reference(xs[p], t, conf, dtype)
            tol = kernel_tolerance(mag, dtype, U.accumulation_length(t, conf))
            err = (y.double() - ref).abs()
            assert bool((err <= tol).all()), f"{tag} {p}: vs float64 reference err/tol {U.worst_ratio(err, tol):.3f}"
            err_h = (y.double() - host[p].double()).abs()
            assert bool((err_h <= 2 * tol).all()), f"{tag} {p}: vs host err/tol {U.worst_ratio(err_h, 2 * tol):.3f}"
            worst_ref = max(worst_ref, U.worst_ratio(err, tol))
            worst_host = max(worst_host, U.worst_ratio(err_h, 2 * tol))
            bit_equal += bool(torch.equal(y, host[p]))
        print(f"[load {tag}] {len(layers)} int4 layers, dtype {info['dtype']}; worst err/bound vs reference "
              f"{worst_ref:.3g}, vs host {worst_host:.3g}; bit-equal to host: {bit_equal}/{len(layers)}")


STRENGTHS = {"A": 0.8, "A2": -0.5, "B": 1.2}
# which LoRA (and strength key) each recorded tag of the lora scenario carries
LORA_TAGS = {"A1": ("A", "A"), "A2": ("A", "A"), "As2": ("A", "A2"), "B": ("B", "B"), "LoraLoader": ("A", "A"),
             "bypass": ("A", "A")}


def _delta_check(models, what, got, base, x, layer, lora_key, strength, dtype):
    """|(y_p − y_u) − s·(x Aᵀ)Bᵀ| ≤ lora_helpers.delta_tolerance (derivation: its module docstring); also asserts
    the bound is tight enough to catch a 10 % (fp32) / 50 % (bf16) error in the delta.
    Returns (worst err/tol, tol)."""
    import lora_helpers as H
    t, conf = models.int4_layers[layer]
    lf = models.loras[lora_key]
    up, down = lf.factors[layer]
    delta, mag_d = H.lowrank_delta(x, up, down, lf.scale(strength))
    mag_b = U.int4_reference(x, t, conf, dtype)[1]
    tol = H.delta_tolerance(got, base, mag_b, mag_d, dtype, 2 * U.in_features(t))
    fp32 = dtype == torch.float32
    H.assert_delta(got.double() - base.double(), delta, tol, discriminate=0.1 if fp32 else 0.5,
                   min_frac=0.5 if fp32 else 0.25, what=what)
    return U.worst_ratio((got.double() - base.double() - delta).abs(), tol), tol


def test_lora_nodes_clones_strength_and_unpatch(comfyui, models, tmp_path):
    """LoRA A (diffusers names, rank 4, alpha 2) and LoRA B (kohya names, rank 8, alpha 8) on block 0's
    to_q / to_k / to_v / to_out.0 (SVDQuant, signed), block 1's img_mlp.net.2 (SVDQuant, unsigned) and
    img_mod.1 (AWQ), through upstream's nodes, each made current with ``load_models_gpu([patcher])``:

    * ``LoraLoaderModelOnly`` (A at 0.8: clone A), a second clone with B at 1.2, clone A again, A at −0.5
      through the same node instance (strength change), ``LoraLoader`` with clip None (A at 0.8) and
      ``LoraLoaderBypass`` with clip None (A at 0.8): each probed layer's output − the unpatched output
      equals s·(x Aᵀ)Bᵀ, s = strength·alpha/rank, in float64 within ``lora_helpers.delta_tolerance``
      (the main path cancels; output rounding u·(|y_p|+|y_u|); 4u·Σ|Δ terms| for the factors' and the
      intermediate's roundings; (2K+4)·2⁻²⁴·Σ|all terms| for fp32 accumulation), both for a direct call of
      each layer AND for the q/k/v the attention computes itself (the grouped path: captured at norm_q /
      norm_k's input and as the attn1_patch's v);
    * the bypass LoRA's grouped q/k/v agree with the delta path's within the sum of the two bounds (the
      grouped forward must call the bypass-wrapped forward); an int4 layer no LoRA targets is unchanged bit
      for bit;
    * clone A's outputs repeat bit-exactly after clone B was used; every LoRA key lands (6 patched keys per
      delta-path clone, the bypass as one injection set, no "NOT LOADED" / "not applied" warning);
    * after ``unload_all_models()``: every state-dict tensor bit-identical to before (torch.equal, same
      dtype), outputs bit-identical to the unpatched ones, and q/k/v (both streams, every block) share one
      smoothing factor and one proj_down (same data_ptr as before).
    """
    from comfy.quant_tools.demo import demo_inputs
    probes = [*U.LORA_TARGETS, UNTOUCHED]
    xs = _inputs({p: models.int4_layers[p] for p in probes}, 3000)
    mx, mt, mctx = demo_inputs(U.int4_config(), seed=5)
    inputs = {f"x:{p}": x for p, x in xs.items()} | {"model.x": mx, "model.t": mt, "model.context": mctx}
    r = U.run_in_comfyui(comfyui.path, "lora", tmp_path, models_dir=models.dir, model=models.int4_name,
                         inputs=_save(inputs, tmp_path / "inputs.safetensors"), probes=probes, attention_block=0,
                         loras={k: lf.name for k, lf in models.loras.items()}, strengths=STRENGTHS)
    assert not r["errors"], U.format_errors(r["errors"])
    not_loaded = {k: [w for w in v if any(m in w for m in ("NOT LOADED", "not in model", "not applied"))]
                  for k, v in r["warnings"].items()}
    assert not any(not_loaded.values()), not_loaded
    delta_tags = {t: len(U.LORA_TARGETS) for t in LORA_TAGS if t != "bypass"}
    assert r["patch_counts"] == {"base": 0, "bypass": 0} | delta_tags, r["patch_counts"]
    assert r["bypass_injections"] == ["bypass_lora"], r["bypass_injections"]
    got = U.scenario_tensors(r)
    dtype = U.dtype_from_name(r["dtype"])
    ax = got["attn.x"]
    qkv_layers = {n: f"transformer_blocks.0.attn.{n}" for n in QKV}
    worst, tols = {}, {}
    for tag, (lora_key, s_key) in LORA_TAGS.items():
        for p in U.LORA_TARGETS:
            worst[(tag, p)], _ = _delta_check(models, f"{tag} {p}", got[f"{tag}:{p}"], got[f"base:{p}"],
                                                 got[f"x:{p}"], p, lora_key, STRENGTHS[s_key], dtype)
        for n, layer in qkv_layers.items():
            worst[(tag, "grouped " + n)], tols[(tag, n)] = _delta_check(
                models, f"{tag} grouped {n}", got[f"{tag}:grouped.{n}"], got[f"base:grouped.{n}"], ax, layer,
                lora_key, STRENGTHS[s_key], dtype)
        assert torch.equal(got[f"{tag}:{UNTOUCHED}"], got[f"base:{UNTOUCHED}"]), f"{tag}: untouched layer changed"
    for n in QKV:  # bypass vs delta path on the grouped q/k/v
        diff = (got[f"bypass:grouped.{n}"].double() - got[f"A1:grouped.{n}"].double()).abs()
        bound = tols[("bypass", n)] + tols[("A1", n)]
        assert bool((diff <= bound).all()), f"bypass vs delta path {n}: err/tol {U.worst_ratio(diff, bound):.3f}"
        worst[("bypass vs A1", n)] = U.worst_ratio(diff, bound)
    repeat = [k for k in got if k.startswith("A1:") and not torch.equal(got[k], got["A2:" + k[3:]])]
    assert not repeat, f"clone A's outputs changed after clone B was used: {repeat}"
    restored = [k for k in got if k.startswith("base:") and not torch.equal(got[k], got["after:" + k[5:]])]
    assert not restored, f"outputs after unload differ from the unpatched ones: {restored}"
    un = r["unpatch"]
    assert not (un["differ"] or un["missing"] or un["added"]), f"state dict after unpatch: {un}"
    for group, ptrs in r["shared_after"].items():
        for attr, ids in ptrs.items():
            assert None not in ids and len(set(ids)) == 1, f"{group} {attr}: not shared after unpatch {ids}"
            assert ids == r["shared_before"][group][attr], f"{group} {attr}: other tensors than before"
    assert r["shared_after"], "no q/k/v groups found"
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    print(f"[lora] dtype {r['dtype']}, {len(worst)} delta checks; worst err/bound: "
          + ", ".join(f"{k[0]} {k[1]} {v:.3g}" for k, v in top) + "; bypass vs delta path (grouped q/k/v) "
          + f"{max(v for k, v in worst.items() if k[0] == 'bypass vs A1'):.3g}; {un['count']} state-dict tensors restored")


def test_sample_euler_runs(comfyui, models, tmp_path):
    """``comfy.sample.sample`` (euler, simple schedule, 3 steps, cfg 2) on an empty 8×8 latent (made 5-D by
    ``comfy.sample.fix_empty_latent_channels``, as the KSampler node does) with random
    conditioning of the model's text width in upstream's format ``[[tensor (1, L, 256), {}]]``, positive and
    negative: finite output of the latent's shape; the same call again gives bit-identical output; with LoRA A
    (``LoraLoaderModelOnly`` at 0.8) the output differs from the base one."""
    cfg = U.int4_config()
    g = torch.Generator().manual_seed(77)
    inputs = {"latent": torch.zeros(1, 16, 8, 8),
              "positive": torch.randn(1, cfg.text_tokens, cfg.joint_attention_dim, generator=g),
              "negative": torch.randn(1, cfg.text_tokens, cfg.joint_attention_dim, generator=g)}
    r = U.run_in_comfyui(comfyui.path, "sample", tmp_path, models_dir=models.dir, model=models.int4_name,
                         inputs=_save(inputs, tmp_path / "inputs.safetensors"), lora=models.loras["A"].name,
                         strength=0.8, steps=3, cfg=2.0, sampler="euler", scheduler="simple", seed=42)
    assert not r["errors"], U.format_errors(r["errors"])
    got = U.scenario_tensors(r)
    assert r["latent_shape"] == [1, 16, 1, 8, 8]  # fix_empty_latent_channels: Qwen-Image latents are 3-D (T = 1)
    for tag in ("base", "lora", "base_again"):
        assert list(got[tag].shape) == r["latent_shape"], (tag, got[tag].shape)
        assert bool(torch.isfinite(got[tag]).all()), tag
    assert torch.equal(got["base"], got["base_again"]), "sampling is not repeatable"
    change = float((got["lora"] - got["base"]).abs().max() / got["base"].abs().max())
    assert change > 1e-3, f"the LoRA did not change the sample (max relative change {change:.2e})"
    print(f"[sample] dtype {r['dtype']}: base |x| max {float(got['base'].abs().max()):.3g}, LoRA changes it by "
          f"{change:.3g} (max, relative); seconds {r['seconds']}")


def test_save_reload_bit_identical_with_full_layer_json(comfyui, models, tmp_path):
    """For the int4 file and the Nunchaku file, loaded with UNETLoader: the diffusion model's ``state_dict()``
    through ``comfy.utils.save_torch_file``, and the model through upstream's ``ModelSave`` node (→
    ``comfy.sd.save_checkpoint``): each saves (no safetensors "Some tensors share memory" error: q/k/v share
    tensors in memory), every int4 layer's ``comfy_quant`` JSON in the file carries the layer's full config
    (format, act_unsigned, rank, group_size for SVDQuant; format, group_size for AWQ) equal to the source's,
    and the file reloads through UNETLoader with every state-dict tensor bit-identical (torch.equal, same
    dtype and shape) to the model that was saved, the same int4 layers and layouts."""
    expected = {"int4": models.int4_layers, "nunchaku": models.nunchaku_layers}
    r = U.run_in_comfyui(comfyui.path, "save", tmp_path, models_dir=models.dir,
                         files={"int4": models.int4_name, "nunchaku": models.nunchaku_name})
    assert not r["errors"], U.format_errors(r["errors"])
    for tag, layers in expected.items():
        info = r["files"][tag]
        assert set(info["layers"]) == set(layers), tag
        assert set(info["saved"]) == {"save_torch_file", "ModelSave"}, info["saved"].keys()
        for how, entry in info["saved"].items():
            what = f"{tag} via {how}"
            assert set(entry["comfy_quant"]) == set(layers), (what, sorted(set(layers) ^ set(entry["comfy_quant"])))
            for p, saved in entry["comfy_quant"].items():
                conf = layers[p][1]
                missing = [k for k in REQUIRED_JSON[conf["format"]] if k not in saved]
                assert not missing, f"{what} {p}: comfy_quant lacks {missing}: {saved}"
                assert {k: saved[k] for k in conf} == conf, f"{what} {p}: {saved} != {conf}"
            cmp = entry["compare"]
            assert not (cmp["differ"] or cmp["missing"] or cmp["added"]), f"{what} reloaded: {cmp}"
            assert {p: li["layout"] for p, li in entry["layers"].items()} == \
                {p: LAYOUTS[c["format"]] for p, (_, c) in layers.items()}, what
        print(f"[save {tag}] {len(layers)} int4 layers; " + "; ".join(
            f"{how}: {e['compare']['count']} tensors bit-identical, key prefix {e['key_prefix']!r}"
            for how, e in info["saved"].items()))


# ------------------------------------------------------------------------------------ hostile input
def _hostile_models(models, d):
    """A models folder of edited copies of the int4 file and the LoRA A file, one flaw each."""
    import shutil

    import safetensors.torch
    (d / "diffusion_models").mkdir(parents=True)
    (d / "loras").mkdir()
    good = models.path(models.int4_name)
    shutil.copy(good, d / "diffusion_models" / "good.safetensors")
    with safetensors.safe_open(str(good), "pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def edited(name, edit):
        t = {k: v.clone() for k, v in sd.items()}
        edit(t)
        safetensors.torch.save_file(t, str(d / "diffusion_models" / name), metadata=meta)
        return name

    data = good.read_bytes()
    (d / "diffusion_models" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "diffusion_models" / "garbage.safetensors").write_bytes(b"\x07" * 300)
    layer = "transformer_blocks.0.attn.to_out.0"
    files = {
        "truncated": "truncated.safetensors", "garbage": "garbage.safetensors",
        "missing bias": edited("no-bias.safetensors", lambda t: t.pop(f"{layer}.bias")),
        "stray module": edited("stray.safetensors", lambda t: t.__setitem__("transformer_blocks.0.attn.to_z.weight",
                                                                            torch.zeros(4, 4))),
        "nan scale": edited("nan-scale.safetensors", lambda t: t[f"{layer}.weight_scale"].view(-1)[3].fill_(float("nan"))),
    }
    raw = (models.dir / "loras" / models.loras["A"].name).read_bytes()
    (d / "loras" / "corrupt.safetensors").write_bytes(raw[: len(raw) // 3])
    _hostile_lora(models, d / "loras" / "mixed.safetensors")
    shutil.copy(models.dir / "loras" / models.loras["A"].name, d / "loras" / "good.safetensors")
    return files


UPSTREAM_UNREADABLE = ("SafetensorError", "ValueError")  # load_torch_file: raw, or with its file-naming hints
HOSTILE_LORA = {"transformer_blocks.0.attn.to_q": "nan factor", "transformer_blocks.0.attn.to_k": "inf factor"}


def _hostile_lora(models, path):
    """LoRA A's modules, with a NaN in to_q's down factor and an Inf in to_k's up factor (both int4 targets)."""
    import safetensors.torch

    import lora_helpers as H
    sd = {}
    for p, (up, down) in models.loras["A"].factors.items():
        if p == "transformer_blocks.0.attn.to_q":
            down = down.clone()
            down[0, 0] = float("nan")
        if p == "transformer_blocks.0.attn.to_k":
            up = up.clone()
            up[1, 0] = float("inf")
        sd.update(H.lora_sd("diffusers", p, up, down, models.loras["A"].alpha))
    safetensors.torch.save_file(sd, str(path))


def test_hostile_files_through_upstream_loaders(comfyui, models, tmp_path):
    """UNETLoader and the LoRA loaders of the patched upstream meet bad int4 files with the project's errors,
    naming the file (a missing bias, a stray module, a NaN scale); an unreadable file (truncated, garbage)
    gets upstream's own error naming the path, as for any file; bad patches on int4 targets (NaN / Inf
    factors, a non-finite or huge strength) are refused one by one, nothing raises and nothing bad is
    patched; the good file and LoRA load (negative controls)."""
    d = tmp_path / "models"
    files = _hostile_models(models, d)
    r = U.run_in_comfyui(comfyui.path, "hostile", tmp_path, models_dir=d, model="good.safetensors",
                         files={"good": "good.safetensors", **files}, corrupt_lora="corrupt.safetensors",
                         loras={"good": ["good.safetensors", 1.0], "mixed": ["mixed.safetensors", 1.0],
                                "nan strength": ["good.safetensors", float("nan")],
                                "huge strength": ["good.safetensors", 1e30],
                                "corrupt": ["corrupt.safetensors", 1.0]})
    assert not r["errors"], U.format_errors(r["errors"])
    out = r["files"]
    assert out["good"]["outcome"] == "ok", out["good"]
    for tag in ("truncated", "garbage"):  # upstream's load_torch_file errors, unchanged by the patch
        got = out[tag]
        assert got["outcome"] == "error" and got["type"] in UPSTREAM_UNREADABLE, (tag, got)
        assert "QuantFileError" not in got["classes"], (tag, got)
    expected = {"missing bias": "IncompleteModelError", "stray module": "IncompleteModelError",
                "nan scale": "QuantizedLayerError"}
    for tag, cls in expected.items():
        got = out[tag]
        assert got["outcome"] == "error" and got["type"] == cls, (tag, got)
        assert "QuantFileError" in got["classes"] and "ValueError" in got["classes"], (tag, got)
        assert files.get(tag, "") in got["message"], (tag, got)
    assert "to_out.0.bias" in out["missing bias"]["message"] and "to_z.weight" in out["stray module"]["message"]
    assert "weight_scale" in out["nan scale"]["message"]
    direct = r["lora_file_direct"]
    assert direct["type"] in UPSTREAM_UNREADABLE and "QuantFileError" not in direct["classes"], direct
    loras = r["loras"]
    every = sorted(f"diffusion_model.{p}.weight" for p in U.LORA_TARGETS)
    assert loras["good"] == {"outcome": "ok", "value": every}, loras["good"]  # control
    valid = [k for k in every if k[len("diffusion_model."):-len(".weight")] not in HOSTILE_LORA]
    assert loras["mixed"] == {"outcome": "ok", "value": valid}, loras["mixed"]  # the rest applies
    warned = " ".join(r["warnings"].get("lora mixed", []))
    for p, what in HOSTILE_LORA.items():
        assert f"{p}.weight not applied" in warned, (what, warned)
    assert "NaN" in warned and "Inf" in warned, warned
    for tag in ("nan strength", "huge strength"):  # every target is int4: every patch refused, nothing raises
        assert loras[tag] == {"outcome": "ok", "value": []}, loras[tag]
        assert "strength" in " ".join(r["warnings"].get(f"lora {tag}", [])), r["warnings"].get(f"lora {tag}")
    assert loras["corrupt"]["type"] in UPSTREAM_UNREADABLE, loras["corrupt"]



# ------------------------------------------------------------------------------- Z-Image and Flux.1
def _arch_models(arch, d, source="nunchaku"):
    """A models folder holding a tiny ``arch`` file (arch_fixtures): the Nunchaku file, or the bf16 ComfyUI
    file through this project's quantizer; its name and native layers {layer: (tensors, JSON)}."""
    import safetensors.torch

    import arch_fixtures as A
    from comfy.quant_tools.quantizer import QuantizeOptions, quantize_file
    (d / "diffusion_models").mkdir(parents=True)
    (d / "loras").mkdir()
    if source == "nunchaku":
        nat = A.natural_int4(arch, seed=7)
        sd, meta = A.to_nunchaku(nat)
        name = f"svdq-int4_r32-tiny-{arch}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "diffusion_models" / name),
                                    metadata=meta)
        return name, A.native_layers(nat)
    bf16 = d / f"{arch}-bf16.safetensors"
    safetensors.torch.save_file(A.comfy_float_state_dict(arch, seed=7), str(bf16))
    name = f"{arch}-int4.safetensors"
    quantize_file(str(bf16), str(d / "diffusion_models" / name), QuantizeOptions(rank=16), progress=False)
    return name, U.file_layers(d / "diffusion_models" / name)


@pytest.mark.parametrize("source", ["nunchaku", "quantized"])
@pytest.mark.parametrize("arch", ["zimage", "flux"])
def test_zimage_and_flux_load_through_unet_loader(comfyui, tmp_path, arch, source):
    """Upstream's ``UNETLoader`` on a tiny Z-Image / Flux.1 file, a Nunchaku one (converted while loading) or
    a bf16 one through ``quantize``: the int4 layers are exactly those the conversion must give (or the
    quantizer wrote) (``arch_fixtures.native_layers``: Z-Image's qkv / out /
    w1 / w3 / w2, Flux's qkv / proj / mlp / modulation and the single blocks' fused linear1 and K-split
    linear2), each a kitchen ``QuantizedTensor`` in a ``MixedPrecisionOps.Linear``, and each layer's output
    on a seeded input is within ``kernel_tolerance`` of the float64 reference from the native tensors."""
    from reference import kernel_tolerance
    name, layers = _arch_models(arch, tmp_path / "models", source)
    xs = _inputs(layers, 4000)
    r = U.run_in_comfyui(comfyui.path, "load", tmp_path, models_dir=tmp_path / "models",
                         inputs=_save({f"{arch}:{p}": x for p, x in xs.items()}, tmp_path / "inputs.safetensors"),
                         files={arch: name})
    assert not r["errors"], U.format_errors(r["errors"])
    info = r["files"][arch]
    assert set(info["layers"]) == set(layers), (sorted(set(layers) ^ set(info["layers"])))
    got = U.scenario_tensors(r)
    dtype = U.dtype_from_name(info["dtype"])
    worst = 0.0
    for p, (t, conf) in layers.items():
        assert info["layers"][p]["module_class"].endswith("MixedPrecisionOps.Linear"), p
        x, y = got[f"x.{arch}:{p}"], got[f"y.{arch}:{p}"]
        ref, mag = U.int4_reference(x, t, conf, dtype)
        tol = kernel_tolerance(mag, dtype, U.accumulation_length(t, conf))
        err = (y.double() - ref).abs()
        assert bool((err <= tol).all()), f"{arch} {p}: err/tol {U.worst_ratio(err, tol):.3f}"
        worst = max(worst, U.worst_ratio(err, tol))
    print(f"[{arch}] model {info['model_class']}, {len(layers)} int4 layers, dtype {info['dtype']}, "
          f"worst err/bound {worst:.3g}")


ZD = 384        # arch_fixtures.tiny_config("zimage").dim
FD, FM = 256, 1024  # tiny Flux hidden size and MLP width
# (LoRA module path as trainers write it, naming style, rank, alpha) -> (ComfyUI layer, (row start, rows) or None)
ZIMAGE_LORA = {
    ("layers.0.attention.to_q", "diffusers", 4, 2.0): ("layers.0.attention.qkv", (0, ZD)),
    ("layers.0.attention.to_k", "comfy", 4, 4.0): ("layers.0.attention.qkv", (ZD, ZD)),
    ("layers.0.attention.to_v", "diffusers", 8, 8.0): ("layers.0.attention.qkv", (2 * ZD, ZD)),
    ("layers.0.attention.to_out.0", "comfy", 4, 1.0): ("layers.0.attention.out", None),
    ("layers.1.feed_forward.w1", "lycoris", 4, 2.0): ("layers.1.feed_forward.w1", None),
    ("layers.1.feed_forward.w3", "diffusers", 4, 2.0): ("layers.1.feed_forward.w3", None),
    ("layers.1.feed_forward.w2", "kohya", 4, 2.0): ("layers.1.feed_forward.w2", None),
}
FLUX_LORA = {
    ("transformer_blocks.0.attn.to_q", "diffusers", 4, 2.0): ("double_blocks.0.img_attn.qkv", (0, FD)),
    ("transformer_blocks.0.attn.add_k_proj", "diffusers", 4, 4.0): ("double_blocks.0.txt_attn.qkv", (FD, FD)),
    ("transformer_blocks.0.norm1.linear", "diffusers", 4, 2.0): ("double_blocks.0.img_mod.lin", None),
    ("double_blocks.1.img_mlp.2", "kohya", 8, 8.0): ("double_blocks.1.img_mlp.2", None),
    ("single_transformer_blocks.0.attn.to_v", "diffusers", 4, 2.0): ("single_blocks.0.linear1", (2 * FD, FD)),
    ("single_transformer_blocks.0.proj_mlp", "lycoris", 4, 1.0): ("single_blocks.0.linear1", (3 * FD, FM)),
    ("single_transformer_blocks.1.proj_out", "diffusers", 4, 2.0): ("single_blocks.1.linear2", None),
    ("single_blocks.1.modulation.lin", "comfy", 4, 2.0): ("single_blocks.1.modulation.lin", None),
    ("transformer_blocks.1.ff.net.0.proj", "diffusers", 4, 2.0): ("double_blocks.1.img_mlp.0", None),
}
UNTOUCHED_ARCH = {"zimage": "layers.1.attention.qkv", "flux": "double_blocks.1.txt_attn.proj"}


def _model_call(arch):
    """Seeded inputs of one whole-transformer forward of the tiny ``arch`` model and how to call it: latent
    (1, 16, 8, 8), timestep, text context; Flux also the pooled vector and guidance, Z-Image the token count."""
    import arch_fixtures as A
    cfg = A.tiny_config(arch)
    g = torch.Generator().manual_seed(77)
    text_dim = cfg.cap_feat_dim if arch == "zimage" else cfg.context_in_dim
    inputs = {"model.x": torch.randn(1, 16, 8, 8, generator=g), "model.t": torch.full((1,), 0.5),
              "model.context": torch.randn(1, 6, text_dim, generator=g)}
    if arch == "flux":
        inputs |= {"model.y": torch.randn(1, cfg.vec_in_dim, generator=g), "model.guidance": torch.full((1,), 3.5)}
        return inputs, {"tensors": ["y", "guidance"]}
    return inputs, {"tensors": [], "scalars": {"num_tokens": 6}}


def _lora_file(path, table, layers, seed):
    """A LoRA with one pair per entry of ``table`` (shapes from the target layers and row ranges) and
    {entry: (up, down, alpha/rank)} as stored (bf16)."""
    import safetensors.torch

    import lora_helpers as H
    sd, fac = {}, {}
    for i, ((src, style, rank, alpha), (layer, rows)) in enumerate(sorted(table.items())):
        t = layers[layer][0]
        n, k = (t["weight"].shape[0] if rows is None else rows[1]), U.in_features(t)
        up, down = (f.to(torch.bfloat16) for f in H.factors(n, k, rank, seed + 31 * i))
        sd.update(H.lora_sd(style, src, up, down, alpha))
        fac[(src, style, rank, alpha)] = (up, down, alpha / rank)
    safetensors.torch.save_file(sd, str(path))
    return fac


@pytest.mark.parametrize("source", ["nunchaku", "quantized"])
@pytest.mark.parametrize("arch, table", [("zimage", ZIMAGE_LORA), ("flux", FLUX_LORA)], ids=["zimage", "flux"])
def test_arch_lora_forms_land_on_their_rows_and_unpatch(comfyui, tmp_path, arch, table, source):
    """A LoRA as trainers write it on the converted Nunchaku model (or the quantized bf16 one) in upstream. Z-Image: separate to_q / to_k /
    to_v with their own ranks and alphas (diffusers and ComfyUI spellings), to_out.0, w1 / w3 / w2. Flux:
    diffusers to_q / add_k_proj (row thirds of the fused qkv), norm1.linear (AWQ modulation, planar order),
    the single blocks' to_v and proj_mlp (their rows of the fused linear1) and proj_out (the K-split linear2),
    a kohya img_mlp.2 and a ComfyUI modulation.lin. Each probed layer's output − the unpatched output equals
    the sum of its LoRA deltas placed on their rows, within ``lora_helpers.delta_tolerance``; an int4 layer no
    LoRA targets is unchanged bit for bit; every key maps; a whole-transformer forward is finite, changed by
    the LoRA and after unloading bit-identical to the unpatched one, as are the state dict and the layers."""
    import lora_helpers as H
    name, layers = _arch_models(arch, tmp_path / "models", source)
    fac = _lora_file(tmp_path / "models" / "loras" / f"{arch}-lora.safetensors", table, layers, 600)
    probes = sorted({layer for layer, _ in table.values()} | {UNTOUCHED_ARCH[arch]})
    xs = _inputs({p: layers[p] for p in probes}, 5000)
    model_inputs, call = _model_call(arch)
    strength = 0.7
    r = U.run_in_comfyui(comfyui.path, "lora_layers", tmp_path, models_dir=tmp_path / "models", model=name,
                         inputs=_save(xs | model_inputs, tmp_path / "inputs.safetensors"), probes=probes,
                         loras={"lora": [f"{arch}-lora.safetensors", strength]}, model_call=call)
    assert not r["errors"], U.format_errors(r["errors"])
    assert not [w for ws in r["warnings"].values() for w in ws if "not loaded" in w.lower()], r["warnings"]
    assert r["patched"]["lora"] == sorted({f"diffusion_model.{layer}.weight" for layer, _ in table.values()})
    got = U.scenario_tensors(r)
    dtype = U.dtype_from_name(r["dtype"])
    for p in probes:
        x, y, base = got[f"x:{p}"], got[f"lora:{p}"], got[f"base:{p}"]
        t, conf = layers[p]
        parts = [(key, rows) for key, (layer, rows) in table.items() if layer == p]
        if not parts:
            assert torch.equal(y, base), f"{p}: no LoRA targets it, yet its output changed"
            continue
        n = t["weight"].shape[0]
        delta = torch.zeros(*x.shape[:-1], n, dtype=torch.float64)
        mag_d = torch.zeros_like(delta)
        touched = torch.zeros(n, dtype=torch.bool)
        for key, rows in parts:
            up, down, s = fac[key]
            d, m = H.lowrank_delta(x, up, down, strength * s)
            span = slice(None) if rows is None else slice(rows[0], rows[0] + rows[1])
            delta[..., span] += d
            mag_d[..., span] += m
            touched[span] = True
        mag_b = U.int4_reference(x, t, conf, dtype)[1]
        tol = H.delta_tolerance(y, base, mag_b, mag_d, dtype, 2 * U.in_features(t))
        diff = y.double() - base.double()
        H.assert_delta(diff[..., touched], delta[..., touched], tol[..., touched], what=f"{arch} {p}")
        assert bool((diff[..., ~touched].abs() <= tol[..., ~touched]).all()), f"{p}: rows no LoRA targets moved"
        assert torch.equal(got[f"after:{p}"], base), f"{p}: output after unloading differs"
    base_y, lora_y = got["base:model"], got["lora:model"]  # the whole transformer's forward
    assert bool(torch.isfinite(base_y).all()) and bool(torch.isfinite(lora_y).all())
    assert not torch.equal(base_y, lora_y) and torch.equal(got["after:model"], base_y)
    un = r["unpatch"]
    assert not (un["differ"] or un["missing"] or un["added"]), un


@pytest.mark.parametrize("arch, table", [("zimage", ZIMAGE_LORA), ("flux", FLUX_LORA)], ids=["zimage", "flux"])
def test_lora_check_covers_zimage_and_flux(comfyui, tmp_path, arch, table):
    """``lora-check``'s report inside upstream for the LoRA-forms file (plus one key of a module the model
    lacks): one row per LoRA module naming its target weight (and rows, for a part of a fused weight) and
    how it lands (appended to the SVDQuant low-rank branch / an AWQ output term), and the stray key listed
    as not mapped."""
    import safetensors.torch
    name, layers = _arch_models(arch, tmp_path / "models")
    path = tmp_path / "models" / "loras" / f"{arch}-lora.safetensors"
    _lora_file(path, table, layers, 600)
    lora = safetensors.torch.load_file(str(path))
    lora["transformer.no_such_module.lora_A.weight"] = torch.zeros(4, 64)
    safetensors.torch.save_file(lora, str(path))
    r = U.run_in_comfyui(comfyui.path, "lora_check", tmp_path, models_dir=tmp_path / "models", model=name,
                         lora=path.name)
    assert not r["errors"], U.format_errors(r["errors"])
    assert r["unmapped"] == ["transformer.no_such_module.lora_A.weight"] and r["has_problems"]
    rows = {target: how for _prefix, target, how in r["rows"]}
    assert len(r["rows"]) == len(table), r["rows"]
    for (src, style, rank, alpha), (layer, span) in table.items():
        key = f"diffusion_model.{layer}.weight"
        shown = key if span is None else f"{key} rows (0, {span[0]}, {span[1]})"
        assert shown in rows, (shown, sorted(rows))
        kind = layers[layer][1]["format"]
        assert ("low-rank" in rows[shown]) if kind == "svdquant_w4a4" else ("output term" in rows[shown]), rows[shown]
