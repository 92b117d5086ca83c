"""A tampered OUT_DIR (issue 18): a tensor missing or replaced, a manifest naming another table or a file outside,
a malformed manifest. Each must fail `verify` (exit 1, naming the check) and make `precompile.load` raise, even
when the tamperer rehashed what they changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from conftest import cli_in_process, edit_json, one_error_line, read_st, rehash, verify_report, write_st
from precompile.loader import INDEX, MANIFEST, PrecompileLoadError, load
from precompile.plan.table_layout import TABLE_FILE

UP2 = "model.layers.2.mlp.up_proj.weight"  # copied unchanged into OUT_DIR

pytestmark = pytest.mark.usefixtures("no_hang")  # a test that blocks fails after 90 s (conftest)


# ---------------------------------------------------------------- 9: a tensor missing or replaced in OUT_DIR


def _drop_from_output(out: Path, name: str) -> None:
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    shard = out / wm[name]
    sd = load_file(shard)
    sd.pop(name)
    save_file(sd, shard, metadata={"format": "pt"})
    edit_json(out / INDEX, lambda i: i["weight_map"].pop(name))
    rehash(out, shard.name, INDEX)


def test_output_missing_a_tensor_fails_verify_and_load(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    _drop_from_output(out, UP2)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1, err
    one_error_line(err, "verification failed", "copied-tensors")
    assert not checks["copied-tensors"]["passed"]
    assert UP2 in checks["copied-tensors"]["metrics"]["dropped_not_eliminated"]
    with pytest.raises(PrecompileLoadError, match="lacks 1 weight"):
        load(out)


def test_output_tensor_replaced_fails_verify(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    shard = out / wm[UP2]
    sd = load_file(shard)
    sd[UP2] = torch.randn_like(sd[UP2])
    save_file(sd, shard, metadata={"format": "pt"})
    rehash(out, shard.name)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1 and not checks["copied-tensors"]["passed"], err
    assert UP2 in checks["copied-tensors"]["metrics"]["mismatched"]


# ---------------------------------------------------------------- 6: the manifest names another table


def test_manifest_names_a_clean_copy_of_a_damaged_table(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    shutil.copy(out / TABLE_FILE, out / "clean.safetensors")
    header, body = read_st(out / TABLE_FILE)
    body = bytearray(body)
    body[:256] = b"\x7f" * 256  # rows of token 0 and 1 become huge values
    write_st(out / TABLE_FILE, header, bytes(body))
    edit_json(out / MANIFEST, lambda m: m["table"].update(file="clean.safetensors"))
    rehash(out, TABLE_FILE, "clean.safetensors")
    code, err, checks = verify_report(out, tmp_path, "--rows", "all")
    assert code == 1, err
    one_error_line(err, "verification failed", "integrity")
    assert not checks["integrity"]["passed"] and "clean.safetensors" in checks["integrity"]["metrics"]["table_file"]
    assert not checks["table-rows"]["passed"]  # the rows checked are the ones the model loads
    with pytest.raises(PrecompileLoadError, match="clean.safetensors"):
        load(out)


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["table"].update(file="../elsewhere/precompile_table.safetensors"), ("table.file",)),
    (lambda m: m["table"].update(file="/etc/passwd"), ("table.file",)),
    (lambda m: m["outputs"].update({"../x": "0" * 64}), ("outputs",)),
    (lambda m: m["source"]["files"].update({"../../etc/passwd": "0" * 64}), ("source.files",)),
    (lambda m: m["table"].update(columns="nope"), ("table.columns",)),
    (lambda m: m["loader"].update(hidden_size="64"), ("hidden_size",)),
    (lambda m: m.update(eliminated={"a": 1}), ("eliminated",)),
], ids=["table-dotdot", "table-absolute", "outputs-dotdot", "source-dotdot", "columns-str", "hidden-str",
        "eliminated-dict"])
def test_malformed_manifest_is_one_line(converted, tmp_path, damage, words):
    out = tiny.copy_tree(converted, tmp_path / "out")
    edit_json(out / MANIFEST, damage)
    code, err = cli_in_process("verify", out, "--quiet", "--device", "cpu")
    assert code == 2
    one_error_line(err, MANIFEST, "malformed", *words)
    with pytest.raises(PrecompileLoadError, match="malformed"):
        load(out)


def test_output_index_naming_a_file_outside(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    edit_json(out / INDEX, lambda i: i["weight_map"].update({UP2: "../other/x.safetensors"}))
    rehash(out, INDEX)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1 and not checks["integrity"]["passed"], err
    with pytest.raises(PrecompileLoadError, match="not a file inside"):
        load(out)
