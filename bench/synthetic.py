"""Write a random-weight Hugging Face checkpoint with the shapes of a real model, for measuring
compile memory, compile time and decode speed at real sizes without downloading weights.

    python bench/synthetic.py --shape llama32-1b -o /tmp/llama1b
    /usr/bin/time -v awqc compile --model /tmp/llama1b --quant rtn-w4g128 --quantize-head -o /tmp/art

bf16 weights (N(0, 0.02), norms 1), written shard by shard so this script itself stays small in
memory; the tokenizer is the default model's (SmolLM2, 49,152 tokens), so vocab_size is kept at
least that large.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab, tied, rope
    # a small stand-in for rehearsing benchmarks (bench/gpu/prepare.py --dry-run)
    "tiny": (128, 384, 2, 4, 2, 32000, True, None),
    "llama32-1b": (2048, 8192, 16, 32, 8, 128256, True, {"rope_type": "llama3", "factor": 32.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama32-3b": (3072, 8192, 28, 24, 8, 128256, True, None),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, False, None),
    "llama31-8b": (4096, 14336, 32, 32, 8, 128256, False, {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def config(shape: str) -> dict:
    hidden, inter, layers, heads, kv, vocab, tied, rope = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": max(vocab, 49152), "tie_word_embeddings": tied,
            "max_position_embeddings": 131072 if rope else 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": rope, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16"}


def write(shape: str, out: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from awqc.compiler.model_import import default_model_path

    cfg = config(shape)
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    head = {"model.embed_tokens.weight": rand(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg["tie_word_embeddings"]:
        head["lm_head.weight"] = rand(cfg["vocab_size"], h)
    save_file(head, str(out / "model-embed.safetensors"), metadata={"format": "pt"})
    for layer in range(n_layers):
        p = f"model.layers.{layer}"
        tensors = {f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
                   f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
                   f"{p}.mlp.gate_proj.weight": rand(i, h), f"{p}.mlp.up_proj.weight": rand(i, h),
                   f"{p}.mlp.down_proj.weight": rand(h, i),
                   f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        save_file(tensors, str(out / f"model-{layer:03d}.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama32-1b")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    print(write(args.shape, args.output))


if __name__ == "__main__":
    main()
