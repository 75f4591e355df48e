"""The package imports light, and the local TransformersLLM behaves as a LlamaIndex LLM on the tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage  # noqa: E402

from llamaindex_aligner import TransformersLLM  # noqa: E402


def test_import_pulls_in_no_torch():
    code = (
        "import sys, llamaindex_aligner as m\n"
        "assert 'torch' not in sys.modules and 'llama_index.core' not in sys.modules\n"
        "for name in m.__all__: getattr(m, name)\n"  # every export resolves, still without torch
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_attribute():
    import llamaindex_aligner

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        llamaindex_aligner.Nope  # noqa: B018


def test_complete_and_stream_agree(tiny_model, tiny_tokenizer):
    llm = TransformersLLM(tiny_model, tiny_tokenizer, max_new_tokens=6)
    assert llm.metadata.num_output == 6 and llm.metadata.context_window == 512
    assert not llm.metadata.is_chat_model
    text = llm.complete("Why is the sky blue?").text
    assert text == llm.complete("Why is the sky blue?").text  # greedy
    chunks = list(llm.stream_complete("Why is the sky blue?"))
    assert "".join(c.delta for c in chunks).strip() == text
    assert chunks[-1].text.strip() == text
    assert len(list(llm.stream_complete("Why is the sky blue?", max_new_tokens=2))) <= 2  # per-call limit


def test_prompts_use_the_chat_template(tiny_model, tiny_tokenizer):
    llm = TransformersLLM(tiny_model, tiny_tokenizer, max_new_tokens=2)
    assert llm.completion_to_prompt("Hi") == "<|user|>Hi\n<|assistant|>"
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert llm.messages_to_prompt(messages) == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert isinstance(llm.chat(messages).message.content, str)


def test_options_and_sharing(tiny_aligner, tiny_model):
    llm = TransformersLLM.from_aligner(tiny_aligner, max_new_tokens=3)
    assert llm._model is tiny_model and llm._lock is tiny_aligner.model_lock
    with pytest.raises(TypeError, match="temperature"):
        llm.complete("Hi", temperature=0.5)
    with pytest.raises(ValueError):
        TransformersLLM.from_aligner(tiny_aligner, max_new_tokens=0)
