"""Qwen-Image diffusion transformer (mirrors upstream ``comfy/ldm/qwen_image/model.py``).

Same module tree, state-dict names, constructor and forward signature as upstream ComfyUI, so a
ComfyUI Qwen-Image / Qwen-Image-Edit (2509, 2511) / Layered checkpoint loads as is. The one
structural difference: the attention computes its sibling q/k/v projections through
``comfy.ops.run_linear_group`` so an int4 format can quantize the shared activation once.
Every layer with weights is built through ``operations`` and only ever called as a module.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import comfy.ops

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def pad_to_patch_size(img, patch_size=(2, 2), padding_mode="circular"):
    """Pad the trailing dims of ``img`` at their end up to a multiple of ``patch_size`` (upstream
    ``comfy.ldm.common_dit.pad_to_patch_size``: circular padding)."""
    pad = ()
    for i, p in enumerate(patch_size):
        pad = (0, (p - img.shape[i + 2] % p) % p) + pad
    if not any(pad):
        return img
    return F.pad(img, pad, mode=padding_mode)


def timestep_embedding(timesteps, num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                       scale=1000.0, max_period=10000):
    """Sinusoidal timestep embedding (diffusers ``get_timestep_embedding``), in float32."""
    half = num_channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if num_channels % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def rope(pos, dim, theta):
    """(B, S) positions -> (B, S, dim/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]]."""
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=dtype, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = pos.to(dtype).unsqueeze(-1) * omega
    out = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return out.unflatten(-1, (2, 2)).float()


class EmbedND(nn.Module):
    """Multi-axis RoPE (upstream ``comfy.ldm.flux.layers.EmbedND``); no parameters."""

    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids):
        """ids (B, S, n_axes) -> (B, 1, S, dim/2, 2, 2)."""
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


def apply_rotary_emb(x, freqs_cis):
    """Rotate consecutive channel pairs of x (B, S, H, D) by freqs_cis (B, S, 1, D/2, 2, 2)."""
    if x.shape[1] == 0:
        return x
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape)


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------

class GELU(nn.Module):
    def __init__(self, dim_in, dim_out, approximate="none", bias=True, dtype=None, device=None, operations=None):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out, bias=bias, dtype=dtype, device=device)
        self.approximate = approximate

    def forward(self, hidden_states):
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, dropout=0.0, inner_dim=None, bias=True,
                 dtype=None, device=None, operations=None):
        super().__init__()
        inner_dim = int(dim * mult) if inner_dim is None else inner_dim
        dim_out = dim if dim_out is None else dim_out
        self.net = nn.ModuleList([
            GELU(dim, inner_dim, approximate="tanh", bias=bias, dtype=dtype, device=device, operations=operations),
            nn.Dropout(dropout),
            operations.Linear(inner_dim, dim_out, bias=bias, dtype=dtype, device=device),
        ])

    def forward(self, hidden_states):
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, time_embed_dim, dtype=None, device=None, operations=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_channels, time_embed_dim, bias=True, dtype=dtype, device=device)
        self.act = nn.SiLU()
        self.linear_2 = operations.Linear(time_embed_dim, time_embed_dim, bias=True, dtype=dtype, device=device)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


class QwenTimestepProjEmbeddings(nn.Module):
    def __init__(self, embedding_dim, pooled_projection_dim, use_additional_t_cond=False,
                 dtype=None, device=None, operations=None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, device=device,
                                                   operations=operations)
        self.use_additional_t_cond = use_additional_t_cond
        if use_additional_t_cond:
            self.addition_t_embedding = operations.Embedding(2, embedding_dim, dtype=dtype, device=device)

    def forward(self, timestep, hidden_states, addition_t_cond=None):
        timesteps_proj = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        temb = self.timestep_embedder(timesteps_proj.to(dtype=hidden_states.dtype))
        if self.use_additional_t_cond:
            if addition_t_cond is None:
                addition_t_cond = torch.zeros((temb.shape[0],), dtype=torch.long, device=temb.device)
            addition_t_cond = addition_t_cond.to(device=temb.device, dtype=torch.long).reshape(-1)
            if addition_t_cond.shape[0] != temb.shape[0]:  # timestep batch doubled for reference tokens
                addition_t_cond = addition_t_cond.repeat(temb.shape[0] // addition_t_cond.shape[0])
            temb = temb + self.addition_t_embedding(addition_t_cond).to(temb.dtype)
        return temb


class Attention(nn.Module):
    """Joint text/image attention; q/k/v of each stream are one ``run_linear_group`` call."""

    def __init__(self, query_dim, dim_head=64, heads=8, dropout=0.0, bias=False, eps=1e-5, out_bias=True,
                 out_dim=None, out_context_dim=None, dtype=None, device=None, operations=None):
        super().__init__()
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.out_context_dim = out_context_dim if out_context_dim is not None else query_dim

        self.norm_q = operations.RMSNorm(dim_head, eps=eps, dtype=dtype, device=device)
        self.norm_k = operations.RMSNorm(dim_head, eps=eps, dtype=dtype, device=device)
        self.norm_added_q = operations.RMSNorm(dim_head, eps=eps, dtype=dtype, device=device)
        self.norm_added_k = operations.RMSNorm(dim_head, eps=eps, dtype=dtype, device=device)

        self.to_q = operations.Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, device=device)
        self.to_k = operations.Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, device=device)
        self.to_v = operations.Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, device=device)

        self.add_q_proj = operations.Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, device=device)
        self.add_k_proj = operations.Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, device=device)
        self.add_v_proj = operations.Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, device=device)

        self.to_out = nn.ModuleList([
            operations.Linear(self.inner_dim, self.out_dim, bias=out_bias, dtype=dtype, device=device),
            nn.Dropout(dropout),
        ])
        self.to_add_out = operations.Linear(self.inner_dim, self.out_context_dim, bias=out_bias, dtype=dtype,
                                            device=device)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                attention_mask=None, image_rotary_emb=None, transformer_options={}):
        seq_txt = encoder_hidden_states.shape[1]
        seq_img = hidden_states.shape[1]

        img_q, img_k, img_v = comfy.ops.run_linear_group(hidden_states, (self.to_q, self.to_k, self.to_v))
        txt_q, txt_k, txt_v = comfy.ops.run_linear_group(
            encoder_hidden_states, (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        img_q, img_k, img_v, txt_q, txt_k, txt_v = (
            t.unflatten(-1, (self.heads, -1)) for t in (img_q, img_k, img_v, txt_q, txt_k, txt_v))

        img_q = self.norm_q(img_q)
        img_k = self.norm_k(img_k)
        txt_q = self.norm_added_q(txt_q)
        txt_k = self.norm_added_k(txt_k)

        joint_query = torch.cat([txt_q, img_q], dim=1)
        joint_key = torch.cat([txt_k, img_k], dim=1)
        joint_value = torch.cat([txt_v, img_v], dim=1)
        if image_rotary_emb is not None:
            joint_query = apply_rotary_emb(joint_query, image_rotary_emb)
            joint_key = apply_rotary_emb(joint_key, image_rotary_emb)

        if encoder_hidden_states_mask is not None:
            # additive key mask: text positions from the caller's mask, image positions open
            attn_mask = torch.zeros((joint_query.shape[0], 1, 1, seq_txt + seq_img),
                                    dtype=joint_query.dtype, device=joint_query.device)
            attn_mask[:, 0, 0, :seq_txt] = encoder_hidden_states_mask.to(joint_query.dtype)
        else:
            attn_mask = attention_mask

        out = F.scaled_dot_product_attention(joint_query.transpose(1, 2), joint_key.transpose(1, 2),
                                             joint_value.transpose(1, 2), attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(start_dim=2)

        img_attn_output = self.to_out[1](self.to_out[0](out[:, seq_txt:]))
        txt_attn_output = self.to_add_out(out[:, :seq_txt])
        return img_attn_output, txt_attn_output


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim, num_attention_heads, attention_head_dim, eps=1e-6, dtype=None, device=None,
                 operations=None):
        super().__init__()
        self.dim = dim
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim

        self.img_mod = nn.Sequential(nn.SiLU(), operations.Linear(dim, 6 * dim, bias=True, dtype=dtype, device=device))
        self.img_norm1 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, dtype=dtype, device=device)
        self.img_norm2 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, dtype=dtype, device=device)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, dtype=dtype, device=device, operations=operations)

        self.txt_mod = nn.Sequential(nn.SiLU(), operations.Linear(dim, 6 * dim, bias=True, dtype=dtype, device=device))
        self.txt_norm1 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, dtype=dtype, device=device)
        self.txt_norm2 = operations.LayerNorm(dim, eps=eps, elementwise_affine=False, dtype=dtype, device=device)
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim, dtype=dtype, device=device, operations=operations)

        self.attn = Attention(query_dim=dim, dim_head=attention_head_dim, heads=num_attention_heads, out_dim=dim,
                              bias=True, eps=eps, dtype=dtype, device=device, operations=operations)

    def _modulate(self, x, mod_params, timestep_zero_index=None):
        """x·(1 + scale) + shift, and the gate broadcast over tokens.

        With ``timestep_zero_index`` the params hold 2B rows: the first B apply to tokens before the
        index (the noisy latent), the second B to the tokens from it on (the reference latents)."""
        shift, scale, gate = mod_params.chunk(3, dim=-1)
        if timestep_zero_index is None:
            return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1)), gate.unsqueeze(1)
        batch = shift.shape[0] // 2
        x_main, x_ref = x[:, :timestep_zero_index], x[:, timestep_zero_index:]
        out = torch.cat([
            torch.addcmul(shift[:batch].unsqueeze(1), x_main, 1 + scale[:batch].unsqueeze(1)),
            torch.addcmul(shift[batch:].unsqueeze(1), x_ref, 1 + scale[batch:].unsqueeze(1)),
        ], dim=1)
        gate = torch.cat([
            gate[:batch].unsqueeze(1).expand(-1, x_main.shape[1], -1),
            gate[batch:].unsqueeze(1).expand(-1, x_ref.shape[1], -1),
        ], dim=1)
        return out, gate

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                image_rotary_emb=None, timestep_zero_index=None, transformer_options={}):
        img_mod_params = self.img_mod(temb)
        if timestep_zero_index is not None:
            temb = temb.chunk(2, dim=0)[0]
        txt_mod_params = self.txt_mod(temb)
        img_mod1, img_mod2 = img_mod_params.chunk(2, dim=-1)
        txt_mod1, txt_mod2 = txt_mod_params.chunk(2, dim=-1)

        img_modulated, img_gate1 = self._modulate(self.img_norm1(hidden_states), img_mod1, timestep_zero_index)
        txt_modulated, txt_gate1 = self._modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)

        img_attn_output, txt_attn_output = self.attn(
            hidden_states=img_modulated,
            encoder_hidden_states=txt_modulated,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
            transformer_options=transformer_options,
        )
        hidden_states = hidden_states + img_gate1 * img_attn_output
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output

        img_modulated2, img_gate2 = self._modulate(self.img_norm2(hidden_states), img_mod2, timestep_zero_index)
        hidden_states = torch.addcmul(hidden_states, img_gate2, self.img_mlp(img_modulated2))

        txt_modulated2, txt_gate2 = self._modulate(self.txt_norm2(encoder_hidden_states), txt_mod2)
        encoder_hidden_states = torch.addcmul(encoder_hidden_states, txt_gate2, self.txt_mlp(txt_modulated2))

        return encoder_hidden_states, hidden_states


class LastLayer(nn.Module):
    def __init__(self, embedding_dim, conditioning_embedding_dim, elementwise_affine=False, eps=1e-6, bias=True,
                 dtype=None, device=None, operations=None):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = operations.Linear(conditioning_embedding_dim, embedding_dim * 2, bias=bias, dtype=dtype,
                                        device=device)
        self.norm = operations.LayerNorm(embedding_dim, eps=eps, elementwise_affine=False, dtype=dtype, device=device)

    def forward(self, x, conditioning_embedding):
        emb = self.linear(self.silu(conditioning_embedding))
        scale, shift = emb.chunk(2, dim=1)  # scale first
        return torch.addcmul(shift[:, None, :], self.norm(x), (1 + scale)[:, None, :])


class QwenImageTransformer2DModel(nn.Module):
    def __init__(
        self,
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
        default_ref_method="index",
        image_model=None,
        final_layer=True,
        use_additional_t_cond=False,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        if operations is None:
            operations = comfy.ops.disable_weight_init
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal attention_head_dim={attention_head_dim}")
        self.dtype = dtype
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.default_ref_method = default_ref_method
        self.image_model = image_model

        self.pe_embedder = EmbedND(dim=attention_head_dim, theta=10000, axes_dim=list(axes_dims_rope))

        self.time_text_embed = QwenTimestepProjEmbeddings(
            embedding_dim=self.inner_dim,
            pooled_projection_dim=pooled_projection_dim,
            use_additional_t_cond=use_additional_t_cond,
            dtype=dtype, device=device, operations=operations,
        )

        self.txt_norm = operations.RMSNorm(joint_attention_dim, eps=1e-6, dtype=dtype, device=device)
        self.img_in = operations.Linear(in_channels, self.inner_dim, dtype=dtype, device=device)
        self.txt_in = operations.Linear(joint_attention_dim, self.inner_dim, dtype=dtype, device=device)

        self.transformer_blocks = nn.ModuleList([
            QwenImageTransformerBlock(dim=self.inner_dim, num_attention_heads=num_attention_heads,
                                      attention_head_dim=attention_head_dim, dtype=dtype, device=device,
                                      operations=operations)
            for _ in range(num_layers)
        ])

        if final_layer:
            self.norm_out = LastLayer(self.inner_dim, self.inner_dim, dtype=dtype, device=device, operations=operations)
            self.proj_out = operations.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True,
                                              dtype=dtype, device=device)

        if default_ref_method == "index_timestep_zero":
            # Edit-2511 marker: model detection looks for this key in the checkpoint
            self.register_buffer("__index_timestep_zero__", torch.tensor([]))
        logger.debug("QwenImageTransformer2DModel: %d blocks, dim %d (%d heads x %d), ref method %s",
                     num_layers, self.inner_dim, num_attention_heads, attention_head_dim, default_ref_method)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        """(B, C, T, H, W) -> tokens (B, T·h·w, C·p·p), position ids (B, T·h·w, 3), padded shape."""
        bs, c, t, h, w = x.shape
        p = self.patch_size
        hidden_states = pad_to_patch_size(x, (1, p, p))
        orig_shape = hidden_states.shape
        hidden_states = hidden_states.view(bs, c, t, orig_shape[-2] // p, p, orig_shape[-1] // p, p)
        hidden_states = hidden_states.permute(0, 2, 3, 5, 1, 4, 6)
        hidden_states = hidden_states.reshape(bs, t * (orig_shape[-2] // p) * (orig_shape[-1] // p), c * p * p)

        h_len = (h + (p // 2)) // p
        w_len = (w + (p // 2)) // p
        h_offset = (h_offset + (p // 2)) // p
        w_offset = (w_offset + (p // 2)) // p

        img_ids = torch.zeros((t, h_len, w_len, 3), device=x.device, dtype=torch.float32)
        img_ids[..., 0] = index + torch.arange(t, device=x.device, dtype=torch.float32)[:, None, None]
        img_ids[..., 1] = (torch.arange(h_len, device=x.device, dtype=torch.float32) + h_offset - h_len // 2)[None, :, None]
        img_ids[..., 2] = (torch.arange(w_len, device=x.device, dtype=torch.float32) + w_offset - w_len // 2)[None, None, :]
        img_ids = img_ids.reshape(1, -1, 3).expand(bs, -1, -1)
        return hidden_states, img_ids, orig_shape

    def forward(self, x, timestep, context, attention_mask=None, ref_latents=None, additional_t_cond=None,
                transformer_options={}, **kwargs):
        is_4d = x.ndim == 4
        if is_4d:
            x = x.unsqueeze(2)
        if self.dtype is not None:
            x = x.to(self.dtype)
            context = context.to(self.dtype)
        out = self._forward(x, timestep, context, attention_mask=attention_mask, ref_latents=ref_latents,
                            additional_t_cond=additional_t_cond, transformer_options=transformer_options, **kwargs)
        if is_4d and out.ndim == 5:
            out = out.squeeze(2)
        return out

    def _forward(self, x, timesteps, context, attention_mask=None, ref_latents=None, additional_t_cond=None,
                 transformer_options={}, **kwargs):
        timestep = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timestep.shape[0] == 1 and x.shape[0] > 1:
            timestep = timestep.expand(x.shape[0])
        encoder_hidden_states = context
        encoder_hidden_states_mask = attention_mask
        if encoder_hidden_states_mask is not None and not torch.is_floating_point(encoder_hidden_states_mask):
            encoder_hidden_states_mask = (encoder_hidden_states_mask.to(x.dtype) - 1) * torch.finfo(x.dtype).max

        hidden_states, img_ids, orig_shape = self.process_img(x)
        num_embeds = hidden_states.shape[1]

        timestep_zero_index = None
        if ref_latents is not None:
            h = w = index = 0
            ref_method = kwargs.get("ref_latents_method", self.default_ref_method)
            index_ref_method = ref_method in ("index", "index_timestep_zero")
            negative_ref_method = ref_method == "negative_index"
            for ref in ref_latents:
                if ref.ndim == 4:
                    ref = ref.unsqueeze(2)
                ref = ref.to(device=x.device, dtype=x.dtype)
                h_offset = w_offset = 0
                if index_ref_method:
                    index += 1
                elif negative_ref_method:
                    index -= 1
                else:  # "offset": place references side by side in the (h, w) plane
                    index = 1
                    if ref.shape[-2] + h > ref.shape[-1] + w:
                        w_offset = w
                    else:
                        h_offset = h
                    h = max(h, ref.shape[-2] + h_offset)
                    w = max(w, ref.shape[-1] + w_offset)
                kontext, kontext_ids, _ = self.process_img(ref, index=index, h_offset=h_offset, w_offset=w_offset)
                hidden_states = torch.cat([hidden_states, kontext], dim=1)
                img_ids = torch.cat([img_ids, kontext_ids], dim=1)
            if ref_method == "index_timestep_zero" and index > 0:
                timestep = torch.cat([timestep, timestep * 0], dim=0)
                timestep_zero_index = num_embeds

        p = self.patch_size
        txt_start = max(((x.shape[-1] + p // 2) // p) // 2, ((x.shape[-2] + p // 2) // p) // 2)
        txt_ids = torch.arange(txt_start, txt_start + context.shape[1], device=x.device, dtype=torch.float32)
        txt_ids = txt_ids.reshape(1, -1, 1).expand(x.shape[0], -1, 3)
        ids = torch.cat((txt_ids, img_ids), dim=1)
        image_rotary_emb = self.pe_embedder(ids).squeeze(1).unsqueeze(2).to(x.dtype)

        hidden_states = self.img_in(hidden_states)
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_text_embed(timestep, hidden_states, additional_t_cond)

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                timestep_zero_index=timestep_zero_index,
                transformer_options=transformer_options,
            )

        if not hasattr(self, "norm_out"):  # final_layer=False: hand back the main image tokens
            return hidden_states[:, :num_embeds]

        if timestep_zero_index is not None:
            temb = temb.chunk(2, dim=0)[0]
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)

        bs, _, t, hp, wp = orig_shape
        hidden_states = hidden_states[:, :num_embeds].view(bs, t, hp // p, wp // p, self.out_channels, p, p)
        hidden_states = hidden_states.permute(0, 4, 1, 2, 5, 3, 6).reshape(bs, self.out_channels, t, hp, wp)
        return hidden_states[:, :, :, :x.shape[-2], :x.shape[-1]]
