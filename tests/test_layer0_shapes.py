"""Layer-0 shapes beyond attention over q/k/v (issue #17), each a tiny random transformers model converted with
its shipped profile: latent attention (MLA: DeepSeek-V2/V3, GLM-4 MoE Lite, Youtu, MiniCPM3) and sequence mixers
other than attention whose input projection is per token (state-space: Mamba; short convolution: LFM2).

The same checks as tests/test_families_profile_keys.py: float32 logits within 1e-5 (relative to the largest logit) of
transformers' and the same greedy generation on a left-padded batch; bfloat16 no farther from the float32 upcast
than the bfloat16 original is; every table row within verify's derived rounding bound of a float64 recomputation.
"""

from __future__ import annotations

import pytest
import tiny

# the checks of tests/test_families_profile_keys.py, run here on the families of this file (imported under other names,
# so that pytest does not collect them here with that file's families)
from test_families_profile_keys import test_bfloat16_no_farther_than_original as bfloat16_no_farther_than_original
from test_families_profile_keys import test_float32_matches_transformers as float32_matches_transformers

FAMILIES = list(tiny.SHAPE_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_matches_transformers(family, converted_family):
    float32_matches_transformers(family, converted_family)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_no_farther_than_original(family, converted_family):
    bfloat16_no_farther_than_original(family, converted_family)


@pytest.mark.parametrize("profile, patch, words", [
    ("mamba", {"projections": [{"role": "mixer_in", "weight": "w", "module": "m"}]}, "projections[0].width"),
    ("llama", {"projections": [{"role": "q", "weight": "w", "module": "m", "width": [8]},
                               {"role": "k", "weight": "w", "module": "m"},
                               {"role": "v", "weight": "w", "module": "m"}]}, "projections[0].width"),
    ("mamba", {"projections": [{"role": "mixer_in", "weight": "w", "module": "m", "width": ["2 * (x"]}]},
     "projections[0].width"),
    ("mamba", {"projections": [{"role": "mixer_in", "weight": "w", "module": "m", "width": ["__import__('os')"]}]},
     "projections[0].width"),
    ("mamba", {"projections": [{"role": "mixer_in", "weight": "w", "module": "m", "width": 4, "zero_masked": 1}]},
     "projections[0].zero_masked"),
    ("deepseek_v3", {"projections": [{"role": "mla_q", "weight": "w", "module": "m", "width": 4,
                                      "low_rank": {"weight": "a", "module": "b"}},
                                     {"role": "mla_kv", "weight": "w", "module": "m", "width": 4}]},
     "projections[0].low_rank.rank"),
    ("deepseek_v3", {"projections": [{"role": "mla_q", "weight": "w", "module": "m", "width": 4},
                                     {"role": "mla_kv", "weight": "w", "module": "m", "width": 4,
                                      "out_norm": {"kind": "rms", "eps": 1e-6}}]}, "projections[1].out_norm.width"),
    ("deepseek_v3", {"projections": [{"role": "mla_q", "weight": "w", "module": "m", "width": 4}]}, "projections"),
])
def test_new_keys_are_validated(profile, patch, words, tmp_path):
    """A mistake in a projection's width, low_rank, out_norm or zero_masked names the file and the key."""
    import yaml

    from precompile.errors import UserError
    from precompile.profiles.catalog import load_profile
    from precompile.profiles.profile_resolution import _apply_patch
    from precompile.profiles.shipped import configs_dir

    data = _apply_patch(yaml.safe_load((configs_dir() / f"{profile}.yaml").read_text()), patch)
    data.pop("variants", None)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=str(path)) as e:
        load_profile(path)
    assert f"'{words}'" in str(e.value)


def test_expressions_read_config_keys():
    """An arithmetic entry is present when every key it names is; the first present entry wins (GPT-J's n_inner)."""
    from precompile.profiles.config_values import ConfigValue, expression_value

    cfg = {"n_inner": None, "n_embd": 64, "a": {"b": 3}, "layer_types": ["conv", "full_attention"]}
    assert expression_value(cfg, "4 * n_embd") == 256
    assert expression_value(cfg, "(n_embd + a.b) // 2 - 1") == 32
    assert expression_value(cfg, "4 * missing") is None
    gptj_ffn = ConfigValue(keys=("n_inner", "4 * n_embd"))
    assert gptj_ffn.read(cfg) == 256
    assert gptj_ffn.read({**cfg, "n_inner": 96}) == 96


def test_a_mixer_config_with_a_biased_input_projection_is_refused():
    """zero_masked is exact only without a bias: such a config is refused by name, not converted wrong."""
    from precompile.errors import UserError
    from precompile.profiles.catalog import load_profile
    from precompile.profiles.profile_resolution import resolve
    from precompile.profiles.shipped import configs_dir

    with pytest.raises(UserError, match="use_bias"):
        resolve(load_profile(configs_dir() / "mamba.yaml"), tiny.make_config("mamba", use_bias=True).to_dict())
