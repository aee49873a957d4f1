"""Bad input a user can cause ends in a clear EdgerunError naming the file or tensor (and one CLI line)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import edgerun
from edgerun.cli import main
from hf_models import build, save


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save(build("mixtral"), tmp_path_factory.mktemp("good") / "m")


def copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgerun") and "error:" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_missing_directory(tmp_path, capsys):
    with pytest.raises(edgerun.ModelNotFoundError, match="no such model directory"):
        edgerun.load(tmp_path / "nope")
    assert "nope" in cli_error(capsys, ["run", str(tmp_path / "nope"), "-p", "hi"])


def test_missing_config(good_dir, tmp_path, capsys):
    d = copy_model(good_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(edgerun.EdgerunError, match="config.json"):
        edgerun.load(d)
    assert "config.json" in cli_error(capsys, ["run", str(d), "-p", "hi"])


def test_invalid_config_json(good_dir, tmp_path):
    d = copy_model(good_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(edgerun.CheckpointError, match="config.json is not valid JSON"):
        edgerun.load(d)


def test_config_missing_field(good_dir, tmp_path):
    d = copy_model(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(edgerun.CheckpointError, match="hidden_size"):
        edgerun.load(d)


def test_unknown_model_type(good_dir, tmp_path, capsys):
    d = copy_model(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(edgerun.UnsupportedModelError) as e:
        edgerun.load(d)
    message = str(e.value)
    assert "'llama'" in message and all(f in message for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "grok-1"))
    assert "llama" in cli_error(capsys, ["run", str(d), "-p", "hi"])


def test_missing_shard(tmp_path, capsys):
    d = save(build("olmoe"), tmp_path / "s", "sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(edgerun.CheckpointError, match=shard):
        edgerun.load(d)
    assert shard in cli_error(capsys, ["run", str(d), "-p", "hi"])


def test_truncated_safetensors(good_dir, tmp_path, capsys):
    d = copy_model(good_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(edgerun.CheckpointError, match="model.safetensors"):
        edgerun.load(d)
    assert "model.safetensors" in cli_error(capsys, ["run", str(d), "-p", "hi"])


def test_wrong_shape(good_dir, tmp_path, capsys):
    d = copy_model(good_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(edgerun.CheckpointError, match=name.replace(".", r"\.") + ".*shape"):
        edgerun.load(d)
    assert name in cli_error(capsys, ["run", str(d), "-p", "hi"])


def test_expert_beyond_config(good_dir, tmp_path):
    d = copy_model(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = 3  # the checkpoint holds 4
    (d / "config.json").write_text(json.dumps(cfg))
    # the router is the first tensor to disagree with the config
    with pytest.raises(edgerun.CheckpointError, match=r"block_sparse_moe\.gate\.weight.*shape \[4, 64\]"):
        edgerun.load(d)


def test_prompt_longer_than_context(good_dir):
    model = edgerun.load(good_dir, context_length=16)
    with pytest.raises(edgerun.ContextLengthError, match="16"):
        model.logits(list(range(20)))
    with pytest.raises(edgerun.ContextLengthError):
        model.generate_ids(list(range(16)), 4)
    # a prompt that fits generates until the context is full, then stops
    out = model.generate_ids(list(range(10)), 50, temperature=0.0, ignore_eos=True)
    assert len(out) == 16 - 10 + 1 and model.stats()["finish_reason"] == "context"


def test_bad_generation_arguments(good_dir):
    model = edgerun.load(good_dir)
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.0},
                   {"repetition_penalty": 0}):
        with pytest.raises(edgerun.GenerationError):
            model.generate_ids([1, 2, 3], 2, **kwargs)
    with pytest.raises(edgerun.GenerationError, match="max_new_tokens"):
        model.generate_ids([1, 2, 3], 0)
    with pytest.raises(edgerun.GenerationError, match="outside the vocabulary"):
        model.logits([1, 5000])


def test_bad_cli_arguments(capsys):
    cli_error(capsys, ["run"])  # MODEL missing
    cli_error(capsys, ["run", "x", "-n", "many"])
    cli_error(capsys, ["frobnicate"])


def test_console_script_error_is_one_line(tmp_path):
    """The installed `edgerun` entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "edgerun.cli", "run", str(tmp_path / "missing"), "-p", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr and "Traceback" not in proc.stderr
