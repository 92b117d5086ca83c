"""A bad profile exits 2 with one line naming the profile file, the key and the fix; nothing is written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import check_refused

LLAMA = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "llama.yaml").read_text())


# src (conftest): a copy of the tiny Llama, untied, GQA 4/2 heads, no attention biases


def _profile(tmp_path: Path, change) -> Path:
    data = copy.deepcopy(LLAMA)
    data["name"] = "my-llama"
    change(data)
    p = tmp_path / "my-llama.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def _set(path: str, value):
    """A change that sets a dotted key (list indices as numbers) to value."""
    def change(data):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            data = data[k]
        data[last] = value
    return change


def _drop(path: str):
    def change(data):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            data = data[k]
        del data[last]
    return change


CASES = {
    # unknown keys, top level and nested: the known ones are listed
    "unknown-top": (_set("attn_bias", True), ("'attn_bias'", "not a known key", "attention_module")),
    "unknown-nested": (_set("attn_norm.epsilon", 1e-6), ("'attn_norm.epsilon'", "not a known key", "eps")),
    # wrong types
    "name-number": (_set("name", 5), ("'name'", "string")),
    "description-list": (_set("description", ["x"]), ("'description'", "string")),
    "block-word": (_set("block", "sequential"), ("'block'", "one of serial, parallel")),
    "sizes-string": (_set("sizes.hidden_size", "hidden_size"), ("'sizes.hidden_size'", "list of config.json keys")),
    "projections-mapping": (_set("projections", {"role": "q"}), ("'projections'", "non-empty list")),
    "role-unknown": (_set("projections.0.role", "query"), ("'projections[0].role'", "q, k, v, qkv")),
    "bias-when-number": (_set("projections.0.bias_when", 3), ("'projections[0].bias_when'", "config.json key")),
    "norm-kind": (_set("attn_norm.kind", "batch"), ("'attn_norm.kind'", "rms, layer")),
    "offset-string": (_set("attn_norm.offset", "one"), ("'attn_norm.offset'", "number")),
    "scale-two": (_set("embedding.scale", {"sqrt": "hidden_size", "value": 2.0}), ("'embedding.scale'", "exactly one")),
    "match-string": (_set("match.architectures", "LlamaForCausalLM"), ("'match.architectures'", "list of names")),
    "activation": (_set("ffn.activation", "swishy"), ("'ffn.activation'", "silu")),
    "variant-when": (_set("variants", [{"when": [1], "set": {}}]), ("'variants[0].when'", "map config keys")),
    # missing required keys
    "missing-top": (_drop("attention_module"), ("'attention_module'", "missing")),
    "missing-nested": (_drop("embedding.tensor"), ("'embedding.tensor'", "missing")),
    "missing-size": (_drop("sizes.num_heads"), ("'sizes.num_heads'", "missing")),
    # config.json keys the model does not have
    "size-key-absent": (_set("sizes.hidden_size", ["d_model"]), ("'sizes.hidden_size'", "d_model", "config.json")),
    "eps-key-absent": (_set("attn_norm.eps", ["layer_norm_eps"]), ("'attn_norm.eps'", "layer_norm_eps")),
    # tensors that do not exist, and a bias the profile requires but the checkpoint lacks
    "tensor-misspelt": (_set("projections.1.weight", "model.layers.0.self_attn.key_proj.weight"),
                        ("'projections[1].weight'", "key_proj", "missing", "model.layers.0.self_attn.k_proj.weight",
                         "fix the name")),
    "norm-tensor-absent": (_set("attn_norm.weight", "model.layers.0.ln_1.weight"),
                           ("'attn_norm.weight'", "ln_1", "missing", "fix the name")),
    "bias-required": (_set("projections.2.bias_when", True), ("'projections[2].bias'", "bias_when", "v_proj.bias")),
    # shapes that disagree with the sizes the profile reads from config.json
    "kv-heads-key": (_set("sizes.num_kv_heads", ["num_attention_heads"]),
                     ("k_proj.weight", "'projections[1].weight'", "[32, 64]", "[64, 64]",
                      "sizes.num_kv_heads = 4 (config.json num_attention_heads)", "fix those sizes keys")),
    "head-dim-number": (_set("sizes.head_dim", 8), ("q_proj.weight", "[32, 64]", "sizes.head_dim = 8",
                                                    "fix those sizes keys")),
    "vocab-key": (_set("sizes.vocab_size", ["intermediate_size"]),
                  ("embed_tokens.weight", "'embedding.tensor'", "sizes.vocab_size = 96")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_profile(case, src, tmp_path):
    change, words = CASES[case]
    p = _profile(tmp_path, change)
    check_refused(src, tmp_path / "out", "--profile", str(p), words=(str(p), *words), watch=(p,))


def test_profile_that_is_not_a_mapping(src, tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- name: llama\n")
    check_refused(src, tmp_path / "out", "--profile", str(p), words=(str(p), "must be a mapping", "attention_module"))


def test_every_case_fails_for_its_own_reason(src, tmp_path):
    """The control: the unchanged copy converts, so each case above fails only through its change."""
    p = _profile(tmp_path, lambda d: None)
    from conftest import invoke

    r = invoke(src, tmp_path / "out", "--quiet", "--device", "cpu", "--profile", str(p))
    assert r.exit_code == 0, r.stderr
