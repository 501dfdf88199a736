"""An independent, plain-torch GPT forward written from the documented semantics (docs/checkpoints.md).

It reads ``MegatronGPTModel`` weight names and computes logits with no megatron code, so tests can check every
architecture option (norms, activations, positions, GQA, biases, tied output) against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _norm(x, sd, prefix, cfg):
    eps = cfg.get("layernorm_epsilon", 1e-5)
    weight = sd[prefix + ".weight"].double()
    if cfg["normalization"] == "layernorm1p":
        weight = weight + 1
    if cfg["normalization"] == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    bias = sd[prefix + ".bias"].double()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _linear(x, sd, prefix):
    bias = sd.get(prefix + ".bias")
    return F.linear(x, sd[prefix + ".weight"].double(), None if bias is None else bias.double())


def _rope(x, base, percentage):
    # x: [B, S, heads, d]; rotate-half on the first rot dims.
    seq, d = x.shape[1], x.shape[-1]
    rot = int(d * percentage)
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], -1)[None, :, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], -1)
    return torch.cat([x_rot * emb.cos() + rotated * emb.sin(), x_pass], -1)


def _activation(h, name):
    if name in ("swiglu", "fast-swiglu"):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if name == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if name == "squared-relu":
        return F.relu(h).pow(2)
    if name == "relu":
        return F.relu(h)
    return F.gelu(h)


def reference_logits(state_dict: dict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 logits ``[B, S, V_padded]`` of a causal GPT described by ``cfg`` with weights ``state_dict``."""
    sd = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
    nh = cfg["num_attention_heads"]
    ng = cfg.get("num_query_groups") or nh
    h = cfg["hidden_size"]
    d = cfg.get("kv_channels") or h // nh
    batch, seq = input_ids.shape
    x = sd["embedding.word_embeddings.weight"].double()[input_ids]
    if cfg["position_embedding_type"] == "learned_absolute":
        x = x + sd["embedding.position_embeddings.weight"].double()[:seq][None]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    for i in range(cfg["num_layers"]):
        p = f"decoder.layers.{i}."
        qkv = _linear(_norm(x, sd, p + "input_layernorm", cfg), sd, p + "self_attention.linear_qkv")
        qkv = qkv.view(batch, seq, ng, (nh // ng + 2) * d)
        q = qkv[..., : nh // ng * d].reshape(batch, seq, nh, d)
        k = qkv[..., nh // ng * d : (nh // ng + 1) * d]
        v = qkv[..., (nh // ng + 1) * d :]
        if cfg["position_embedding_type"] == "rope":
            base, pct = cfg.get("rotary_base", 10000), cfg.get("rotary_percentage", 1.0)
            q, k = _rope(q, base, pct), _rope(k, base, pct)
        k = k.repeat_interleave(nh // ng, dim=2)
        v = v.repeat_interleave(nh // ng, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, nh * d)
        x = x + _linear(attn, sd, p + "self_attention.linear_proj")
        hidden = _linear(_norm(x, sd, p + "pre_mlp_layernorm", cfg), sd, p + "mlp.linear_fc1")
        x = x + _linear(_activation(hidden, cfg["activation"]), sd, p + "mlp.linear_fc2")
    x = _norm(x, sd, "decoder.final_layernorm", cfg)
    output = sd.get("output_layer.weight", sd["embedding.word_embeddings.weight"])
    return x @ output.double().T
