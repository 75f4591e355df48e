"""The package imports light, and huggingface_llm runs the ecosystem's HuggingFaceLLM over the Aligner's weights."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.llms.huggingface")

from llama_index.core.base.llms.types import ChatMessage  # noqa: E402
from llama_index.llms.huggingface import HuggingFaceLLM  # noqa: E402

import llamaindex_aligner  # noqa: E402
from llamaindex_aligner import huggingface_llm  # noqa: E402
from llamaindex_aligner.local import SharedModel  # noqa: E402


def test_import_pulls_in_no_torch():
    code = (
        "import sys, llamaindex_aligner as m\n"
        "assert 'torch' not in sys.modules and 'llama_index.core' not in sys.modules\n"
        "for name in m.__all__: getattr(m, name)\n"  # every export resolves, still without torch
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        llamaindex_aligner.Nope  # noqa: B018
    assert not hasattr(llamaindex_aligner, "TransformersLLM")  # one local LLM: the ecosystem's


def test_huggingface_llm_over_the_aligners_weights(tiny_aligner, tiny_model, tiny_tokenizer):
    llm = huggingface_llm(tiny_aligner, max_new_tokens=6)
    assert isinstance(llm, HuggingFaceLLM) and isinstance(llm._model, SharedModel)
    assert llm._model._model is tiny_model and llm._tokenizer is tiny_tokenizer  # one copy of the weights
    assert llm.metadata.num_output == 6 and llm.metadata.context_window == 512
    text = llm.complete("Why is the sky blue?").text
    assert text == llm.complete("Why is the sky blue?").text  # greedy
    assert "".join(c.delta for c in llm.stream_complete("Why is the sky blue?", formatted=True))
    assert llm.completion_to_prompt("Hi") == "<|user|>Hi\n<|assistant|>"  # the tokenizer's chat template
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert llm.messages_to_prompt(messages) == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert isinstance(llm.chat(messages).message.content, str)


def test_generation_waits_for_the_aligners_model_lock(tiny_aligner):
    llm = huggingface_llm(tiny_aligner, max_new_tokens=2)
    done = threading.Event()
    with tiny_aligner.model_lock:  # the Aligner's engine is generating
        worker = threading.Thread(target=lambda: (llm.complete("Hi"), done.set()))
        worker.start()
        assert not done.wait(0.5)  # the upstream LLM waits its turn
    worker.join(timeout=30)
    assert done.is_set()


def test_needs_a_local_model(tiny_aligner):
    class Remote:
        name = "server"

    tiny_aligner_remote = type(tiny_aligner)(Remote(), tiny_aligner.template)
    with pytest.raises(TypeError, match="no local transformers model"):
        huggingface_llm(tiny_aligner_remote)
