"""Generate with a Hugging Face model whose KV lives on attention nodes.

`kflume.patch(model, cluster)` routes the model's core attention to the cluster through
transformers' public extension points; `generate()` works as before and its output is
the same. Here: a small random Qwen3 (or any local checkpoint via --checkpoint), saved
and loaded as safetensors, and attention nodes as `kflume node` processes on loopback.

    python examples/hf_generate.py
    python examples/hf_generate.py --checkpoint path/to/model --nodes 3
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import kflume


def small_qwen3(path: str) -> str:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                   eos_token_id=None, tie_word_embeddings=False)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or small_qwen3(tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # weights: here only
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left-padded prompts of 5, 12 and 9 tokens
    mask[2, :3] = 0
    ids = ids * mask
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                         do_sample=False)
    with kflume.Cluster.for_model(args.nodes, model, capacity_tokens=4096,
                                  range_tokens=8) as cluster:
        kflume.patch(model, cluster)
        out = model.generate(input_ids=ids, attention_mask=mask,
                             max_new_tokens=args.new_tokens, do_sample=False)
        kflume.unpatch(model)
    new = out[:, ids.shape[1]:]
    for r in range(ids.shape[0]):
        print(f"request {r}: {new[r].tolist()}")
    same = torch.equal(out, ref)
    print(f"same tokens as the model without kflume: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
