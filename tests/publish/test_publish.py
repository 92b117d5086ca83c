"""Publishing: the model card in every OUT_DIR, `verify --update-card`, and `push` up to its single upload call.

Nothing here reaches the hub: sources come from an offline HF cache laid out under a temporary
HF_HOME, and huggingface_hub's HfApi calls are replaced in-process by recorders.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

import tiny
from conftest import ROOT, offline_hub, run_cli, run_cli_here, tree_snapshot

import precompile
from precompile.check.file_checks import check_outputs
from precompile.cli import main as cli_main
from precompile.errors import UserError
from precompile.io.hub import HUB_TRIES
from precompile.loader import FORMAT_VERSION
from precompile.plan.plan_report import to_markdown
from precompile.publish.card import CARD_FILE, SelfCheckSummary, read_source_card, render_card, update_card
from precompile.publish.push import PushPlan, push

REPO = "org/tiny-llama"
REV = "c" * 40
TARGET = "me/tiny-llama-precompiled"
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- text\n---\n# tiny llama\n"


@pytest.fixture(scope="module")
def src(checkpoint, tmp_path_factory) -> Path:
    d = tiny.copy_tree(checkpoint("llama"), tmp_path_factory.mktemp("src") / "tiny-llama")
    (d / CARD_FILE).write_text(SOURCE_CARD)
    return d


@pytest.fixture(scope="module")
def home(src, tmp_path_factory) -> Path:
    h = tmp_path_factory.mktemp("hf") / "home"
    tiny.lay_out_hub_cache(h, REPO, src, REV)
    return h


@pytest.fixture(scope="module")
def full(home, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    with offline_hub(home):
        precompile.convert(REPO, out, device="cpu")
    return out


@pytest.fixture(scope="module")
def overlay(home, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overlay") / "out"
    with offline_hub(home):
        precompile.convert(REPO, out, device="cpu", overlay=True)
    return out


def card_meta(out: Path):
    return ModelCard.load(out / CARD_FILE).data


def manifest(out: Path) -> dict:
    return tiny.read_json(out / "precompile.json")


# --- the card ------------------------------------------------------------------------------------------------------

def test_card_front_matter_holds_hub_metadata(full):
    data = card_meta(full)
    assert data.base_model == REPO
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert "precompile" in data.tags and "llama" in data.tags
    assert data.license == "apache-2.0"  # copied from the source's own card
    assert data.language == ["en", "fr"]
    text = (full / CARD_FILE).read_text()
    assert "https://arxiv.org/abs/2402.13388" in text
    assert f"format version {FORMAT_VERSION}" in text and f"precompile {precompile.__version__}" in text
    assert "trust_remote_code=True" in text and "precompile.load(" in text
    assert "Self-check\n\nPassed: layer 0 against transformers' llama class on " in text  # convert's self-check


def test_card_says_when_the_self_check_was_skipped(src, tmp_path):
    precompile.convert(str(src), tmp_path / "out", device="cpu", self_check=False)
    assert "Self-check\n\nNot run." in (tmp_path / "out" / CARD_FILE).read_text()


def test_card_is_recorded_and_integrity_covers_it(full, tmp_path):
    m = manifest(full)
    assert m["outputs"][CARD_FILE] == precompile.io.hashed_copy.file_sha256(full / CARD_FILE)
    assert check_outputs(full, m).passed
    damaged = tiny.copy_tree(full, tmp_path / "damaged")
    with open(damaged / CARD_FILE, "a") as f:
        f.write("edited\n")
    check = check_outputs(damaged, m)
    assert not check.passed and check.metrics["changed"] == [CARD_FILE]


def test_card_figures_equal_plan_json(src, tmp_path):
    out = tmp_path / "out"
    precompile.convert(str(src), out, device="cpu")
    r = run_cli_here("plan", src, "--json", "-")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    plan["source"] = src.name  # the card names a local source by its directory name, never its path
    plan["source_kind"] = "local"
    card = (out / CARD_FILE).read_text()
    assert to_markdown(plan) in card
    ex = plan["exact"]
    assert f"{plan['eliminated_weights']:,} (the paper's count)" in card
    assert f"exactly {ex['eliminated_weights']:,} weights" in card
    assert f"{ex['table_bytes']:,} bytes" in card
    assert f"{plan['memory_delta']:+,} weights" in card and f"{ex['memory_delta_bytes']:+,} bytes" in card
    assert f"{plan['reads_with_per_token']:,} values" in card
    assert str(src) not in card  # no local path is published
    assert "base_model" not in card_meta(out).to_dict()


def test_overlay_card_names_base_and_revision(overlay):
    data = card_meta(overlay)
    assert data.base_model == REPO
    text = (overlay / CARD_FILE).read_text()
    assert f"needs its base model `{REPO}` at revision `{REV}`" in text
    assert "kind `overlay`" in text
    assert manifest(overlay)["outputs"][CARD_FILE] == precompile.io.hashed_copy.file_sha256(overlay / CARD_FILE)


def test_equal_inputs_give_identical_card_bytes(full, home, tmp_path):
    with offline_hub(home):
        precompile.convert(REPO, tmp_path / "again", device="cpu")
        plan = precompile.plan_conversion(REPO)
    assert (tmp_path / "again" / CARD_FILE).read_bytes() == (full / CARD_FILE).read_bytes()
    check = SelfCheckSummary(True, "layer 0 within 1e-7 of transformers (bound 1e-6)")
    meta = read_source_card(plan.source.root)
    assert render_card(plan, meta, check) == render_card(plan, meta, check)
    assert "Passed: layer 0 within 1e-7" in render_card(plan, meta, check)
    assert "FAILED: x" in render_card(plan, meta, SelfCheckSummary(False, "x"))


@pytest.mark.parametrize("readme", [None, "---\nlicense: [unclosed\n---\n", b"\xff\xfe not utf-8",
                                    "---\n- a list\n---\n", "---\nlicense: 3\nlanguage: {a: b}\n---\n"])
def test_missing_or_malformed_source_card_never_fails(checkpoint, tmp_path, readme):
    s = tiny.copy_tree(checkpoint("llama"), tmp_path / "src")
    if isinstance(readme, str):
        (s / CARD_FILE).write_text(readme)
    elif readme is not None:
        (s / CARD_FILE).write_bytes(readme)
    precompile.convert(str(s), tmp_path / "out", device="cpu")
    data = card_meta(tmp_path / "out").to_dict()
    assert "license" not in data and "language" not in data
    assert data["library_name"] == "transformers"


def test_source_card_is_not_carried_over_the_generated_one(full):
    assert (full / CARD_FILE).read_text() != SOURCE_CARD
    assert "# tiny llama" not in (full / CARD_FILE).read_text()


# --- verify --update-card -------------------------------------------------------------------------------------------

def test_update_card_changes_only_the_card_and_its_hash(src, tmp_path):
    out = tmp_path / "out"
    precompile.convert(str(src), out, device="cpu")
    before = tree_snapshot(out)
    m0 = manifest(out)
    r = run_cli("verify", out, "--update-card", "--rows", "8", "--max-new-tokens", "2", "-q")
    assert r.returncode == 0, r.stderr
    after = tree_snapshot(out)
    assert sorted(after) == sorted(before)
    changed = sorted(n for n in after if after[n][2] != before[n][2])
    assert changed == [CARD_FILE, "precompile.json"]
    m1 = manifest(out)
    assert m1["outputs"].pop(CARD_FILE) != m0["outputs"].pop(CARD_FILE)
    assert m1["output_sizes"].pop(CARD_FILE) == (out / CARD_FILE).stat().st_size
    m0["output_sizes"].pop(CARD_FILE)
    assert m1 == m0  # the manifest differs only in the card's hash and size
    assert check_outputs(out, manifest(out)).passed
    card = (out / CARD_FILE).read_text()
    assert "**Passed**" in card and "| integrity | PASS |" in card and "| logits | PASS |" in card
    assert "Not run yet" not in card
    # a second update replaces the section instead of adding one
    result = {"passed": False, "reference": str(src), "revision": None, "dtype": "float32", "prompts": 1,
              "checks": [{"name": "integrity", "passed": True, "metrics": {"files": 3, "changed": [], "missing": []},
                          "threshold": {"changed": 0}},
                         {"name": "logits", "passed": False, "metrics": {"error": "boom"}, "threshold": {}}]}
    update_card(out, result)
    card = (out / CARD_FILE).read_text()
    assert card.count("## Verification") == 1 and "**FAILED**" in card and "failed: logits" in card
    assert check_outputs(out, manifest(out)).passed
    assert ModelCard.load(out / CARD_FILE).data.library_name == "transformers"


def test_update_card_refused_when_integrity_failed(full, tmp_path):
    out = tiny.copy_tree(full, tmp_path / "out")
    before = tree_snapshot(out)
    result = {"checks": [{"name": "integrity", "passed": False, "metrics": {}, "threshold": {}}]}
    assert "not updated" in update_card(out, result)
    assert tree_snapshot(out) == before


def test_update_card_without_card_is_refused_before_verify(full, tmp_path):
    out = tiny.copy_tree(full, tmp_path / "old")
    m = manifest(out)
    del m["outputs"][CARD_FILE]
    (out / "precompile.json").write_text(json.dumps(m))
    (out / CARD_FILE).unlink()
    r = run_cli("verify", out, "--update-card")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--update-card" in r.stderr


# --- push -----------------------------------------------------------------------------------------------------------

def test_push_dry_run_lists_exactly_the_files(full, tmp_path):
    out = tiny.copy_tree(full, tmp_path / "out")
    (out / "notes.txt").write_text("mine")  # not in the manifest: never uploaded
    r = run_cli("push", out, TARGET, "--revision", "v1", "--dry-run", env={"HF_TOKEN": ""})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"repo: {TARGET}") and lines[1] == "revision: v1"
    listed = {}
    for line in lines:
        if line.startswith("  "):
            name, size, _ = line.split()
            listed[name] = int(size.replace(",", ""))
    want = set(manifest(out)["outputs"]) | {"precompile.json"}
    assert set(listed) == want
    assert all(listed[n] == (out / n).stat().st_size for n in listed)
    assert "notes.txt" in lines[-2] and lines[-1] == "nothing uploaded (--dry-run)"


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_push_refuses_damaged_or_half_written_out_dir(full, tmp_path):
    out = tiny.copy_tree(full, tmp_path / "out")
    table = out / "precompile_table.safetensors"
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    one_line_error(run_cli_here("push", out, TARGET, "--dry-run"), "precompile_table.safetensors", "convert again")
    (out / "tokenizer.json").unlink()
    one_line_error(run_cli_here("push", out, TARGET, "--dry-run"), "missing: tokenizer.json")
    half = tmp_path / ".precompile-tmp-out-123"
    shutil.copytree(full, half)
    (half / "precompile.json").unlink()  # the manifest is the last file a conversion writes
    one_line_error(run_cli_here("push", half, TARGET, "--dry-run"), "not a precompiled model")


def test_push_refuses_overlay_of_local_directory(src, tmp_path):
    precompile.convert(str(src), tmp_path / "ov", device="cpu", overlay=True)
    one_line_error(run_cli_here("push", tmp_path / "ov", TARGET, "--dry-run"), "overlay of a local directory")
    r = run_cli("convert", src, tmp_path / "ov2", "--overlay", "--push-to-hub", TARGET, env={"HF_TOKEN": "hf_x"})
    one_line_error(r, "overlay of a local directory")
    assert not (tmp_path / "ov2").exists()


def test_missing_token_refused_before_anything(full, src, tmp_path):
    env = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HOME": str(tmp_path / "nohome")}  # the public hub
    one_line_error(run_cli("push", full, TARGET, env=env), "no Hugging Face token", "HF_TOKEN")
    r = run_cli("convert", src, tmp_path / "out", "--push-to-hub", TARGET, env=env)
    one_line_error(r, "no Hugging Face token")
    assert not (tmp_path / "out").exists()  # refused before converting


def test_bad_repo_id_refused(full):
    one_line_error(run_cli_here("push", full, "not a/valid//id", "--dry-run"), "REPO_ID")


def test_unreachable_endpoint_is_one_line(full, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "home")}
    one_line_error(run_cli("push", full, TARGET, "-q", env=env), "cannot reach the hub", f"127.0.0.1:{port}")


class Recorder:
    """Stands in for HfApi's write calls: records them, uploads nothing."""

    def __init__(self, monkeypatch, fail: dict[str, Exception] | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(HfApi, name, self._make(name, (fail or {}).get(name)))
        monkeypatch.setenv("HF_TOKEN", "hf_fake")

    def _make(self, name, error):
        def call(api, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            if error is not None:
                raise error
        return call

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def test_push_creates_repo_and_branch_then_uploads_once(full, monkeypatch):
    rec = Recorder(monkeypatch)
    plan = push(full, TARGET, private=True, revision="dev", commit_message="hello")
    assert isinstance(plan, PushPlan)
    assert rec.names() == ["create_repo", "create_branch", "upload_folder"]
    _, args, kw = rec.calls[0]
    assert (args[0] if args else kw["repo_id"]) == TARGET and kw["private"] is True and kw["exist_ok"] is True
    _, args, kw = rec.calls[1]
    assert kw["branch"] == "dev" and kw["exist_ok"] is True
    _, _, kw = rec.calls[2]
    assert kw["repo_id"] == TARGET and Path(kw["folder_path"]) == full and kw["revision"] == "dev"
    assert kw["commit_message"] == "hello"
    assert kw["delete_patterns"] == ["*.safetensors", "*.safetensors.index.json"]  # stale shards of older pushes
    assert sorted(kw["allow_patterns"]) == sorted(set(manifest(full)["outputs"]) | {"precompile.json"})
    rec.calls.clear()
    push(full, TARGET)
    assert rec.names() == ["create_repo", "upload_folder"]  # main needs no branch
    assert f"{REPO}" in rec.calls[1][2]["commit_message"]
    rec.calls.clear()
    push(full, TARGET, dry_run=True)
    assert rec.calls == []


def http_error(status: int, message: str = "") -> HfHubHTTPError:
    http = importlib.import_module(HfHubHTTPError.__bases__[0].__module__.split(".")[0])
    response = http.Response(status, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError(message or f"{status} error", response=response, server_message=message or None)


def transport_error() -> Exception:
    http = importlib.import_module(HfHubHTTPError.__bases__[0].__module__.split(".")[0])
    return http.ConnectError("[Errno 111] Connection refused")


@pytest.mark.parametrize("error, words", [
    (http_error(401, "Invalid credentials"), ["authentication failed (401)", "HF_TOKEN"]),
    (http_error(403, "You don't have the rights"), ["permission denied (403)", TARGET]),
    (http_error(403, "You have exceeded your storage quota"), ["quota exceeded"]),
    (http_error(402), ["quota exceeded"]),
    (http_error(500, "Internal Error"), ["(500: Internal Error)"]),
    (transport_error(), ["cannot reach the hub", "Connection refused"]),
    (http_error(429, "Too many requests"), ["rate-limiting", "wait"]),
    (OSError(5, "Input/output error"), ["uploading to", "Input/output error"]),
])
def test_hub_failures_are_one_line_exit_2(full, monkeypatch, capsys, error, words):
    rec = Recorder(monkeypatch, fail={"upload_folder": error})
    with pytest.raises(SystemExit) as e:
        cli_main(["push", str(full), TARGET, "-q"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    retried = HUB_TRIES if isinstance(error, HfHubHTTPError.__bases__[0]) and not isinstance(error, HfHubHTTPError) \
        else 1  # a network failure is tried again, an answer of the hub is not
    assert rec.names() == ["create_repo"] + ["upload_folder"] * retried


def test_convert_push_to_hub_uploads_after_converting(src, tmp_path, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(src), str(tmp_path / "out"), "--device", "cpu", "-q", "--push-to-hub", TARGET])
    assert e.value.code == 0, capsys.readouterr().err
    assert rec.names() == ["create_repo", "upload_folder"]
    assert Path(rec.calls[1][2]["folder_path"]) == tmp_path / "out"
    assert check_outputs(tmp_path / "out", manifest(tmp_path / "out")).passed


def test_batch_pushes_only_after_a_passing_verify(src, tmp_path, monkeypatch):
    from precompile import batch

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": [{"source": str(src), "out": "a", "push_to": TARGET, "verify": True}]}))
    rec = Recorder(monkeypatch)
    verdict = {"passed": False}
    monkeypatch.setattr(batch, "_verify", lambda entry, out, progress: {
        "passed": verdict["passed"], "checks": [{"name": "logits", "passed": verdict["passed"]}]})
    [r] = batch.run_batch(zoo, tmp_path / "root")
    assert r.status == "failed" and "verify failed" in r.error and rec.calls == [] and r.pushed is None
    verdict["passed"] = True
    [r] = batch.run_batch(zoo, tmp_path / "root")  # up to date: skipped, verified, then pushed
    assert r.status == "skipped" and r.pushed == TARGET and rec.names() == ["create_repo", "upload_folder"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"source": str(src), "push_to": "no//good"}]}))
    with pytest.raises(UserError, match=r"models\[0\]\.push_to"):
        batch.load_zoo(bad)


# --- loading what was pushed, from a hub snapshot -------------------------------------------------------------------

LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
import precompile
repo, local = sys.argv[1], sys.argv[2]
hub = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
ref = precompile.load(local)
ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
with torch.no_grad():
    a, b = hub(ids).logits, ref(ids).logits
print(type(hub).__name__, float((a - b).abs().max()))
"""


@pytest.mark.parametrize("kind", ["full", "overlay"])
def test_pushed_model_loads_with_from_pretrained_from_a_hub_snapshot(kind, full, overlay, home, tmp_path):
    out = full if kind == "full" else overlay
    hf_home = tmp_path / "home"
    shutil.copytree(home, hf_home, symlinks=True)  # the base at its revision, as the hub would serve it
    snap = tiny.lay_out_hub_cache(hf_home, TARGET, out, "d" * 40)
    assert not any(p.is_dir() for p in snap.iterdir())
    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, TARGET, str(out)], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home),
                            "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cls, diff = r.stdout.split()
    assert cls == "LlamaForCausalLM" and float(diff) == 0.0
