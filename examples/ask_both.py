"""Ask the original model and its converted OUT_DIR the same question; print both answers.

    python examples/ask_both.py ORIGINAL OUT_DIR "What is the capital of France?" [--max-new-tokens 64]

The original runs through transformers in the converted model's dtype, the converted one through
`precompile.load`; both decode greedily with the original's chat template (when it has one) and its
generation settings, so any difference in the answers comes from the conversion.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

import precompile


def answer(model, tok, question: str, max_new: int) -> str:
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(question, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("out_dir")
    ap.add_argument("question")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    converted = precompile.load(args.out_dir)
    original = AutoModelForCausalLM.from_pretrained(args.original, dtype=converted.dtype).eval()
    tok = AutoTokenizer.from_pretrained(args.original)
    dtype = str(converted.dtype).removeprefix("torch.")
    print(f"question: {args.question}")
    for name, model in (("original ", original), ("converted", converted)):
        print(f"{name} ({dtype}): {answer(model, tok, args.question, args.max_new_tokens)}")


if __name__ == "__main__":
    main()
