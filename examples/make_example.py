"""Build the tiny Llama-style example checkpoint in examples/tiny-llama (committed; run to regenerate).

It is a random model (GQA 4/2 heads, 4 layers, bfloat16, sharded) with a BPE tokenizer trained on a few
sentences: big enough to exercise every part of a conversion, small enough to ship (< 1 MB).
    python examples/make_example.py
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny-llama"
TEXT = (HERE / "prompts.txt").read_text(encoding="utf-8").splitlines() * 8


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=250, special_tokens=["<pad>", "<s>", "</s>",
                                                                                       "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", padding_side="left")
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=4, vocab_size=256,
                                  max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.to(torch.bfloat16).save_pretrained(OUT, max_shard_size="200KB")
    tokenizer.save_pretrained(OUT)
    print(f"wrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir()) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
