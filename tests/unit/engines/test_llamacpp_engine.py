"""The llama.cpp engine's drafting arithmetic (which draft tokens pay), without a model, and its import cost.

The engine itself, on the packaged SmolLM2 GGUF, is tested in tests/integration/engines/test_llamacpp_engine.py (it skips
without llama-cpp-python: ``pip install "llm-aligner[llamacpp]"`` compiles llama.cpp for about six minutes).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from aligner_core.engines.llamacpp.drafting import AnswerDrafter, CostModel, DraftState, plan_drafts

# -- drafting arithmetic, no model ------------------------------------------------------------------


def test_drafter_follows_the_answer():
    d = AnswerDrafter([5, 6, 7, 8, 5, 6, 9, 10])
    assert d.propose([], 3) == [5, 6, 7]
    assert d.propose([1, 5, 6], 2) == [7, 8]
    d.accepted([5, 6, 7, 8, 5, 6])
    assert d.propose([5, 6, 7, 8, 5, 6], 2) == [9, 10]
    assert d.propose([42], 3) == []


def _cost() -> CostModel:
    cost = CostModel()
    for n, ms in ((1, 9), (2, 16), (4, 23), (8, 37), (16, 65), (32, 122)):  # measured on a 2-core CPU
        cost.observe(n, ms / 1000)
    return cost


def test_cost_model_interpolates_and_ignores_spikes():
    cost = _cost()
    assert cost.time(1) == pytest.approx(0.009)
    assert cost.time(3) == pytest.approx(0.0195)
    assert cost.time(64) == pytest.approx(0.122 + 57 / 16000 * 32)
    cost.observe(4, 2.5)  # another job took the cores for a moment: the fastest time of that size stands
    assert cost.time(4) == pytest.approx(0.023)


def test_drafts_grow_with_acceptance_and_stop_when_they_do_not_pay():
    cost = _cost()
    copying = DraftState(max_draft=32)
    for _ in range(6):
        copying.verified(copying.cap, copying.cap)  # every draft accepted: the cap doubles up to the maximum
    assert copying.cap == 32 and copying.acceptance > 0.95
    assert plan_drafts([(copying, 100)], 1, cost) == [32]
    missing = DraftState(max_draft=32)
    for _ in range(10):
        missing.verified(4, 0)
    assert missing.acceptance < 0.1
    assert plan_drafts([(missing, 100)], 1, cost) == [0]  # plain decoding: a draft would only cost time
    missing.shadow(True)  # a plain step whose one-token draft would have matched raises the estimate again
    assert missing.acceptance > 0.1
    # 32 sequences per step: the decode is compute-bound, so only near-certain drafts are worth their cost.
    half = DraftState(max_draft=32)
    assert plan_drafts([(half, 100)] * 32, 32, cost) == [0] * 32


def test_importing_the_package_does_not_import_llama_cpp():
    code = "import sys, aligner_core, aligner_core.engines.llamacpp; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- which engine engine="auto" picks, and the errors of engine="llama.cpp", without a model --------------------


@pytest.fixture
def gguf(tmp_path):
    """A file that only looks like a GGUF: the choice is made from the path, nothing reads it."""
    path = tmp_path / "model.Q4_0.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_auto_picks_llama_cpp_for_a_gguf_on_a_cpu_only_machine(gguf, tiny_model_dir):
    from aligner_core.engines.choosing import choose_engine

    assert choose_engine(gguf, llama_cpp=True, accelerator=False) == "llama.cpp"
    assert choose_engine(gguf, device="cpu", llama_cpp=True, accelerator=False) == "llama.cpp"
    assert (
        choose_engine(gguf.parent, llama_cpp=True, accelerator=False) == "llama.cpp"
    )  # a folder with one GGUF
    assert (
        choose_engine(gguf, llama_cpp=True, accelerator=True) == "transformers"
    )  # a GPU: transformers batches
    assert choose_engine(gguf, llama_cpp=False, accelerator=False) == "transformers"
    assert choose_engine(tiny_model_dir, llama_cpp=True, accelerator=False) == "transformers"  # no GGUF
    assert choose_engine("org/model", gguf_file="m.gguf", llama_cpp=True, accelerator=False) == "llama.cpp"
    assert choose_engine("org/model", llama_cpp=True, accelerator=False) == "transformers"
    assert (
        choose_engine("./no/such/model", llama_cpp=True, accelerator=False) == "transformers"
    )  # its error later


@pytest.mark.parametrize(
    "option",
    [
        {"device": "cuda"},
        {"device_map": "auto"},
        {"quantization": "4bit"},
        {"dtype": "bfloat16"},
        {"max_batch_tokens": 512},
        {"adapter": "a-peft-folder"},
    ],
)
def test_transformers_only_options_keep_the_transformers_engine(gguf, option):
    from aligner_core.engines.choosing import choose_engine

    assert choose_engine(gguf, llama_cpp=True, accelerator=False, **option) == "transformers"


def test_a_gguf_lora_keeps_llama_cpp(gguf, tmp_path):
    from aligner_core.engines.choosing import choose_engine

    lora = tmp_path / "lora.gguf"
    lora.write_bytes(b"GGUF")
    assert choose_engine(gguf, adapter=lora, llama_cpp=True, accelerator=False) == "llama.cpp"


def test_the_install_hint_is_logged_once(gguf, caplog, monkeypatch):
    from aligner_core.engines import choosing

    monkeypatch.setattr(choosing, "_hinted", False)
    with caplog.at_level("INFO", logger="aligner_core"):
        for _ in range(3):
            assert choosing.choose_engine(gguf, llama_cpp=False, accelerator=False) == "transformers"
        choosing.choose_engine(gguf, llama_cpp=True, accelerator=True)  # a GPU: nothing to hint
    hints = [r.getMessage() for r in caplog.records if "llm-aligner[llamacpp]" in r.getMessage()]
    assert hints == [choosing.INSTALL_HINT]


def test_engine_names():
    from aligner_core.engines.choosing import canonical
    from aligner_core.jobs.choice import EngineChoice

    assert [canonical(n) for n in (None, "auto", "llamacpp", "llama.cpp", "Transformers")] == [
        "auto",
        "auto",
        "llama.cpp",
        "llama.cpp",
        "transformers",
    ]
    with pytest.raises(ValueError, match="'llama.cpp'"):
        canonical("llama")
    assert EngineChoice().engine == "auto" and EngineChoice(engine="llama.cpp").where == "llama.cpp engine"
    EngineChoice(engine="llamacpp")
    with pytest.raises(ValueError, match="--engine must be one of"):
        EngineChoice(engine="llama")
    with pytest.raises(ValueError, match="contradict"):
        EngineChoice(server="http://127.0.0.1:9/v1", engine="llama.cpp")


def test_llama_cpp_options_that_do_not_apply_fail_before_loading(gguf):
    from aligner_core import Aligner

    with pytest.raises(
        ValueError, match=r"engine='llama.cpp' does not take device_map='auto', quantization='8bit'"
    ):
        Aligner.from_pretrained(gguf, engine="llama.cpp", device_map="auto", quantization="8bit")


def test_without_llama_cpp_the_error_names_the_extra(gguf, monkeypatch):
    from aligner_core import Aligner, MissingDependencyError
    from aligner_core.engines import opening

    monkeypatch.setattr(opening, "llama_cpp_installed", lambda: False)
    with pytest.raises(MissingDependencyError, match=r'pip install "llm-aligner\[llamacpp\]"') as info:
        Aligner.from_pretrained(gguf, engine="llama.cpp")
    assert isinstance(info.value, ImportError)


def test_version_names_the_default_engine(capsys):
    from aligner_core.cli import main

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert "default engine: " in out and ("llama.cpp" in out or "transformers" in out)
