"""The support matrix: every causal LM of the installed transformers is classified, docs/support.md is what the
generator writes now, and every type it calls supported is converted and compared with transformers by a test."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import tiny
from conftest import ROOT
from tiny import WRITTEN_PROFILES

from precompile.profiles import support
from precompile.profiles.catalog import builtin_profiles, refusals
from precompile.profiles.shipped import STATUSES, shipped_matrix

DOC = ROOT / "docs" / "support.md"


@pytest.fixture(scope="module")
def matrix() -> list[support.Support]:
    return support.support_matrix()


def test_every_registry_type_is_classified(matrix):
    """A transformers upgrade that adds a model type the facts cannot decide fails here (drift)."""
    assert [r.model_type for r in matrix] == sorted(support.registry())
    unclassified = [f"{r.model_type} ({r.architecture}): {r.detail}" for r in matrix if r.status not in STATUSES]
    assert not unclassified, "add configs/_support.yaml entries or signals for: " + "; ".join(unclassified)
    assert all(r.detail for r in matrix)


def test_an_undecidable_type_is_reported_unclassified():
    """The drift check can fail: a registry entry whose source the facts cannot read stays unclassified."""
    r = support.classify("no_such_type", "NoSuchForCausalLM", builtin_profiles(), refusals(), {})
    assert r.status == "unclassified" and "configs/_support.yaml" in r.detail


def _doc_version() -> str:
    return re.search(r"Generated from transformers (\S+)'s", DOC.read_text(encoding="utf-8")).group(1)


def test_docs_support_md_is_up_to_date(matrix):
    import transformers

    if _doc_version() != transformers.__version__:  # the drift test above still runs on this version
        pytest.skip(f"docs/support.md describes transformers {_doc_version()}, {transformers.__version__} is installed")
    assert DOC.read_text(encoding="utf-8") == support.to_markdown(matrix), \
        "docs/support.md is stale: run python -m precompile.profiles.support --write docs/support.md"


def test_shipped_classification_is_up_to_date(matrix):
    """What `precompile profiles` prints (configs/_support_matrix.json) is what the generator writes now."""
    import transformers

    version, rows = shipped_matrix()
    if version != transformers.__version__:
        pytest.skip(f"the shipped classification describes transformers {version}, {transformers.__version__} is "
                    "installed")
    assert (ROOT / "configs" / support.MATRIX_FILE).read_text(encoding="utf-8") == \
        support.to_json(matrix, transformers.__version__), \
        "configs/_support_matrix.json is stale: run python -m precompile.profiles.support --write docs/support.md"
    assert rows == matrix


def test_classification_follows_the_facts(matrix):
    """Representative rows, each decided by a different fact."""
    by = {r.model_type: r for r in matrix}
    assert by["llama"].status == support.SUPPORTED and by["llama"].detail == "llama"
    assert by["gpt2"].status == support.REFUSED and "absolute position" in by["gpt2"].detail  # _refused.yaml
    assert by["bert"].status == support.REFUSED and "absolute position" in by["bert"].detail  # source signal
    assert by["bart"].status == support.REFUSED and "encoder-decoder" in by["bart"].detail  # is_encoder_decoder
    assert by["deepseek_v3"].status == support.SUPPORTED and by["mamba"].status == support.SUPPORTED
    # latent attention is expressible: an MLA type without a profile needs only the YAML
    assert by["axk1"].status == support.NOT_YET and "schema expresses its latent attention" in by["axk1"].detail
    assert by["deepseek_v32"].status == support.NOT_YET and "not softmax attention" in by["deepseek_v32"].detail
    assert by["qwen3_next"].status == support.NOT_YET and "in_proj_ba" in by["qwen3_next"].detail  # _support.yaml
    assert by["rwkv"].status == support.REFUSED and "token shift" in by["rwkv"].detail  # configs/_support.yaml
    olmo2, gptj, granite = by["olmo2"].shape, by["gptj"].shape, by["granite"].shape
    assert (olmo2.norm, olmo2.qk_norm) == ("none", "full width")
    assert (gptj.block, gptj.norm) == ("parallel", "layer")
    assert granite.embedding_scale == "outside the module"
    for shape in ("no norm before attention", "q/k norms over the whole projection width"):
        if not support.expressible(shape):  # until the schema expresses it, the matrix says it is missing
            assert shape in by["olmo2"].detail or by["olmo2"].status == support.SUPPORTED


# Rows that once said "a YAML profile should do" but whose layer 0 a profile cannot express or the loader cannot
# run (each found by writing the profile), with words of the reason the matrix now gives.
NOT_PROMISED = {
    "jetmoe": "kv_proj",  # the query from a mixture of attention experts, a fused k/v projection
    "nanochat": "also the final norm",  # one norm module before and after the layers
    "minimax": "residual stream",  # the attention norm's output is the residual
    "afmoe": "gate_proj", "laguna": "g_proj",  # gated attention: another projection of the normed input
    "minimax_m3_vl_text": "indexer",
    "gemma4_text": "v_norm",  # a norm on v
    "mimo_v2_flash": "v_head_dim",
    "moshi": "more than the input",  # q_proj(hidden_states, codebook_idx)
    "phi4_multimodal": "embed_tokens_extend",  # other modalities' features replace some rows
    "gemma3n_text": "computes from its input first",  # AltUp's prediction feeds the attention norm
    "xlnet": "serial or parallel",
}


def test_rows_a_profile_cannot_serve_are_not_promised(matrix):
    by = {r.model_type: r for r in matrix}
    for model_type, words in NOT_PROMISED.items():
        row = by[model_type]
        assert row.status == support.NOT_YET and "should do" not in row.detail and words in row.detail, row


def test_a_forward_reading_only_the_embedding_weights_device_is_promised(matrix):
    """Llama 4 reads `self.embed_tokens.weight.device`, which the converted embedding's `.weight` serves tied or
    untied (tests/test_transformers_api.py converts it); a forward reading the weight's values is not promised."""
    by = {r.model_type: r for r in matrix}
    assert "should do" in by["llama4_text"].detail and "embedding's weight" not in by["llama4_text"].detail
    for model_type in ("qwen4_exp_text", "gemma4_text"):
        assert "should do" not in by[model_type].detail, by[model_type]


def test_overrides_name_registry_types():
    """configs/_support.yaml decides only types transformers has, and never one the facts already refuse."""
    registry = support.registry()
    assert set(support._overrides()) <= set(registry)


def _tiny_model_types() -> dict[str, str]:
    """tiny family name -> model type, over every *FAMILIES registry of tests/tiny.py."""
    out = {}
    for name, value in vars(tiny).items():
        if name.endswith("FAMILIES") and isinstance(value, dict):
            out.update({fam: kw["model_type"] for fam, kw in value.items() if "model_type" in kw})
    return out


def _tested_types() -> dict[str, set[str]]:
    """model type -> dtypes ('float32', 'bfloat16') of the collected tests parametrized with a tiny family of it."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    types = _tiny_model_types()
    out: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"tests/\S+::(\w+)\[(.+)\]", line.strip())
        if not m:
            continue
        params = m.group(2).split("-")
        dtypes = {d for d in ("float32", "bfloat16") if d in m.group(1) or d in params}
        for p in params:
            if p in types:
                out.setdefault(types[p], set()).update(dtypes)
    return out


def test_every_supported_type_is_compared_with_transformers(matrix):
    """'supported' cannot lie: each supported model type has a tiny-model test in float32 and in bfloat16
    (a collected test parametrized with a tiny family of that type, the dtype in its name or parameters)."""
    tested = _tested_types()
    assert tested.get("llama") == {"float32", "bfloat16"}  # the collection itself works
    missing = {r.model_type: sorted({"float32", "bfloat16"} - tested.get(r.model_type, set()))
               for r in matrix if r.status == support.SUPPORTED}
    assert not {t: d for t, d in missing.items() if d}, "supported types without tests: " + str(missing)


def test_cli_profiles_prints_the_matrix(matrix):
    text = support.to_text(matrix)
    for r in matrix:
        row = rf"^  {re.escape(r.model_type)} +{re.escape(r.architecture)} "
        assert re.search(row, text, re.MULTILINE), r.model_type
    assert "not yet (" in text and "refused (" in text and "supported (" in text


def test_generator_runs_from_the_command_line(tmp_path):
    out, data = tmp_path / "support.md", tmp_path / "support.json"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "precompile.profiles.support", *args, "--data", str(data)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)

    r = run("--write", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("# Support matrix\n") and "| llama | LlamaForCausalLM |" in out.read_text()
    assert shipped_matrix(data)[1] == support.support_matrix()
    r = run("--check", str(out))
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    for path, old, new in ((out, "| llama |", "| llama2 |"), (data, '"llama"', '"llama2"')):
        text = path.read_text()
        path.write_text(text.replace(old, new))
        r = run("--check", str(out))
        assert r.returncode == 1 and f"{path} stale" in r.stdout, r.stdout + r.stderr
        path.write_text(text)



def test_written_profiles_cover_should_do_rows(matrix):
    """The sample below is of rows the matrix promises a profile for (at least five of them)."""
    by = {r.model_type: r for r in matrix}
    assert len(WRITTEN_PROFILES) >= 5
    for family in WRITTEN_PROFILES:
        row = by[tiny.PROFILE_SAMPLE_FAMILIES[family]["model_type"]]
        assert row.status == support.NOT_YET and "a YAML profile should do" in row.detail, row


@pytest.mark.numeric
@pytest.mark.parametrize("family", sorted(WRITTEN_PROFILES))
def test_a_written_profile_converts_exactly(family, checkpoint, tmp_path):
    """A profile written from configs/README.md for a "should do" row converts a tiny model of the family: the
    self-check passes, and float32 logits and greedy generation match transformers'."""
    import torch
    from conftest import greedy_ids, masked_logits, prompt_batch
    from transformers import AutoModelForCausalLM

    import precompile

    src = checkpoint(family)
    prof = tmp_path / f"{family}.yaml"
    prof.write_text(WRITTEN_PROFILES[family])
    result = precompile.convert(str(src), tmp_path / "out", profile=str(prof), device="cpu")
    assert result.self_check is not None and result.self_check.passed
    enc = prompt_batch()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = precompile.load(tmp_path / "out")
    want, got = masked_logits(ref, enc), masked_logits(model, enc)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    gen = greedy_ids(ref, enc)
    assert len(set(gen[:, -16:].flatten().tolist())) > 2
    assert torch.equal(greedy_ids(model, enc), gen)
