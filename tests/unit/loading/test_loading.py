import importlib.util
import json
import logging

import pytest

from aligner_core import Aligner, MissingDependencyError, ModelLoadError, TemplateError
from aligner_core.loading import DEFAULT_MODEL, packaged_model_path, resolve_source


def test_resolve_local_dir_and_gguf(tmp_path):
    assert resolve_source(tmp_path).kind == "dir"
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    src = resolve_source(f)
    assert (src.kind, src.gguf_file) == ("gguf", "m.Q4.gguf")
    # A directory holding a single GGUF and no config is a GGUF source.
    assert resolve_source(tmp_path).gguf_file == "m.Q4.gguf"
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="gguf_file"):
        resolve_source(tmp_path)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_source(other)


def test_hub_id_and_packaged_alias():
    assert resolve_source("someone/some-model").kind == "hub"
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_source("./missing/dir")
    if packaged_model_path(DEFAULT_MODEL) is not None:
        src = resolve_source(DEFAULT_MODEL)
        assert src.kind == "gguf" and src.gguf_file.endswith(".gguf") and src.name == DEFAULT_MODEL


def test_local_dir_loads_with_recorded_template(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="aligner_core"):
        aligner = Aligner.from_pretrained(tiny_model_dir, max_new_tokens=4)
    assert aligner.template.name == "aligner-general"
    assert "recorded in the model directory" in caplog.text
    assert aligner.correct("q", "an answer").completion_tokens <= 4


def test_template_fallbacks(tiny_model_dir, tmp_path, caplog):
    import shutil

    d = tmp_path / "aligner-7b-v1.0"
    shutil.copytree(tiny_model_dir, d)
    (d / "aligner_config.json").unlink()
    with caplog.at_level(logging.INFO, logger="aligner_core"):
        assert Aligner.from_pretrained(d).template.name == "chat"
    assert "chat template" in caplog.text
    cfg = json.loads((d / "config.json").read_text())
    cfg["_name_or_path"] = "aligner/aligner-7b-v1.0"
    (d / "config.json").write_text(json.dumps(cfg))
    # Official checkpoints use the v1 prompt even though their tokenizer may have a chat template.
    assert Aligner.from_pretrained(d).template.name == "aligner-v1"
    assert Aligner.from_pretrained(d, template="aligner-general").template.name == "aligner-general"


def test_no_template_can_be_chosen(tiny_model, tmp_path):
    from tests.conftest import build_tokenizer

    tiny_model.save_pretrained(tmp_path)
    build_tokenizer(chat=False).save_pretrained(tmp_path)
    with pytest.raises(TemplateError, match="pass template="):
        Aligner.from_pretrained(tmp_path)


def test_pickle_weights_need_opt_in(tiny_model, tiny_tokenizer, tmp_path):
    import torch

    tiny_model.config.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        Aligner.from_pretrained(tmp_path, template="aligner-v1")
    aligner = Aligner.from_pretrained(tmp_path, template="aligner-v1", allow_pickle=True, max_new_tokens=3)
    assert aligner.correct("q", "a").completion_tokens <= 3


def test_offline_hub_id_gives_actionable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        Aligner.from_pretrained("nobody-here/not-a-cached-model")


def test_conflicting_and_invalid_options(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="device or device_map"):
        Aligner.from_pretrained(tiny_model_dir, device="cpu", device_map="auto")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        Aligner.from_pretrained(tiny_model_dir, dtype="float13")
    with pytest.raises(ModelLoadError, match="quantization must be"):
        Aligner.from_pretrained(tiny_model_dir, quantization="3bit")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_quantization_without_bitsandbytes(tiny_model_dir):
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        Aligner.from_pretrained(tiny_model_dir, quantization="4bit")


@pytest.mark.skipif(importlib.util.find_spec("peft") is not None, reason="peft is installed")
def test_adapter_without_peft(tiny_model_dir, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"llm-aligner\[train\]"):
        Aligner.from_pretrained(tiny_model_dir, adapter=tmp_path)


def test_dtype_option(tiny_model_dir):
    import torch

    aligner = Aligner.from_pretrained(tiny_model_dir, dtype="bfloat16", max_new_tokens=3)
    assert aligner.engine.model.dtype == torch.bfloat16
    assert aligner.correct("q", "a").finish_reason in ("stop", "length")


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, aligner_core, langchain_aligner, llamaindex_aligner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
