"""llm-aligner core: load an Aligner and correct any model's answers.

``import aligner_core`` is cheap: torch and transformers load only when a model does.
"""

from __future__ import annotations

from .aligner import Aligner
from .context import ContextItem, normalize_context
from .correction import Correction, similarity
from .decision import Reply, Skip, Structure, decide, step
from .engines.base import Engine, GenerationOutput, GenerationParams, GenerationRequest
from .errors import (
    AlignerError,
    AlignerOutOfMemoryError,
    ContextOverflowError,
    CorrectionTimeoutError,
    EmptyAnswerError,
    EngineClosedError,
    EngineUnavailableError,
    GenerationOptionError,
    InspectorError,
    InvalidInputError,
    MissingDependencyError,
    ModelLoadError,
    OutputExistsError,
    OutputPathError,
    ServerContextOverflowError,
    ServerError,
    ServerRequestError,
    ServerTimeoutError,
    ServerUnavailableError,
    TemplateError,
    UnreadableContentError,
    UnsafeStreamError,
)
from .history import fold_history, normalize_history, render_prompt
from .inspector import Inspector
from .loading import DEFAULT_MODEL, write_aligner_config
from .local_chat import LocalChat
from .squad import AlignerSquad
from .templates import (
    ChatTemplate,
    HistoryTemplate,
    Template,
    TextTemplate,
    get_template,
    list_templates,
    register_template,
)
from .version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "Aligner",
    "AlignerError",
    "AlignerSquad",
    "AlignerOutOfMemoryError",
    "Engine",
    "ChatTemplate",
    "ContextItem",
    "ContextOverflowError",
    "Correction",
    "EmptyAnswerError",
    "EngineClosedError",
    "CorrectionTimeoutError",
    "EngineUnavailableError",
    "GenerationOptionError",
    "GenerationOutput",
    "LocalChat",
    "GenerationParams",
    "GenerationRequest",
    "HistoryTemplate",
    "Inspector",
    "InspectorError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelLoadError",
    "OutputExistsError",
    "OutputPathError",
    "ServerContextOverflowError",
    "ServerError",
    "ServerRequestError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "Reply",
    "Skip",
    "Structure",
    "Template",
    "TemplateError",
    "TextTemplate",
    "UnreadableContentError",
    "UnsafeStreamError",
    "__version__",
    "decide",
    "fold_history",
    "get_template",
    "list_templates",
    "normalize_context",
    "normalize_history",
    "register_template",
    "render_prompt",
    "similarity",
    "step",
    "write_aligner_config",
]
